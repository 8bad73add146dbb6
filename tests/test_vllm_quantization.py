"""The served vLLM's quantization methods: our copy of the list is the installed vLLM's, and pre-flight uses it."""

import subprocess

import pytest

from compress.errors import ConfigError
from compress.serving.quantization import VLLM_QUANTIZATION_METHODS, check_servable_quantization
from tests.conftest import VLLM_PYTHON, require_vllm


def test_unknown_quant_method_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"teacher.path: .*quant_method 'nosuchquant' is not one vLLM can serve"):
        check_servable_quantization({"quantization_config": {"quant_method": "nosuchquant"}}, "teacher.path")
    with pytest.raises(ConfigError, match="without quant_method"):
        check_servable_quantization({"quantization_config": {"bits": 4}}, "teacher.path")
    check_servable_quantization({"quantization_config": {"quant_method": "AWQ"}}, "teacher.path")
    check_servable_quantization({}, "teacher.path")


@pytest.mark.slow
def test_the_list_is_the_installed_vllms():
    require_vllm()
    code = "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS as Q; print('\\n'.join(Q))"
    out = subprocess.run([str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert tuple(out.stdout.split()) == VLLM_QUANTIZATION_METHODS
