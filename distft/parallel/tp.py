"""Tensor parallelism (`strategy.tp`): the decoder layers' attention and MLP projections sharded
column- / row-wise over the mesh's "tp" dimension with torch's `parallelize_module`.

The plan is the model's own (`config.base_model_tp_plan` in transformers, e.g. Llama's q/k/v and
gate/up "colwise", o and down "rowwise"); families without one get FAMILY_PLANS. Attention reshapes
with `view(..., -1, head_dim)`, so it runs on its local heads once q/k/v are column-sharded; the
head-count attributes some attention modules keep are divided too. Embedding and lm_head stay
replicated (their gradients are the same on every tp rank, since their inputs are).

Sequence parallelism (`strategy.tp_sequence_parallel`, on by default where the plan is plain
colwise/rowwise): outside the projections, the residual stream and the decoder's norms hold 1/tp
of the sequence on each rank (a norm works on each token alone), so those activations are not
repeated on every tp rank. A block (attention, MLP) gathers its input whole before its
column-sharded projections; a row-sharded projection reduce-scatters its output by sequence (a
LoRA-wrapped one all-reduces, as without sequence parallelism, and keeps its slice).

LoRA adapters follow their base layer: for a column-sharded base lora_B is column-sharded and
lora_A replicated (its input gradient is all-reduced by the colwise input), for a row-sharded base
lora_A is row-sharded (its output all-reduced) and lora_B replicated. Other PEFT modes and QLoRA
(NF4 blocks cannot be split into DTensor shards) are refused.
"""

from __future__ import annotations

import re

import torch

from distft.errors import ConfigError

TP_TUNINGS = ("full", "lora")
TP_METHODS = ("sft",)  # RL rollouts, reference precompute and generation-based evals shard rows by rank
HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads")
_DECODER = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
FAMILY_PLANS: dict[str, dict[str, str]] = {
    # Used where a config class carries no base_model_tp_plan (older or remote-code configs).
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
}


def _styles() -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        # Phi-3's fused qkv / gate_up are sliced after the projection: gather, then split again.
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    }


STYLE_NAMES = ("colwise", "rowwise", "colwise_gather_output", "rowwise_split_input")


def degree(cfg) -> int:
    """The tensor-parallel degree of a config (1 where the strategy has no `tp`)."""
    return int(getattr(cfg.strategy, "tp", 1) or 1)


def model_plan(config) -> dict[str, str]:
    """{module pattern under the base model: style} for a transformers config; ConfigError if the
    family has no plan or uses styles distft does not shard."""
    kind = getattr(config, "model_type", "?")
    plan = getattr(config, "base_model_tp_plan", None) or FAMILY_PLANS.get(kind)
    if not plan:
        raise ConfigError(
            f"strategy.tp: model type {kind!r} has no tensor-parallel plan (no base_model_tp_plan in its "
            f"config); use strategy.tp=1, or a family with one ({', '.join(sorted(FAMILY_PLANS))})"
        )
    odd = sorted({s for s in plan.values() if s not in STYLE_NAMES})
    if odd:
        raise ConfigError(
            f"strategy.tp: model type {kind!r}'s tensor-parallel plan uses {', '.join(odd)}, which distft "
            "does not shard; use strategy.tp=1"
        )
    return dict(plan)


def validate(cfg, world: int | None = None, model_config=None) -> None:
    """One-line refusals of an impossible or unsupported tensor-parallel setup."""
    tp = degree(cfg)
    if tp <= 1:
        return
    if cfg.tuning.name == "qlora":
        raise ConfigError(
            "strategy.tp>1 does not work with tuning=qlora: NF4-quantized weights cannot be split into "
            "tensor-parallel shards; use tuning=lora with strategy.tp, or qlora with strategy.tp=1"
        )
    if cfg.tuning.name not in TP_TUNINGS:
        raise ConfigError(
            f"strategy.tp>1 is verified for tuning={'|'.join(TP_TUNINGS)} only, "
            f"not tuning={cfg.tuning.name}; set strategy.tp=1"
        )
    if cfg.method.name not in TP_METHODS:
        raise ConfigError(
            f"strategy.tp>1 is verified for method={'|'.join(TP_METHODS)} only, "
            f"not method={cfg.method.name}; set strategy.tp=1"
        )
    if world is not None and world % tp:
        raise ConfigError(
            f"strategy.tp={tp} does not divide the world size {world}; use a tp that divides the "
            "number of ranks (cluster.nproc_per_node × cluster.nodes)"
        )
    if model_config is None and not cfg.model.name_or_path:  # the tiny model: its shape is in model.*
        _check_heads(tp, getattr(cfg.model, "num_heads", None), getattr(cfg.model, "num_kv_heads", None))
    if model_config is not None:
        heads = getattr(model_config, "num_attention_heads", None)
        kv = next((getattr(model_config, k) for k in KV_HEAD_KEYS if getattr(model_config, k, None)), heads)
        _check_heads(tp, heads, kv)
        model_plan(model_config)


