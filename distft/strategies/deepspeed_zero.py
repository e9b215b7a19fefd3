"""DeepSpeed ZeRO stages 1-3 (+ CPU offload). The DeepSpeed config is generated from ours and
written to the run dir; there is no second hand-kept JSON."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distft.contracts import Strategy
from distft.errors import ConfigError, DistftError
from distft.perf import warm
from distft.ranges import num
from distft.strategies.memory import States, frozen_bytes, zero3_gathered
from distft.strategies.optim import build_adamw
from distft.strategies.step import BatchGeometry


@dataclass
class ZeroConfig:
    name: str = "zero2"
    """Strategy option (zero1, zero2, zero3, zero3_offload)."""
    stage: int = num(2, ge=1, le=3)
    """ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer states on the host and step there (DeepSpeedCPUAdam)."""
    offload_params: bool = False
    """Stage 3 only: keep parameters on the host between uses."""
    reduce_bucket_size: int | str = num("auto", ge=1, also=("auto",))
    """Elements per gradient reduction bucket (smaller buckets trade speed for memory). auto:
    hidden_size² (at least 2**20); ZeRO-3 then also prefetches 0.9× that, keeps parameters under
    10×hidden_size resident and at most two blocks' parameters gathered, so small models shard too."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward (more buffers, more memory)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged into the generated DeepSpeed config (advanced; printed in ds_config.json)."""


config = ZeroConfig
loads_sharded = False
# Checked with 2 ranks against DDP on the same global batch; ZeRO-1/2 support every tuning mode.
ZERO3_UNSUPPORTED = {
    "dora": "DoRA reads the base weight outside the layer's forward, which ZeRO-3 has already released "
    "(empty tensors in backward)",
    "ia3": "ZeRO-3 never gathers the IA3 scales (read from a ParameterDict, not through a forward)",
    "prefix": "the prefix encoder is not sharded with the model (ZeRO-3 losses differ from DDP's)",
}


def validate(cfg, gpu: bool) -> None:
    s = cfg.strategy
    if s.stage not in (1, 2, 3):
        raise ConfigError(f"strategy.stage={s.stage}; valid: 1, 2, 3")
    if s.offload_params and s.stage != 3:
        raise ConfigError("strategy.offload_params=true needs strategy.stage=3 (use zero3_offload)")
    if cfg.train.precision == "fp16" and not gpu:
        raise ConfigError(
            f"train.precision=fp16 with strategy={s.name}: DeepSpeed has no fp16 on CPU. "
            "Use train.precision=bf16 or fp32 on CPU, or run on GPUs (cluster.gpus_per_node>0)"
        )


def supports_tuning(tuning: str, strategy_cfg) -> str | None:
    return ZERO3_UNSUPPORTED.get(tuning) if strategy_cfg.stage == 3 else None


def bucket_sizes(s, model: torch.nn.Module | None) -> dict[str, int]:
    """Bucket and live-parameter limits in elements, sized from the model when `auto`: DeepSpeed's
    defaults (5e7-element buckets, 1e9 live parameters) keep a model of tens of millions of
    parameters gathered whole, and its peak memory then shows little of what sharding saves."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if s.reduce_bucket_size != "auto" or not hidden:
        return sized_buckets(s, hidden, 0)
    from distft.models.layers import decoder_layers

    block = max((sum(numel(p) for p in b.parameters()) for b in decoder_layers(model)), default=0)
    return sized_buckets(s, hidden, block)


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also of one ZeRO-3 partitioned at construction (its data is empty)."""
    return int(getattr(p, "ds_numel", p.numel()))


@contextlib.contextmanager
def partitioned_load(config: dict):
    """Models loaded inside are built under deepspeed.zero.Init (transformers' HfDeepSpeedConfig
    path): every weight is partitioned over the ranks as it is created and only rank 0 reads the
    checkpoint's values (memory-mapped), so no rank holds the whole model in host or device memory.
    Scoped: a model loaded later (the export check on rank 0) must not start collectives."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    deepspeed.init_distributed()  # zero.Init checks the batch sizes against DeepSpeed's world size
    alive = HfDeepSpeedConfig(config)  # transformers keeps only a weak reference
    try:
        yield alive
    finally:
        unset_hf_deepspeed_config()


def sized_buckets(s, hidden: int | None, block: int) -> dict[str, int]:
    """`bucket_sizes` from the model's hidden size and largest block (parameters)."""
    if s.reduce_bucket_size != "auto":
        return {"bucket": int(s.reduce_bucket_size), "persist": 10_000, "live": 1_000_000_000}
    if not hidden:
        return {"bucket": 50_000_000, "persist": 10_000, "live": 1_000_000_000}
    live = min(1_000_000_000, max(2 * block, hidden * hidden)) if block else 1_000_000_000
    return {"bucket": max(hidden * hidden, 2**20), "persist": 10 * hidden, "live": live}


