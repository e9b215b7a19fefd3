"""Per-rank memory of a training job, by parts, for one strategy and world size.

Model states follow what distft's strategies actually allocate (not only the ZeRO paper's 16 B per
parameter): fp32 weights for full fine-tuning (autocast or FSDP2's policy makes the bf16 copies),
DeepSpeed's fp32 master partition (in fp32 the model's own partition: distft shares it)
and its reduction bucket, FSDP2 / ZeRO-3 gathering a block (and prefetching the next). Activations
are counted per micro-batch for a Llama-style block, with and without gradient checkpointing;
the logits and the loss's fp32 copies are counted apart because a large vocabulary makes them the
biggest single item. The runtime (interpreter, libraries, CUDA context) is a measured constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distft.plan.shape import ModelShape

GIB = 2**30
# Peak RSS of distft's default job on a 0.65M-parameter model (Python, torch, transformers,
# DeepSpeed/gloo, data): measured on CPU ranks here; on GPU the CUDA context and kernels' workspace.
RUNTIME_CPU = 0.50 * GIB
RUNTIME_GPU = 1.0 * GIB
NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4-bit weights + 8-bit absmax per 64 + fp32 per 256 blocks
# Saved activations of one Llama block per token, in units of the hidden size (attention inputs,
# normed inputs, q/k/v, attention output, residuals) and of the MLP width (gate, up, act, product).
ACT_PER_HIDDEN = 12
ACT_PER_MLP = 4
STRATEGY_ORDER = ["ddp", "zero1", "zero2", "fsdp", "zero3", "zero3_offload"]
"""Fastest first: what `strategy=auto` tries in turn (replicas avoid parameter gathers)."""


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


def activation_bytes(shape: ModelShape, micro: int, seq: int, act_bytes: float, checkpointing: bool) -> float:
    tokens = micro * seq
    kv = shape.kv_heads / max(shape.heads, 1)
    per_layer = tokens * (ACT_PER_HIDDEN * shape.hidden + 2 * kv * shape.hidden) + tokens * (
        ACT_PER_MLP * shape.intermediate
    )
    per_layer *= act_bytes
    if checkpointing:  # each block keeps its input; one block's activations live during recompute
        blocks = shape.layers * tokens * shape.hidden * act_bytes + per_layer
    else:
        blocks = shape.layers * per_layer
    # Logits (model dtype), their fp32 copy, log-softmax saved by the loss, and the logits' gradient.
    logits = tokens * shape.vocab * (act_bytes + 4 + 4 + 4)
    return blocks + logits


def estimate(
    shape: ModelShape,
    strategy: str,
    world: int,
    micro: int,
    seq: int,
    precision: str = "fp32",
    tuning: str = "full",
    adapter: bool = False,
    checkpointing: bool = False,
    gpu: bool = False,
    reduce_bucket: int = 50_000_000,
    stage: int | None = None,
    live: int = 1_000_000_000,
) -> Estimate:
    """Per-rank bytes of a job; `stage` overrides the ZeRO stage implied by the strategy name;
    `reduce_bucket` and `live` are DeepSpeed's bucket and live-parameter limits in elements."""
    n = max(world, 1)
    psi, psi_t = shape.params, shape.trainable
    half = precision in ("bf16", "fp16")
    compute = 2.0 if half else 4.0
    notes: list[str] = []
    # Weights as loaded: full fine-tuning keeps fp32 weights (autocast or the sharding policy makes
    # the bf16 copies); adapters load the frozen base in the compute dtype and keep fp32 adapters;
    # QLoRA packs the linear weights in 4 bits.
    if not adapter:
        frozen = 0.0
    elif tuning == "qlora":
        frozen = (psi - psi_t - shape.quantizable) * compute + shape.quantizable * NF4_BYTES
    else:
        frozen = (psi - psi_t) * compute
    weights = frozen + 4.0 * psi_t
    block = shape.largest_layer * (NF4_BYTES if tuning == "qlora" else compute)  # one gathered block
    if stage is None:
        stage = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}.get(strategy)

    buffers = 0.0
    if strategy == "ddp":
        params, grads, optimizer = weights, 4.0 * psi_t, 8.0 * psi_t
        if half and not adapter:
            buffers += 2.0 * (psi - shape.embedding)  # autocast's bf16 weight cache, forward to backward
    elif strategy == "fsdp":
        params, grads, optimizer = weights / n, 4.0 * psi_t / n, 8.0 * psi_t / n
        if n > 1 or half:
            # Gathered blocks (the current one and the prefetched next), the root (embedding, head,
            # final norm) gathered for the whole forward, and a block's unsharded gradients.
            root = max(psi - shape.layers * shape.largest_layer, 0) * compute
            buffers += 2 * block + root + 4.0 * shape.largest_layer * psi_t / max(psi, 1)
    elif stage in (1, 2, 3):
        # DeepSpeed casts the model to the compute dtype and keeps an fp32 master partition plus
        # Adam's two moments: 12 B per trainable parameter / N.
        params = (frozen + psi_t * compute) if adapter else psi * compute
        if stage == 3:
            params /= n
        # In fp32 distft points DeepSpeed's master partition at the model's own (share_fp32_master),
        # except with the optimizer offloaded (the master lives in host RAM).
        shared_master = not half and strategy != "zero3_offload"
        optimizer = (8.0 if shared_master else 12.0) * psi_t / n
        if shared_master:
            notes.append("fp32: DeepSpeed's fp32 master partition is the model's own (shared, not copied)")
        # Stage 1 reduces through the same buckets into the owned partition as stage 2 does (the
        # full gradients are released bucket by bucket): measured equal here.
        grads = 4.0 * psi_t / n
        buffers += min(reduce_bucket, psi_t) * 4.0  # the contiguous gradient reduction bucket
        if stage == 3:
            # gathered and prefetched weights, up to stage3_max_live_parameters
            buffers += max(2 * block, min(live, psi) * compute)
    else:
        raise ValueError(f"no memory model for strategy {strategy!r}")

    act_bytes = 2.0 if half else 4.0
    act = activation_bytes(shape, micro, seq, act_bytes, checkpointing=False)
    act_ckpt = activation_bytes(shape, micro, seq, act_bytes, checkpointing=True)
    host = 0.0
    if strategy == "zero3_offload" and gpu:
        host = params + grads + optimizer
        params, grads, optimizer = 0.0, 0.0, 0.0
        notes.append("zero3_offload: parameters and optimizer states live in host RAM")
    runtime = RUNTIME_GPU if gpu else RUNTIME_CPU
    return Estimate(
        strategy,
        n,
        micro,
        params,
        grads,
        optimizer,
        act,
        act_ckpt,
        buffers,
        runtime,
        checkpointing,
        host,
        notes,
    )