def _check_heads(tp: int, heads: int | None, kv: int | None) -> None:
    kv = kv or heads
    if heads is not None:
        for what, n in (("attention heads", heads), ("key/value heads", kv)):
            if n is not None and n % tp:
                raise ConfigError(
                    f"strategy.tp={tp} does not divide the model's {n} {what}; pick a tp that divides "
                    f"both num_attention_heads ({heads}) and num_key_value_heads ({kv})"
                )


def _matches(plan: dict[str, str], names) -> dict[str, str]:
    """{module name: style} for the names a plan pattern matches (`*` is a layer index)."""
    rules = [(re.compile("^" + re.escape(k).replace(r"\*", r"\d+") + "$"), v) for k, v in plan.items()]
    return {n: v for n in names for rx, v in rules if rx.match(n)}


def _split_heads(attn: torch.nn.Module, tp: int) -> None:
    for attr in HEAD_ATTRS:
        n = getattr(attn, attr, None)
        if isinstance(n, int) and n > 0:
            setattr(attn, attr, n // tp)


def _replicate_rest(root: torch.nn.Module, tp_mesh) -> None:
    """Every parameter the plan left alone becomes a Replicate DTensor on the tp mesh, so that all
    parameters live on one mesh once fully_shard adds the data-parallel dimension (the gradient norm
    stacks them all). Their modules take and return plain tensors; a tied weight stays tied."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    done: dict[int, torch.nn.Parameter] = {}

    def partition(_name, mod, mesh):
        for n, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in done:
                local = DTensor.from_local(p.data, mesh, [Replicate()], run_check=False)
                done[id(p)] = torch.nn.Parameter(local, requires_grad=p.requires_grad)
            mod.register_parameter(n, done[id(p)])

    def to_dtensor(_mod, inputs, mesh):  # a DTensor input (sequence parallelism's) stays one
        return tuple(
            DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            if torch.is_tensor(x) and not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    def to_local(_mod, out, _mesh):
        return out.to_local() if isinstance(out, DTensor) else out

    for mod in list(root.modules()):
        own = list(mod.parameters(recurse=False))
        if own and not all(isinstance(p, DTensor) for p in own):
            distribute_module(mod, tp_mesh, partition, to_dtensor, to_local)


def sequence_parallel(cfg, found: dict[str, str]) -> bool:
    """Whether the job splits norms and the residual stream by sequence: asked for, and a plain
    plan (gathered-output styles re-split their activations themselves)."""
    wanted = bool(getattr(cfg.strategy, "tp_sequence_parallel", False))
    return wanted and set(found.values()) <= {"colwise", "rowwise"}


def _rowwise_to_sequence():
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import RowwiseParallel

    return RowwiseParallel(output_layouts=Shard(1), use_local_output=False)


def _sequence_norms(base: torch.nn.Module, found: dict[str, str]) -> dict[str, object]:
    """The decoder layers' own norms and the final norm, split by sequence (not norms inside a
    block, e.g. Qwen3's q_norm/k_norm, which see whole sequences of local heads)."""
    from torch.distributed.tensor.parallel import SequenceParallel

    layers = {n.rsplit(".", 2)[0] for n in found}  # "layers.3.self_attn.q_proj" -> "layers.3"
    plan: dict[str, object] = {}
    for name, mod in base.named_modules():
        leaf_norm = "norm" in type(mod).__name__.lower() and not list(mod.children())
        if leaf_norm and (name.rpartition(".")[0] in layers or name == "norm"):
            plan[name] = SequenceParallel(use_local_output=False)
    return plan


def _sequence_hooks(base: torch.nn.Module, found: dict[str, str], tp_mesh, split_after: list[str]) -> None:
    """Around the sequence-parallel plan: the embedding's output sliced by sequence, each block
    with column-sharded projections gathering its input whole (still a DTensor, so its gradient
    returns by reduce-scatter), LoRA-wrapped row-sharded outputs sliced, the final norm's output
    whole again for lm_head."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def slice_output(_mod, _inputs, out):
        return DTensor.from_local(out, tp_mesh, [Replicate()], run_check=False).redistribute(
            tp_mesh, [Shard(1)]
        )

    def gather_inputs(_mod, args, kwargs):
        def whole(x):
            return x.redistribute(placements=[Replicate()]) if isinstance(x, DTensor) else x

        return tuple(whole(a) for a in args), {k: whole(v) for k, v in kwargs.items()}

    def whole_output(_mod, _inputs, out):
        return out.redistribute(placements=[Replicate()]).to_local()

    base.get_input_embeddings().register_forward_hook(slice_output)
    for name in split_after:
        base.get_submodule(name).register_forward_hook(slice_output)
    for block in {n.rsplit(".", 1)[0] for n, s in found.items() if s == "colwise"}:
        base.get_submodule(block).register_forward_pre_hook(gather_inputs, with_kwargs=True)
    base.get_submodule("norm").register_forward_hook(whole_output)


def parallelize(model: torch.nn.Module, cfg, info):
    """The (dp_shard, tp) mesh of this job, `model` tensor-parallel over its tp dimension; returns
    the dp_shard mesh for fully_shard."""
    from torch.distributed.device_mesh import init_device_mesh

    tp = degree(cfg)
    validate(cfg, world=info.world_size)
    mesh = init_device_mesh(info.device.type, (info.world_size // tp, tp), mesh_dim_names=("dp_shard", "tp"))
    apply_tp(model, mesh["tp"], cfg)
    return mesh["dp_shard"]


def apply_tp(model: torch.nn.Module, tp_mesh, cfg) -> torch.nn.Module:
    """Shard `model` (a transformers model, or a PEFT model around one) over `tp_mesh` in place;
    returns it. Call before `fully_shard` (which then shards the tp shards over data-parallel ranks)."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    validate(cfg, model_config=root.config)
    base = root.base_model  # the decoder (LlamaModel ...), where the plan's names start
    styles = _styles()
    named = dict(base.named_modules())
    found = _matches(model_plan(root.config), named)
    if not found:
        raise ConfigError(f"strategy.tp: the tensor-parallel plan matched no module of {type(base).__name__}")
    sequence = sequence_parallel(cfg, found) and isinstance(getattr(base, "norm", None), torch.nn.Module)
    plan: dict[str, object] = {}
    split_after: list[str] = []  # LoRA-wrapped row-sharded layers: their whole output is sliced
    for name, style in found.items():
        mod = named[name]
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):  # a PEFT LoRA layer around the Linear
            plan[f"{name}.base_layer"] = styles[style]()
            sharded = "lora_B" if style.startswith("colwise") else "lora_A"
            for key in getattr(mod, sharded):
                plan[f"{name}.{sharded}.{key}"] = styles[style]()
            if sequence and style == "rowwise":
                split_after.append(name)
        elif isinstance(mod, torch.nn.Linear):
            plan[name] = _rowwise_to_sequence() if sequence and style == "rowwise" else styles[style]()
        else:
            raise ConfigError(
                f"strategy.tp: {name} is a {type(mod).__name__}, which tensor parallelism cannot shard; "
                "use strategy.tp=1"
            )
    if sequence:
        plan.update(_sequence_norms(base, found))
    frozen = {n for n, p in base.named_parameters() if not p.requires_grad}
    parallelize_module(base, tp_mesh, plan)
    for n, p in base.named_parameters():  # SequenceParallel's replicas come back trainable
        if n in frozen:
            p.requires_grad_(False)
    _replicate_rest(root, tp_mesh)
    if sequence:
        _sequence_hooks(base, found, tp_mesh, split_after)
    # Attention whose q/k/v outputs stay sharded runs on its local heads; with gathered outputs
    # (Phi-3's fused qkv) it runs every head on every rank and keeps its counts.
    for name, mod in named.items():
        if any(n.startswith(name + ".") and s == "colwise" for n, s in found.items()):
            if name.endswith(("self_attn", "attention", "attn")):
                _split_heads(mod, tp)
    return model
