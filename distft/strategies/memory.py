"""The model-state part of the memory planner that depends on the strategy: each strategy
option's `memory(shape, strategy_cfg, job)` returns the `States` one rank holds (weights,
gradients, optimizer states, its own buffers); distft.plan adds activations and the runtime.

Model states follow what distft's strategies actually allocate (not only the ZeRO paper's 16 B per
parameter): fp32 weights for full fine-tuning (autocast or FSDP2's policy makes the bf16 copies),
DeepSpeed's fp32 master partition (in fp32 the model's own partition: distft shares it) and its
reduction bucket, FSDP2 / ZeRO-3 gathering a block (and prefetching the next).
"""

from __future__ import annotations

from dataclasses import dataclass, field

NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4-bit weights + 8-bit absmax per 64 + fp32 per 256 blocks


@dataclass
class Job:
    """What a memory estimate is for, beside the model shape and the strategy's config."""

    world: int
    micro: int
    seq: int
    precision: str = "fp32"
    tuning: str = "full"
    adapter: bool = False
    checkpointing: bool = False
    gpu: bool = False
    ranks_per_node: int = 0
    """Ranks of one node (0: all ranks on one node); a hybrid-sharding group's default size."""

    @property
    def half(self) -> bool:
        return self.precision in ("bf16", "fp16")

    @property
    def compute_bytes(self) -> float:
        return 2.0 if self.half else 4.0

    @property
    def quantized(self) -> bool:
        return self.tuning == "qlora"


@dataclass
class States:
    """Per-rank bytes of model states and strategy buffers."""

    params: float
    grads: float
    optimizer: float
    buffers: float = 0.0
    host_offload: float = 0.0
    """Bytes kept in host RAM instead of device memory (parameter / optimizer offload on GPU)."""
    notes: list[str] = field(default_factory=list)


def frozen_bytes(shape, job: Job) -> float:
    """The frozen base of an adapter run as loaded: the compute dtype, QLoRA's linears in 4 bits."""
    psi, psi_t = shape.params, shape.trainable
    if not job.adapter:
        return 0.0
    if job.quantized:
        return (psi - psi_t - shape.quantizable) * job.compute_bytes + shape.quantizable * NF4_BYTES
    return (psi - psi_t) * job.compute_bytes


def weight_bytes(shape, job: Job) -> float:
    """Weights as loaded: full fine-tuning keeps fp32 weights (autocast or the sharding policy
    makes the bf16 copies); adapters load the frozen base in the compute dtype, fp32 adapters."""
    return frozen_bytes(shape, job) + 4.0 * shape.trainable


def block_bytes(shape, job: Job) -> float:
    """One gathered block (what FSDP2 / ZeRO-3 hold unsharded at a time)."""
    return shape.largest_layer * (NF4_BYTES if job.quantized else job.compute_bytes)


def replicated(shape, job: Job) -> States:
    """Full replicas (DDP): weights, fp32 gradients and Adam's two moments on every rank."""
    psi, psi_t = shape.params, shape.trainable
    buffers = 0.0
    if job.half and not job.adapter:
        buffers += 2.0 * (psi - shape.embedding)  # autocast's bf16 weight cache, forward to backward
    return States(weight_bytes(shape, job), 4.0 * psi_t, 8.0 * psi_t, buffers)


def fully_sharded(shape, job: Job, n: int) -> States:
    """FSDP2 over `n` ranks: weights, gradients and Adam sharded; gathered blocks as buffers."""
    psi, psi_t = shape.params, shape.trainable
    buffers = 0.0
    if n > 1 or job.half:
        # Gathered blocks (the current one and the prefetched next), the root (embedding, head,
        # final norm) gathered for the whole forward, and a block's unsharded gradients.
        root = max(psi - shape.layers * shape.largest_layer, 0) * job.compute_bytes
        buffers += 2 * block_bytes(shape, job) + root + 4.0 * shape.largest_layer * psi_t / max(psi, 1)
    return States(weight_bytes(shape, job) / n, 4.0 * psi_t / n, 8.0 * psi_t / n, buffers)
