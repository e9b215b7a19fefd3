"""QLoRA: the base loaded as bitsandbytes NF4 (double quantization), LoRA adapters on top.

The 4-bit weights are stored in the compute dtype (`bnb_4bit_quant_storage`), not uint8, so that
FSDP2 and ZeRO-3 shard them as ordinary floating tensors: the uint8 default is the silent
loss-0/NaN trap users hit with FSDP (accelerate#3983), and it cannot be configured here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distft.errors import ConfigError
from distft.tuning import lora, peft_common


@dataclass
class QLoraConfig(lora.LoraConfig):
    name: str = "qlora"
    """Tuning mode."""
    merge_on_export: bool = False
    """Also write merged weights (adapter merged into a dequantized base) to export/merged."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit/param)."""


config = QLoraConfig
adapter = True
peft_config = lora.peft_config


def validate(cfg) -> None:
    lora.validate(cfg)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("tuning=qlora needs bitsandbytes: pip install bitsandbytes") from None


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.tuning.quant_type,
            bnb_4bit_use_double_quant=cfg.tuning.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    }


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    from bitsandbytes.nn import Linear4bit
    from peft import prepare_model_for_kbit_training

    for m in model.modules():
        if isinstance(m, Linear4bit):
            # bitsandbytes repacks weights for CPU inference in eval mode; the repacked form
            # cannot be saved with a float quant storage, and sharded copies must stay identical.
            m.support_avx512bf16_for_cpu = False

    if cfg.train.precision != "bf16":
        # PEFT upcasts every weight that is not 4-bit (embeddings, head, norms) to fp32, for fp16's
        # range; in bf16 (fp32's range) they stay in the compute dtype: ~2 GiB less for an 8B
        # model's embedding and head. PEFT also re-enables checkpointing with its own kwargs ({}
        # unless given), which torch reads as use_reentrant=True: pass the non-reentrant form
        # Trainer.build chose through.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model = peft_common.wrap(model, cfg, lora.peft_config(cfg, peft_common.task_type(model)))
    peft_common.report(model, cfg, f"r={cfg.tuning.r}, {cfg.tuning.quant_type} base")
    return model
