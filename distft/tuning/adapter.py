"""`tuning=adapter`: PEFT's LLaMA-Adapter (AdaptionPromptConfig): a learned adaption prompt with a
zero-initialized gate in the attention of the top `adapter_layers` layers, the model frozen.

Why not Houlsby-style bottleneck adapters between layers: the library that provides them,
`adapters` (1.3.0, the newest), requires transformers ~=4.57 and does not import next to
transformers 5.23 (it needs `huggingface_hub.HfFolder`, which is gone), and PEFT 0.21 has no
bottleneck adapter. LLaMA-Adapter is the adapter PEFT ships; it supports Llama, Mistral and GPT-2
style attention. Like prefix tuning, it adds inputs rather than weight deltas: nothing to merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distft.errors import ConfigError
from distft.ranges import num
from distft.strategies import check_tuning
from distft.tuning import peft_common

# The adaption prompts live inside the decoder layers, so FSDP2 shards them with their layer.
# (Checked with 2 ranks: each strategy's losses match DDP's on the same global batch.)


@dataclass
class AdapterConfig:
    name: str = "adapter"
    """Tuning mode (PEFT LLaMA-Adapter: adaption prompts with zero-init gates)."""
    adapter_len: int = num(10, ge=1)
    """Adaption prompt length (tokens) per adapted layer."""
    adapter_layers: int = num(2, ge=1)
    """How many of the top decoder layers get an adaption prompt."""
    init_adapter: str | None = None
    """Continue from a saved adaption-prompt adapter (a PEFT adapter directory)."""
    merge_on_export: bool = False
    """Must stay false: adaption prompts are not weight deltas and cannot be merged."""


config = AdapterConfig
adapter = True


def validate(cfg) -> None:
    t = cfg.tuning
    if t.adapter_len < 1 or t.adapter_layers < 1:
        raise ConfigError(
            f"tuning.adapter_len={t.adapter_len}, tuning.adapter_layers={t.adapter_layers}: both must be >= 1"
        )
    if t.merge_on_export:
        raise ConfigError(
            "tuning.merge_on_export=true with tuning=adapter: adaption prompts cannot be merged into "
            "weights; set it false (or use tuning=lora/dora/ia3 for a mergeable adapter)"
        )
    if cfg.method.name == "classify":
        raise ConfigError(
            "tuning=adapter does not train a classification head (PEFT's adaption prompt has no "
            "modules_to_save); for method=classify use tuning=full, lora, qlora, dora, ia3 or prefix"
        )
    check_tuning(cfg)
    peft_common.check_init_adapter(t.init_adapter)


def load_kwargs(cfg, dtype: torch.dtype) -> dict:
    return {}


def peft_config(cfg, task_type: str = "CAUSAL_LM"):
    from peft import AdaptionPromptConfig

    t = cfg.tuning
    return AdaptionPromptConfig(
        adapter_len=t.adapter_len, adapter_layers=t.adapter_layers, task_type=task_type
    )


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    layers = getattr(model.config, "num_hidden_layers", None)
    if layers is not None and cfg.tuning.adapter_layers > layers:
        raise ConfigError(
            f"tuning.adapter_layers={cfg.tuning.adapter_layers} but the model has {layers} layers; "
            f"use at most {layers}"
        )
    model = peft_common.wrap(model, cfg, peft_config(cfg, peft_common.task_type(model)))
    # PEFT's AdaptionPromptModel binds its `forward` to the inner model's `forward` method, which
    # skips the inner module's hooks; FSDP2 gathers the root's parameters (embeddings, head) in
    # such a hook. Calling the module runs the hooks and is otherwise the same.
    model.base_model.forward = model.base_model.model.__call__
    peft_common.report(model, cfg, f"adaption prompts in the top {cfg.tuning.adapter_layers} layers")
    return model
