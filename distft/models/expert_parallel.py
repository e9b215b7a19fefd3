"""Expert parallelism for mixture-of-experts models, through transformers' own support.

`strategy.ep` (distft.strategies.fsdp.parallelize) calls `shard_experts` on the model the engine
built: transformers' `apply_expert_parallelism` with the model's own `ep_plan` splits each MoE
layer's fused expert weights over the ep ranks (DTensor `Shard(0)`) and routes tokens to them by
all-to-all; then the experts are FSDP2-sharded over their copies (efsdp) before the decoder
layers are sharded over the data-parallel ranks as usual.

`load` (below) is the other entry: transformers 5.23 loads an MoE model expert-parallel from a
`DistributedConfig(ep_size=E, fsdp_size=W)`, already FSDP2-wrapped, over the default process
group (each rank holds num_experts / E of every layer's experts).
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


def shard_experts(root: torch.nn.Module, ep_mesh, tp_mesh, efsdp_mesh, dp: int, **fsdp_kwargs) -> None:
    """Experts split over `ep_mesh`, tokens routed by all-to-all, expert weights FSDP2-sharded over
    `efsdp_mesh`, in place. `dp`: the data-parallel ranks whose batches each expert's gradient sums
    (an expert sees the tokens of every rank of its ep group, and its copies are reduced over efsdp)."""
    from torch.distributed.fsdp import fully_shard
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    plan = root._expand_parallel_plan(dict(root.ep_plan or {}))
    if not plan:
        raise ConfigError(f"strategy.ep: {type(root).__name__} has no expert-parallel plan; use ep=1")
    apply_expert_parallelism(root, ep_mesh, tp_mesh, plan, ep_implementation="all_to_all")
    for name, style in plan.items():
        if style != "ep_dispatch_experts":
            continue
        experts = root.get_submodule(name)
        fully_shard(experts, mesh=efsdp_mesh, **fsdp_kwargs)
        # Gradients are an average over the dp batches, not over the efsdp copies; FSDP2 divides by
        # a factor other than its group size with PREMUL_SUM, which gloo lacks: sum, then divide.
        experts.set_gradient_divide_factor(float(dp))
        if efsdp_mesh.size() > 1:
            experts.set_force_sum_reduction_for_comms(True)


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