def memory(shape, s, job) -> States:
    """DeepSpeed casts the model to the compute dtype and keeps an fp32 master partition plus
    Adam's two moments (12 B per trainable parameter / N); ZeRO-3 also partitions the weights."""
    n, psi, psi_t = max(job.world, 1), shape.params, shape.trainable
    sizes = sized_buckets(s, shape.hidden, shape.largest_layer)
    params = (
        (frozen_bytes(shape, job) + psi_t * job.compute_bytes) if job.adapter else psi * job.compute_bytes
    )
    if s.stage == 3:
        params /= n
    notes: list[str] = []
    # In fp32 distft points DeepSpeed's master partition at the model's own (share_fp32_master),
    # except with the optimizer offloaded (the master lives in host RAM).
    shared_master = not job.half and not s.offload_optimizer
    optimizer = (8.0 if shared_master else 12.0) * psi_t / n
    if shared_master:
        notes.append("fp32: DeepSpeed's fp32 master partition is the model's own (shared, not copied)")
    # Stage 1 reduces through the same buckets into the owned partition as stage 2 does (the
    # full gradients are released bucket by bucket): measured equal here.
    grads = 4.0 * psi_t / n
    buffers = min(sizes["bucket"], psi_t) * 4.0  # the contiguous gradient reduction bucket
    if s.stage == 3:  # gathered and prefetched weights (stage3_max_live_parameters), embedding, head
        buffers += zero3_gathered(shape, job, sizes["live"])
    out = States(params, grads, optimizer, buffers, notes=notes)
    if s.offload_params and job.gpu:
        out.host_offload = params + grads + optimizer
        out.params = out.grads = out.optimizer = 0.0
        notes.append(f"{s.name}: parameters and optimizer states live in host RAM")
    return out


