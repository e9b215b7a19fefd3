"""Expert parallelism for mixture-of-experts models (`strategy.ep`), through transformers' own support.

distft.strategies.fsdp.parallelize calls `shard_experts` on the model the engine built, before it
shards the decoder layers: transformers' `apply_expert_parallelism`, with the model's own
`ep_plan` (e.g. Mixtral's `layers.*.mlp.experts`), splits each MoE layer's fused expert weights
over the ep ranks (DTensors `Shard(0)` on the expert dimension, each rank num_experts / ep whole
experts) and routes every token to its experts' ranks by all-to-all (gloo runs it on CPU). The
experts are then FSDP2-sharded over their copies (efsdp = shard group / ep ranks), and the
decoder layers' fully_shard leaves them alone. DCP saves them as global tensors, so a checkpoint
resumes at another ep or world size, and the full state dict (export) gathers them whole.
"""

from __future__ import annotations

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


def shard_experts(root: torch.nn.Module, ep_mesh, tp_mesh, efsdp_mesh, dp: int, **fsdp_kwargs) -> None:
    """Experts split over `ep_mesh`, tokens routed by all-to-all, expert weights FSDP2-sharded over
    `efsdp_mesh`, in place. `dp`: the data-parallel ranks whose batches each expert's gradient sums
    (an expert sees the tokens of every rank of its ep group, and its copies are reduced over efsdp).
    `tp_mesh`: the ranks holding the same batch (size 1 here)."""
    from torch.distributed.fsdp import fully_shard
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    plan = root._expand_parallel_plan(dict(getattr(root, "ep_plan", None) or {}))
    if not plan:
        raise ConfigError(f"strategy.ep: {type(root).__name__} has no expert-parallel plan; use ep=1")
    check(ep_mesh.size(), ep_mesh.size(), num_experts(root.config.to_dict()), type(root).__name__)
    apply_expert_parallelism(root, ep_mesh, tp_mesh, plan, ep_implementation="all_to_all")
    held = []
    for name, style in plan.items():
        if style != "ep_dispatch_experts":
            continue
        experts = root.get_submodule(name)
        held.append(experts.num_experts)  # now this rank's share
        fully_shard(experts, mesh=efsdp_mesh, **fsdp_kwargs)
        # Gradients are an average over the dp batches, not over the efsdp copies; FSDP2 divides by
        # a factor other than its group size with PREMUL_SUM, which gloo lacks: sum, then divide.
        experts.set_gradient_divide_factor(float(dp))
        if efsdp_mesh.size() > 1:
            experts.set_force_sum_reduction_for_comms(True)
    if torch.distributed.get_rank() == 0:
        total = num_experts(root.config.to_dict())
        print(
            f"distft: expert parallel: each rank holds {held[0]} of {total} experts in each of "
            f"{len(held)} MoE layers (ep={ep_mesh.size()})",
            flush=True,
        )
