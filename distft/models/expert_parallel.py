"""Expert parallelism for mixture-of-experts models (`strategy.ep`), through transformers' own support.

distft.strategies.fsdp.parallelize calls `shard_experts` on the model the engine built, before it
shards the decoder layers: transformers' `apply_expert_parallelism`, with the model's own
`ep_plan` (e.g. Mixtral's `layers.*.mlp.experts`), splits each MoE layer's fused expert weights
over the ep ranks (DTensors `Shard(0)` on the expert dimension, each rank num_experts / ep whole
experts) and routes every token to its experts' ranks by all-to-all (gloo runs it on CPU). The
experts are then FSDP2-sharded over their copies (efsdp = shard group / ep ranks), and the
decoder layers' fully_shard leaves them alone. DCP saves them as global tensors, so a checkpoint
resumes at another ep or world size, and the full state dict (export) gathers them whole.
Under LoRA each expert's adapter factors go with it (`_split_lora`, in the stacked layout that
`stack_lora` also gives them at ep=1), and the export writes them in PEFT's own shapes.
"""

from __future__ import annotations

import sys

import torch

from distft.errors import ConfigError


def num_experts(config: dict) -> int:
    """Routed experts per MoE layer of a transformers config (as a dict; 0 for a dense model)."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def check(ep: int, world_size: int, experts: int, name: str, lora: bool = False) -> None:
    """One line naming strategy.ep when the degree does not fit the job or the model. `lora`: PEFT
    folds a layer's expert LoRA as a stack only for 2 or more experts, so each rank needs 2."""
    if ep <= 1:
        return
    if experts == 0:
        raise ConfigError(f"strategy.ep={ep}: {name} is not a mixture-of-experts model; set strategy.ep=1")
    if world_size % ep or experts % ep:
        raise ConfigError(
            f"strategy.ep={ep} must divide the world size ({world_size}) and the experts per layer "
            f"({experts}) of {name}; pick a common divisor"
        )
    if lora and experts // ep < 2:
        raise ConfigError(
            f"strategy.ep={ep} with tuning=lora leaves {experts // ep} of the {experts} experts of {name} on "
            f"each rank; PEFT's expert LoRA needs at least 2 a rank: set strategy.ep <= {experts // 2}"
        )


def shard_experts(root: torch.nn.Module, ep_mesh, tp_mesh, efsdp_mesh, dp: int, **fsdp_kwargs) -> None:
    """Experts split over `ep_mesh`, tokens routed by all-to-all, expert weights FSDP2-sharded over
    `efsdp_mesh`, in place. `dp`: the data-parallel ranks whose batches each expert's gradient sums
    (an expert sees the tokens of every rank of its ep group, and its copies are reduced over efsdp).
    `tp_mesh`: the ranks holding the same batch (size 1 here). Under LoRA, PEFT's ParamWrappers
    stand where the plan names the experts: the plan reaches the experts inside them, and each
    wrapper's factors are split by expert with them (`_split_lora`)."""
    from torch.distributed.fsdp import fully_shard
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    plan, blocks = _plan(root)
    if not plan:
        raise ConfigError(f"strategy.ep: {type(root).__name__} has no expert-parallel plan; use ep=1")
    lora = any(peft_wrappers(root.get_submodule(b))[0] for b in blocks)
    check(ep_mesh.size(), ep_mesh.size(), num_experts(root.config.to_dict()), type(root).__name__, lora)
    apply_expert_parallelism(root, ep_mesh, tp_mesh, plan, ep_implementation="all_to_all")
    held = []
    for name in blocks:
        block = root.get_submodule(name)
        wrappers, experts = peft_wrappers(block)
        held.append(experts.num_experts)  # now this rank's share
        for wrapper in wrappers:
            _split_lora(wrapper, ep_mesh, experts.num_experts)
        if wrappers:
            _local_forward(block)
        fully_shard(block, mesh=efsdp_mesh, **fsdp_kwargs)
        # Gradients are an average over the dp batches, not over the efsdp copies; FSDP2 divides by
        # a factor other than its group size with PREMUL_SUM, which gloo lacks: sum, then divide.
        block.set_gradient_divide_factor(float(dp))
        if efsdp_mesh.size() > 1:
            block.set_force_sum_reduction_for_comms(True)
    if torch.distributed.get_rank() == 0:
        total = num_experts(root.config.to_dict())
        print(
            f"distft: expert parallel: each rank holds {held[0]} of {total} experts in each of "
            f"{len(held)} MoE layers (ep={ep_mesh.size()})",
            flush=True,
        )


