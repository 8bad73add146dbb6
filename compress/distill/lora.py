"""LoRA through peft, and the trained student saved as a plain checkpoint.

Features:
  * ``apply_lora``: adapters of ``distill.lora`` (rank, alpha, dropout, target modules: a comma list
    or ``all-linear``) on a causal LM;
  * ``save_student``: a plain Hugging Face checkpoint either way; LoRA adapters are merged into it
    and kept beside the weights, in ``lora/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from compress.config import LoraConfig
from compress.models import save_checkpoint


def apply_lora(model, lora: LoraConfig):
    """``model`` wrapped by peft with trainable LoRA adapters (the base weights frozen)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules if lora.target_modules == "all-linear" else lora.target_modules.split(",")
    cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def save_student(model, tokenizer, out_dir: Path, is_lora: bool) -> None:
    """Save a plain checkpoint; LoRA adapters are merged into it (and kept beside, in ``lora/``)."""
    if not is_lora:
        save_checkpoint(model, tokenizer, out_dir)
        return
    adapter = out_dir.with_name(out_dir.name + ".lora")
    model.save_pretrained(str(adapter))
    merged = model.merge_and_unload()
    save_checkpoint(merged, tokenizer, out_dir)
    shutil.move(str(adapter), str(out_dir / "lora"))