def ds_config(cfg, geometry: BatchGeometry, model: torch.nn.Module | None = None) -> dict:
    s, t = cfg.strategy, cfg.train
    sizes = bucket_sizes(s, model)
    zero: dict[str, Any] = {
        "stage": s.stage,
        "reduce_bucket_size": sizes["bucket"],
        "overlap_comm": s.overlap_comm,
        "contiguous_gradients": True,
    }
    if s.stage == 3:
        zero["stage3_prefetch_bucket_size"] = int(0.9 * sizes["bucket"])
        zero["stage3_param_persistence_threshold"] = sizes["persist"]
        zero["stage3_max_live_parameters"] = sizes["live"]
        zero["stage3_max_reuse_distance"] = sizes["live"]
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out = {
        "train_micro_batch_size_per_gpu": geometry.micro,
        "gradient_accumulation_steps": geometry.accum,
        "train_batch_size": geometry.global_batch,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    out.update(s.extra)
    return out


def share_fp32_master(zero_optimizer) -> int:
    """In fp32 the model's partition already is the master copy: point DeepSpeed's fp32 master
    partitions at it instead of keeping a clone (4 bytes per parameter / N ranks). ZeRO-3 means
    to share them but compares a torch.device with a string and clones; ZeRO-1/2 always clone.
    The optimizer then updates the partition in place and DeepSpeed's copy back is a self-copy.
    Returns the number of partitions shared."""
    import torch.distributed as tdist

    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        pairs = list(
            zip(zero_optimizer.fp32_partitioned_groups_flat, zero_optimizer.fp16_partitioned_groups_flat)
        )
    elif hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        rank = tdist.get_rank(group=zero_optimizer.dp_process_group)
        bit16 = [groups[rank] for groups in zero_optimizer.parallel_partitioned_bit16_groups]
        pairs = list(zip(zero_optimizer.single_partition_of_fp32_groups, bit16))
    else:
        return 0
    shared = 0
    for master, part in pairs:
        same = master.dtype == part.dtype and master.device == part.device and master.shape == part.shape
        if same and master.data_ptr() != part.data_ptr():
            master.data = part.data
            shared += 1
    if shared:  # each parameter's view of its master fragment (used by checkpoint loading) moves too
        zero_optimizer._link_all_hp_params()
    return shared


class DeepSpeedStrategy(Strategy):
    def __init__(self, cfg, info):
        self.cfg = cfg
        self.info = info
        self.sharded_params = cfg.strategy.stage == 3
        # DeepSpeed divides by accumulation steps and averages over ranks.
        self.loss_scale = float(info.world_size * cfg.train.grad_accum)
        self.adapter_only = False
        self.checkpoint_format = "deepspeed"
        self.load_tag = "deepspeed"  # "deepspeed_universal" after a conversion (prepare_resume)
        self.backward_calls = 0
        # QLoRA comes on the meta device (transformers skips zero.Init for quantized models) and
        # `setup` reads it weight by weight into partitions (distft.models.sharded_load).
        self.loads_quantized_sharded = self.sharded_params

    def prepare_resume(self, path: Path, state: dict) -> None:
        """Before deepspeed.initialize: a checkpoint saved with another world size (or ZeRO stage
        1 ↔ 2, or 3 ↔ 3 with offload) is converted once to DeepSpeed's universal format, which
        loads on any world size; ZeRO-1/2 ↔ 3 is refused with the way out."""
        same_world = state.get("world_size") == self.info.world_size
        same = same_world and state.get("strategy") == self.cfg.strategy.name
        if same or not (path / "deepspeed").is_dir():
            return
        # DeepSpeed stores ZeRO-3 model states per rank (zero_pp_rank_*), ZeRO-1/2 once; its
        # loader (also of universal checkpoints) cannot cross between the two layouts.
        saved_3 = any((path / "deepspeed").glob("zero_pp_rank_*_model_states.pt"))
        if saved_3 != self.sharded_params:
            can = "zero3, zero3_offload" if saved_3 else "zero1, zero2"
            raise ConfigError(
                f"resume: {path} was written by strategy={state.get('strategy')}; DeepSpeed cannot load a "
                f"ZeRO-{'3' if saved_3 else '1/2'} checkpoint into strategy={self.cfg.strategy.name}. "
                f"Resume with {can} (any number of ranks), or start over from its weights: "
                "resume=never model.name_or_path=<the run's export/ directory>"
            )
        universal = path / "deepspeed_universal"
        from distft.runtime.rank0 import on_rank0

        # Rank 0 converts (minutes for a large model) while the others wait on a store key: a
        # barrier would trip the collective timeout.
        on_rank0("universal", lambda: self._convert(path, universal, state), self.info.is_main)
        self.load_tag = "deepspeed_universal"
        self.cfg.strategy.extra = {**self.cfg.strategy.extra, "checkpoint": {"load_universal": True}}

    def _convert(self, path: Path, universal: Path, state: dict) -> None:
        if (universal / "zero").is_dir():
            return
        import subprocess
        import sys

        print(
            f"distft: {path.name} was saved with {state.get('world_size')} ranks "
            f"(strategy={state.get('strategy')}); converting it to a DeepSpeed universal checkpoint "
            f"for {self.info.world_size} ranks",
            flush=True,
        )
        cmd = [sys.executable, "-m", "distft.engine.safe_load", "deepspeed.checkpoint.ds_to_universal"]
        cmd += ["--input_folder", str(path / "deepspeed"), "--output_folder", str(universal)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(
                f"resume: converting {path} to a universal checkpoint failed "
                f"({' '.join(cmd)}):\n{proc.stderr[-2000:]}"
            )

    def setup(self, model: torch.nn.Module) -> None:
        import deepspeed

        from distft.models.sharded_load import is_meta, load_partitioned

        if is_meta(model):
            geometry = BatchGeometry.of(self.cfg, self.info)
            load_partitioned(model, ds_config(self.cfg, geometry), self.info.device)
        self.adapter_only = any(not p.requires_grad for p in model.parameters())
        optimizer = build_adamw(model, self.cfg, cpu_adam=self.cfg.strategy.offload_optimizer)
        self.config = ds_config(self.cfg, BatchGeometry.of(self.cfg, self.info), model)
        warm.deepspeed_muon()  # imported by initialize and each reduction; kernels compiled at import
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config
        )
        self.base_optimizer = optimizer
        self.model = self.engine
        self.module = self.engine.module
        if self.sharded_params:  # generation gathers the weights once per call (not per token)
            from distft.models.generation import register_zero3

            register_zero3(self.module, self.engine)
        if self.cfg.train.precision == "fp32" and not self.cfg.strategy.offload_optimizer:
            share_fp32_master(self.engine.optimizer)

    def write_config(self, run_dir: Path) -> None:
        (run_dir / "ds_config.json").write_text(json.dumps(self.config, indent=2))

    def end_trial(self, micro: int) -> None:
        """The partitioned gradient buffers hold the trial's zeros, which the first step adds to;
        ds_config.json records the confirmed micro-batch."""
        self.backward_calls = 0
        geometry = BatchGeometry.of(self.cfg, self.info, micro)
        self.config["train_micro_batch_size_per_gpu"] = geometry.micro
        self.config["train_batch_size"] = geometry.global_batch

    def load_context(self) -> contextlib.AbstractContextManager:
        """ZeRO-3 on several ranks: models are partitioned as they are built (`partitioned_load`)."""
        if not self.sharded_params or self.info.world_size < 2:
            return contextlib.nullcontext()
        return partitioned_load(ds_config(self.cfg, BatchGeometry.of(self.cfg, self.info)))

    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """ZeRO-3: an optimizer-free engine partitions the frozen model over ranks and gathers it
        layer by layer in forward (what TRL's `prepare_deepspeed` does); ZeRO-1/2: a replica."""
        if not self.sharded_params:
            return model.to(self.info.device).eval()
        import copy

        import deepspeed

        config = copy.deepcopy(self.config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine

    def accumulate(self, is_last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        self.engine.backward(loss)
        self.backward_calls += 1
        if not is_last:
            self.engine.step()  # a micro step: DeepSpeed only accumulates

    def _check_accumulation(self) -> None:
        """DeepSpeed applies its update at every gradient_accumulation_steps-th backward: a step
        must have made exactly that many, or its boundary drifts from ours."""
        calls, self.backward_calls = self.backward_calls, 0
        if calls != self.cfg.train.grad_accum:
            raise DistftError(
                f"DeepSpeed step after {calls} backward calls; it needs exactly train.grad_accum="
                f"{self.cfg.train.grad_accum} per optimizer step (one per micro-batch)"
            )

    def step(self) -> float:
        # DeepSpeed skips a step whose global gradient norm is not finite (ZeRO-1/2 in fp32 and in
        # bf16 with its default check_grad_overflow, ZeRO-3 always) and reports the norm as inf;
        # the trainer's guard then counts the skip. Should a DeepSpeed version apply such a step,
        # the weights are already lost: stop rather than train on.
        self._check_accumulation()
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        norm = float(norm)
        if not math.isfinite(norm) and self.engine.was_step_applied():
            raise DistftError(
                f"DeepSpeed applied an optimizer step with gradient norm {norm}: the weights are no "
                "longer finite. Keep strategy.extra.bf16.check_grad_overflow=true (DeepSpeed's default)"
            )
        return norm

    def set_lr(self, lr: float) -> None:
        for g in self.base_optimizer.param_groups:
            g["lr"] = lr

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(
            str(path),
            tag="deepspeed",
            client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}},
            save_latest=False,  # checkpoints/latest is ours, written after every rank finished
            exclude_frozen_parameters=self.adapter_only,
        )

    def load(self, path: Path) -> None:
        # DeepSpeed unpickles its files with weights_only=False: checkpoint.load calls this inside
        # safe_load.weights_only_loads(), which makes every such load weights-only.
        self.engine.load_checkpoint(str(path), tag=self.load_tag, load_module_strict=not self.adapter_only)
        if self.load_tag != "deepspeed":  # a later load (best checkpoint) is one this run wrote
            self.engine._config.load_universal_checkpoint = False
            self.load_tag = "deepspeed"

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 (gathered under ZeRO-3), empty elsewhere; a collective."""
        if self.cfg.strategy.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return {k: v.detach().cpu() for k, v in sd.items()} if self.info.is_main else {}
        if not self.info.is_main:
            return {}
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}


def make(cfg, info) -> DeepSpeedStrategy:
    return DeepSpeedStrategy(cfg, info)