def peft_wrappers(module: torch.nn.Module) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """PEFT's LoRA ParamWrappers around an experts module (outermost first; one per targeted fused
    weight, nested) and the experts module inside them."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = []
    while isinstance(module, ParamWrapper):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def _plan(root: torch.nn.Module) -> tuple[dict[str, str], list[str]]:
    """The model's ep_plan with the layer numbers filled in, pointed through PEFT's wrappers at the
    experts' own parameters (in the plan's order: parameters, then their module); and the names of
    the experts blocks (the outermost wrapper under LoRA), each one FSDP2 unit."""
    from transformers.distributed.parallel_utils import _get_parameter_plan

    rules = dict(getattr(root, "ep_plan", None) or {})
    out, blocks = {}, []
    for name, style in root._expand_parallel_plan(rules).items():
        if style != "ep_dispatch_experts":
            out[name] = style
            continue
        wrappers, experts = peft_wrappers(root.get_submodule(name))
        inner = name + ".base_layer" * len(wrappers)
        for param, _ in experts.named_parameters(recurse=False) if wrappers else ():
            if found := _get_parameter_plan(parameter_name=f"{name}.{param}", plan=rules, is_weight=True):
                out[f"{inner}.{param}"] = found
        out[inner] = style
        blocks.append(name)
    return out, blocks


# PEFT keeps a layer's expert LoRA as 2-D factors, lora_A (experts·r × in) and lora_B (out × r·experts,
# its columns rank-major): the expert split cannot cut lora_B into whole experts. On fsdp/hsdp the
# factors are held as (experts, r, in) and (out, r, experts) instead, at every ep (PEFT reshapes them
# by its num_experts either way), so DCP checkpoints have one layout and reshard across ep; the 2-D
# shape PEFT saves is kept on the factor's module under this attribute (`peft_layout` restores it).
PEFT_SHAPE = "_distft_peft_shape"


def stack_lora(wrapper: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """A ParamWrapper's factors in the expert-stacked layout, in place; each factor's module and
    its experts dimension."""
    experts, out = wrapper.num_experts, []
    for factors, dim in ((wrapper.lora_A, 0), (wrapper.lora_B, 2)):
        for linear in factors.values():
            w = linear.weight
            if getattr(linear, PEFT_SHAPE, None) is None:
                shape = (experts, -1, w.shape[-1]) if dim == 0 else (w.shape[0], -1, experts)
                setattr(linear, PEFT_SHAPE, tuple(w.shape))
                linear.weight = torch.nn.Parameter(w.detach().reshape(shape), requires_grad=w.requires_grad)
            out.append((linear, dim))
    return out


def stack_experts_lora(root: torch.nn.Module) -> None:
    """Every MoE layer's expert LoRA in the expert-stacked layout (fsdp/hsdp at ep=1): each PEFT
    ParamWrapper of a 3-D (experts-stacked) parameter."""
    if "peft" not in sys.modules:  # no adapter anywhere: importing PEFT would pull in bitsandbytes
        return
    from peft.tuners.lora.layer import ParamWrapper

    for module in root.modules():
        if isinstance(module, ParamWrapper) and getattr(module, "_param_ndim", 2) == 3:
            stack_lora(module)


def _split_lora(wrapper: torch.nn.Module, ep_mesh, local_experts: int) -> None:
    """A ParamWrapper's stacked factors split like its experts: DTensors sharded on the experts
    dimension over `ep_mesh`, so this rank keeps the factors of the experts it holds; PEFT's
    `num_experts` becomes the local count."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for linear, dim in stack_lora(wrapper):
        w = linear.weight
        split = distribute_tensor(w.detach(), ep_mesh, [Shard(dim)], src_data_rank=None)
        linear.weight = torch.nn.Parameter(split, requires_grad=w.requires_grad)
    wrapper.num_experts = local_experts


def _local_forward(block: torch.nn.Module) -> None:
    """The experts block's forward on local tensors: PEFT folds its factors into the experts'
    weights by parametrization before the experts' own forward (transformers' local swap) runs, so
    every DTensor of the block (experts and factors) is swapped for its local shard first, and back
    after (PEFT leaves a plain tensor it parametrized as a buffer: dropped)."""
    original = block.forward

    def forward(*args, **kwargs):
        from torch.distributed.tensor import DTensor

        swapped = []
        for module in block.modules():
            for name, p in list(module._parameters.items()):
                if isinstance(p, DTensor):
                    swapped.append((module, name, p))
                    module._parameters[name] = p.to_local()
        try:
            return original(*args, **kwargs)
        finally:
            for module, name, p in swapped:
                module._buffers.pop(name, None)
                module._parameters[name] = p

    block.forward = forward


def peft_layout(model: torch.nn.Module, state: dict) -> dict:
    """A full state dict of `model` with every expert-split LoRA factor back in PEFT's 2-D shape
    (what an adapter file and PEFT's loading expect)."""
    for name, module in model.named_modules():
        shape = getattr(module, PEFT_SHAPE, None)
        key = f"{name}.weight"
        if shape is not None and key in state:
            state[key] = state[key].reshape(shape)
    return state
