"""The model-state part of the memory planner that depends on the strategy: each strategy
option's `memory(shape, strategy_cfg, job)` returns the `States` one rank holds (weights,
gradients, optimizer states, its own buffers); distft.plan adds activations and the runtime.

Model states follow what distft's strategies actually allocate (not only the ZeRO paper's 16 B per
parameter): fp32 weights for full fine-tuning (autocast or FSDP2's policy makes the bf16 copies),
DeepSpeed's fp32 master partition (in fp32 the model's own partition: distft shares it) and its
reduction bucket, FSDP2 / ZeRO-3 gathering a block (and prefetching the next), and the embedding
and LM head gathered whole (FSDP2's root group; ZeRO-3's largest module).
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
    tp: int = 1
    """Tensor-parallel degree (FSDP2 family): a gathered block is 1/tp of the block."""
    ep: int = 1
    """Expert-parallel degree (FSDP2 family, MoE): a block gathers 1/ep of its routed experts."""

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


def gathered_layer(shape, job: Job) -> float:
    """Parameters of the biggest block that a rank gathers: under expert parallelism only its own
    ep group's share of the routed experts (the rest live on the other ranks of the group)."""
    experts = getattr(shape, "expert_block", 0)
    return shape.largest_layer - experts + experts / max(job.ep, 1)


def block_bytes(shape, job: Job) -> float:
    """One gathered block (what FSDP2 / ZeRO-3 hold unsharded at a time; 1/tp of it under TP)."""
    return gathered_layer(shape, job) * (NF4_BYTES if job.quantized else job.compute_bytes) / max(job.tp, 1)


def root_params(shape) -> int:
    """Parameters outside the repeated blocks: the embedding, the LM head (when not tied), the final
    norm. FSDP2 gathers them as the root's group for the whole forward."""
    return max(shape.params - shape.layers * shape.largest_layer, 0)


def zero3_gathered(shape, job: Job, live: int) -> float:
    """ZeRO-3's gathered parameters: prefetched blocks up to `live` elements, or the largest
    single module (the embedding or LM head, gathered whole) with its unpartitioned gradient
    while the head runs in backward (trainable in full tuning) - DeepSpeed's estimator counts
    the latter as 4 bytes per parameter of that module."""
    blocks = max(2 * block_bytes(shape, job), min(live, shape.params) * job.compute_bytes)
    grad = job.compute_bytes if not job.adapter else 0.0
    return max(blocks, shape.largest_module * (job.compute_bytes + grad))


def replicated(shape, job: Job) -> States:
    """Full replicas (DDP): weights, fp32 gradients and Adam's two moments on every rank."""
    psi, psi_t = shape.params, shape.trainable
    buffers = 0.0
    if job.half and not job.adapter:
        buffers += 2.0 * (psi - shape.embedding)  # autocast's bf16 weight cache, forward to backward
    return States(weight_bytes(shape, job), 4.0 * psi_t, 8.0 * psi_t, buffers)


def fully_sharded(shape, job: Job, n: int) -> States:
    """FSDP2 over `n` ranks: weights, gradients and Adam sharded; gathered blocks as buffers.
    Expert parallelism keeps the states at 1/n (a rank holds 1/ep of the experts, FSDP2-sharded
    over the n/ep copies) and shrinks the gathered blocks (gathered_layer)."""
    psi, psi_t = shape.params, shape.trainable
    buffers = 0.0
    if n > 1 or job.half:
        # Gathered blocks (the current one and the prefetched next), the root (embedding, head,
        # final norm) gathered for the whole forward, and a block's unsharded gradients.
        # Full tuning also holds the root's unsharded gradients (embedding and head) until the
        # root's reduce-scatter at the end of backward.
        # Tensor parallelism splits the blocks and the embedding / head (vocabulary-parallel) alike.
        tp = max(job.tp, 1)
        root = root_params(shape) * job.compute_bytes / tp
        grads = 4.0 * (gathered_layer(shape, job) + root_params(shape)) / tp * psi_t / max(psi, 1)
        buffers += 2 * block_bytes(shape, job) + root + grads
    return States(weight_bytes(shape, job) / n, 4.0 * psi_t / n, 8.0 * psi_t / n, buffers)
