"""Per-rank memory of a training job, by parts, for one strategy and world size.

The strategy owns its model states (`StrategyOption.memory`: weights, gradients, optimizer states
and its buffers, see distft.strategies.memory); this module adds what every strategy shares.
Activations are counted per micro-batch for a Llama-style block, with and without gradient
checkpointing; the logits and the loss's fp32 copies are counted apart because a large vocabulary
makes them the biggest single item. The runtime (interpreter, libraries, CUDA context) is a
measured constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distft.parallel.mesh import degrees, ep_degree
from distft.plan.shape import ModelShape
from distft.strategies import AUTO_ORDER, STRATEGIES, shipped_config
from distft.strategies.memory import NF4_BYTES, Job  # noqa: F401 - NF4_BYTES: part of this module's API

GIB = 2**30
# Peak RSS of distft's default job on a 0.65M-parameter model (Python, torch, transformers,
# DeepSpeed/gloo, data): measured on CPU ranks here; on GPU the CUDA context and kernels' workspace.
RUNTIME_CPU = 0.50 * GIB
RUNTIME_GPU = 1.0 * GIB
# Saved activations of one Llama block per token, in units of the hidden size (attention inputs,
# normed inputs, q/k/v, attention output, residuals) and of the MLP width (gate, up, act, product).
ACT_PER_HIDDEN = 12
ACT_PER_MLP = 4
STRATEGY_ORDER = AUTO_ORDER
"""Fastest first: what `strategy=auto` tries in turn (the strategies' own order)."""


@dataclass
class Estimate:
    strategy: str
    world: int
    micro: int
    params: float
    grads: float
    optimizer: float
    activations: float
    activations_ckpt: float
    buffers: float
    runtime: float
    checkpointing: bool
    host_offload: float = 0.0
    """Bytes kept in host RAM instead of device memory (zero3_offload on GPU)."""
    notes: list[str] = field(default_factory=list)

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        act = self.activations_ckpt if self.checkpointing else self.activations
        return self.states + act + self.buffers + self.runtime

    def as_dict(self) -> dict:
        keys = ("params", "grads", "optimizer", "activations", "activations_ckpt", "buffers", "runtime")
        out = {k: getattr(self, k) / GIB for k in keys}
        out.update(
            strategy=self.strategy,
            world=self.world,
            micro=self.micro,
            checkpointing=self.checkpointing,
            total_gib=self.total / GIB,
            host_offload_gib=self.host_offload / GIB,
        )
        return out


def activation_bytes(
    shape: ModelShape,
    micro: int,
    seq: int,
    act_bytes: float,
    checkpointing: bool,
    loss_chunks: int = 0,
    cp: int = 1,
    tp: int = 1,
    cp_style: str = "ulysses",
) -> float:
    """Saved activations of one micro-batch on one rank. Context parallelism splits the sequence
    over `cp` ranks and tensor parallelism (with sequence parallelism on norms) a block's
    activations and the vocabulary-sharded logits over `tp`; `loss_chunks` keeps one chunk's logits.
    All-gather context parallelism also keeps each layer's whole-sequence keys and values (ring
    and Ulysses keep only the slice's)."""
    tokens = micro * seq / max(cp, 1)
    kv = shape.kv_heads / max(shape.heads, 1)
    per_layer = tokens * (ACT_PER_HIDDEN * shape.hidden + 2 * kv * shape.hidden) + tokens * (
        ACT_PER_MLP * shape.intermediate
    )
    if cp > 1 and cp_style == "allgather":
        per_layer += (micro * seq - tokens) * 2 * kv * shape.hidden
    per_layer *= act_bytes / max(tp, 1)
    if checkpointing:  # each block keeps its input; one block's activations live during recompute
        blocks = shape.layers * tokens * shape.hidden * act_bytes / max(tp, 1) + per_layer
    else:
        blocks = shape.layers * per_layer
    return blocks + logits_bytes(shape, tokens, act_bytes, loss_chunks) / max(tp, 1)


def logits_bytes(shape: ModelShape, tokens: float, act_bytes: float, loss_chunks: int = 0) -> float:
    """Logits (model dtype), their fp32 copy, log-softmax saved by the loss, and the logits'
    gradient; chunked (`train.loss_chunks`), one chunk's worth at a time plus the final hidden
    states the chunks project."""
    full = tokens * shape.vocab * (act_bytes + 4 + 4 + 4)
    if not loss_chunks:
        return full
    return full / loss_chunks + tokens * shape.hidden * act_bytes


def offload_split(
    shape: ModelShape, micro: int, seq: int, act_bytes: float, checkpointing: bool, **mesh
) -> float:
    """Bytes `train.activation_offload` moves to host memory: the saved block activations (each
    block's input under checkpointing; the recomputed block and the logits stay on the device)."""
    tokens = micro * seq / max(mesh.get("cp", 1), 1)
    if checkpointing:
        return shape.layers * tokens * shape.hidden * act_bytes / max(mesh.get("tp", 1), 1)
    chunks = mesh.get("loss_chunks", 0)
    full = activation_bytes(shape, micro, seq, act_bytes, False, **mesh)
    return full - logits_bytes(shape, tokens, act_bytes, chunks) / max(mesh.get("tp", 1), 1)


def estimate(
    shape: ModelShape,
    strategy,
    world: int,
    micro: int,
    seq: int,
    precision: str = "fp32",
    tuning: str = "full",
    adapter: bool = False,
    checkpointing: bool = False,
    gpu: bool = False,
    ranks_per_node: int = 0,
    loss_chunks: int = 0,
    activation_offload: bool = False,
) -> Estimate:
    """Per-rank bytes of a job under `strategy`: a strategy config (its dataclass) or the name of
    a shipped option. The strategy's `cp` / `tp` degrees (FSDP2 family; 1 when it has none)
    divide the activations and, for tp, the gathered blocks; `ep` the routed experts a block gathers."""
    strategy_cfg = shipped_config(strategy) if isinstance(strategy, str) else strategy
    cp, tp = degrees(strategy_cfg)
    cp_style = getattr(strategy_cfg, "cp_style", "ulysses")
    ep = ep_degree(strategy_cfg)
    job = Job(world, micro, seq, precision, tuning, adapter, checkpointing, gpu, ranks_per_node, tp, ep)
    states = STRATEGIES[strategy_cfg.name].memory(shape, strategy_cfg, job)
    act_bytes = job.compute_bytes
    mesh = {"loss_chunks": loss_chunks, "cp": cp, "tp": tp, "cp_style": cp_style}
    act = {ckpt: activation_bytes(shape, micro, seq, act_bytes, ckpt, **mesh) for ckpt in (False, True)}
    host, notes = states.host_offload, list(states.notes)
    if activation_offload and gpu:  # on CPU host memory is the device memory: nothing moves
        moved = {ckpt: offload_split(shape, micro, seq, act_bytes, ckpt, **mesh) for ckpt in act}
        act = {ckpt: act[ckpt] - moved[ckpt] for ckpt in act}
        host += moved[checkpointing]
        notes.append(
            f"activation offload: {moved[checkpointing] / GIB:.2f} GiB of saved activations in host RAM"
        )
    return Estimate(
        strategy_cfg.name,
        max(world, 1),
        micro,
        states.params,
        states.grads,
        states.optimizer,
        act[False],
        act[True],
        states.buffers,
        RUNTIME_GPU if gpu else RUNTIME_CPU,
        checkpointing,
        host,
        notes,
    )
