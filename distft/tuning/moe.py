"""LoRA on mixture-of-experts models: adapters on the experts, the router frozen unless asked.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, ... fused as 3-D parameters
(`mlp.experts.gate_up_proj`: experts × out × in) in a module that is not an `nn.Linear`, so
PEFT's `all-linear` misses them on some families (Qwen2-MoE) and reaches the router on others
(Mixtral's router is a Linear subclass). With `all-linear` on an MoE model the targets are made
explicit here: every linear layer but the output head and the routers, plus the fused expert
weights through PEFT's `target_parameters`. The router (a block's `gate`/`router` beside its
`experts`) stays frozen by default, since adapting it shifts which experts see which tokens;
`tuning.train_router=true` trains it in full (PEFT modules_to_save).
"""

from __future__ import annotations

import torch

ROUTER_NAMES = ("gate", "router")


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def expert_blocks(model: torch.nn.Module) -> list[str]:
    """Names of the `experts` modules (one per MoE layer)."""
    return [n for n, _ in _base(model).named_modules() if n.rsplit(".", 1)[-1] == "experts"]


def routers(model: torch.nn.Module) -> list[str]:
    """Names of the routers: a `gate` or `router` child beside an `experts` module."""
    base, out = _base(model), []
    for experts in expert_blocks(base):
        parent = experts.rsplit(".", 1)[0] if "." in experts else ""
        block = base.get_submodule(parent)
        out += [f"{parent}.{c}" if parent else c for c, _ in block.named_children() if c in ROUTER_NAMES]
    return out


def fused_expert_parameters(model: torch.nn.Module) -> list[str]:
    """Full names of fused expert weights (3-D parameters held directly by an experts module)."""
    base, out = _base(model), []
    for experts in expert_blocks(base):
        module = base.get_submodule(experts)
        out += [f"{experts}.{n}" for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    return out


def restrict_lora(peft_cfg, model: torch.nn.Module, train_router: bool):
    """A LoRA config with `all-linear` on an MoE model: explicit targets (linear layers but head
    and routers), the fused experts as target_parameters, the router trained in full or frozen."""
    if not expert_blocks(model) or peft_cfg.target_modules not in ("all-linear", ["all-linear"]):
        return peft_cfg
    base = _base(model)
    gates = routers(base)
    fused = fused_expert_parameters(base)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    skip = tuple(gates) + tuple(e for e in expert_blocks(base) if fused)
    linear = [
        n
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear)
        and m is not head
        and not any(n == s or n.startswith(s + ".") for s in skip)
    ]
    peft_cfg.target_modules = linear
    if fused and not getattr(peft_cfg, "use_dora", False):  # PEFT has no DoRA on bare parameters
        peft_cfg.target_parameters = fused
    if train_router and gates:
        peft_cfg.modules_to_save = [*(peft_cfg.modules_to_save or []), *gates]
    return peft_cfg
