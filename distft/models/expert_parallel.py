"""Expert parallelism for mixture-of-experts models, through transformers' own support.

transformers 5.23 loads an MoE model expert-parallel from a `DistributedConfig(ep_size=E,
fsdp_size=W)`: each rank holds num_experts / E of every layer's experts (the fused expert weights
become DTensors sharded on the expert dimension), the dense weights are FSDP2-sharded over the W
ranks, and each MoE layer routes its tokens to the experts' ranks with all-to-all collectives
(gloo runs them on CPU). So the model comes back already wrapped in FSDP2; the FSDP2 strategy
must then not shard it again (the hook it needs: skip `fully_shard` when the model is already an
`FSDPModule`). Checked here: 5 fp32 AdamW steps with ep=2 equal ep=1 within 1e-4
(tests/test_moe.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distft.errors import ConfigError


def num_experts(config: dict) -> int:
    """Routed experts per MoE layer of a transformers config (as a dict; 0 for a dense model)."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def check(ep: int, world_size: int, experts: int, name: str) -> None:
    """One line naming strategy.ep when the degree does not fit the job or the model."""
    if ep <= 1:
        return
    if experts == 0:
        raise ConfigError(f"strategy.ep={ep}: {name} is not a mixture-of-experts model; set strategy.ep=1")
    if world_size % ep or experts % ep:
        raise ConfigError(
            f"strategy.ep={ep} must divide the world size ({world_size}) and the experts per layer "
            f"({experts}) of {name}; pick a common divisor"
        )


def distributed_config(ep: int, world_size: int):
    from transformers.distributed import DistributedConfig

    return DistributedConfig(ep_size=ep, fsdp_size=world_size, ep_implementation="all_to_all")


def load(name_or_path: str, ep: int, world_size: int, dtype: torch.dtype = torch.float32, **kwargs):
    """The model loaded expert-parallel (and FSDP2-sharded) over the default process group."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = Path(name_or_path, "config.json")
    config = (
        json.loads(config_file.read_text())
        if config_file.is_file()
        else AutoConfig.from_pretrained(name_or_path).to_dict()
    )
    check(ep, world_size, num_experts(config), str(name_or_path))
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, distributed_config=distributed_config(ep, world_size), **kwargs
    )


def local_experts(model: torch.nn.Module) -> list[int]:
    """Experts held by this rank in each MoE layer (the local rows of the fused expert weights)."""
    out = []
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            out.append(int((p.to_local() if hasattr(p, "to_local") else p).shape[0]))
    return out


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole (a collective: every rank calls it)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()
    }
