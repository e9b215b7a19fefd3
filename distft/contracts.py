"""The contracts between the engine and its parts: `Method`, `Strategy` (the object a strategy
option makes), `StrategyOption` and `Tuning` (the registered modules), and `MethodContext`, the
narrow view of a run a method gets instead of the Trainer.

The engine calls only what is declared here; optional hooks have no-op defaults in the base
classes (`Method`, `Strategy`), so a new method or strategy implements what it needs and the
engine never probes with hasattr. Registries (`METHODS`, `STRATEGIES`, `TUNINGS`) are typed with
these. This module imports nothing from the project but the runtime layer's types.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:  # types only: the contracts sit below every layer that implements them
    import torch

    from distft.runtime.dist import DistInfo


@dataclass(frozen=True)
class BatchGeometry:
    """How a global batch is cut: `micro` examples per micro-batch, `accum` micro-batches per rank
    and step, over `dp` data-parallel ranks (only they split the batch: context- or
    tensor-parallel ranks of one replica see the same examples)."""

    micro: int
    accum: int
    dp: int
    group: int = 1
    """Ranks per data-parallel index (context × tensor degree): neighbours in rank order."""

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.dp

    @property
    def unit(self) -> int:
        """The smallest global batch with one example per micro-batch of every rank."""
        return self.accum * self.dp

    def dp_rank(self, rank: int) -> int:
        """The data-parallel index of `rank` (the mesh puts a context/tensor group's ranks together)."""
        return rank // self.group

    def round_down(self, examples: int) -> int:
        """`examples` rounded down to a multiple of `unit` (at least one unit)."""
        return max(self.unit, examples - examples % self.unit)

    @classmethod
    def of(cls, cfg, info, micro: int | None = None) -> BatchGeometry:
        t, s = cfg.train, cfg.strategy
        group = int(getattr(s, "cp", 1) or 1) * int(getattr(s, "tp", 1) or 1)  # FSDP2 family's mesh
        micro = int(t.micro_batch_size if micro is None else micro)
        return cls(micro, int(t.grad_accum), max(info.world_size // group, 1), group)


@dataclass
class StepResult:
    """What one engine step reports: the loss (normalized over the step's global targets),
    non-padding tokens over all ranks, the global gradient norm and the method's metrics."""

    loss: float
    tokens: int
    grad_norm: float
    metrics: dict[str, float] = field(default_factory=dict)
    parts: dict[str, list[float]] = field(default_factory=dict)
    """This rank's metric (sum, count) pairs, before reduction (for callers that reduce later)."""


class Strategy:
    """A built strategy: wraps the model and runs backward, step, save and load on it.

    Required: `setup`, `accumulate`, `backward`, `step`, `set_lr`, `save`, `load`,
    `full_state_dict`, `place_frozen`; attributes `model` (what forward is called on), `module`
    (the unwrapped model), `sharded_params`, `loss_scale` and `checkpoint_format`."""

    model: torch.nn.Module
    module: torch.nn.Module
    sharded_params: bool
    """Parameters are sharded: every rank must take part in every forward (generation syncs)."""
    loss_scale: float
    """Factor on a loss normalized by the global target count so that the strategy's gradient
    reduction (mean over ranks, DeepSpeed also over accumulation steps) yields the global mean."""
    checkpoint_format: str
    async_save: bool = False
    """`save_async(path)` exists: stage to host memory, write in the background (returns a future)."""

    def setup(self, model: torch.nn.Module) -> None:
        raise NotImplementedError

    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        raise NotImplementedError

    def step(self) -> float:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict:
        raise NotImplementedError

    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (reference, teacher, reward model) placed as this strategy places the
        policy: sharded where it shards parameters, a replica on each rank otherwise."""
        raise NotImplementedError

    loads_sharded: bool = False
    """The model (and frozen models) may come on the meta device: setup / place_frozen read only
    this rank's shards (distft.models.sharded_load)."""

    # ---- optional hooks (defaults: nothing to do)
    def load_context(self) -> contextlib.AbstractContextManager:
        """The context models are loaded in (ZeRO-3: partitioned at construction)."""
        return contextlib.nullcontext()

    def prepare_resume(self, path: Path, state: dict) -> None:
        """Before `setup` when resuming from `path` (e.g. a checkpoint format conversion)."""

    def write_config(self, run_dir: Path) -> None:
        """Rank 0, after setup: the strategy's own config file in the run dir, if it has one."""

    def end_trial(self, micro: int) -> None:
        """After the planner's micro-batch trial: drop its gradients, adopt `micro`."""

    def shard_batch(self, batch: dict) -> dict:
        """This rank's part of a collated micro-batch (context parallelism splits each sequence);
        its `num_targets` counts only the targets this rank scores (a whole-row batch, kept whole,
        keeps its count on every rank of the group: distft.parallel.cp)."""
        return batch

    def split(self, batch: dict) -> contextlib.AbstractContextManager:
        """Entered around the loss (forward and backward) of a batch that `shard_batch` returned."""
        return contextlib.nullcontext()


@runtime_checkable
class StrategyOption(Protocol):
    """A registered strategy (a module under distft/strategies): its config, its checks, what it
    supports and costs, and `make`, which builds the `Strategy`."""

    config: type
    loads_sharded: bool
    """Each rank may read only its shards of a model built on the meta device."""

    def validate(self, cfg, gpu: bool) -> None: ...

    def make(self, cfg, info: DistInfo) -> Strategy: ...

    def supports_tuning(self, tuning: str, strategy_cfg) -> str | None:
        """None when tuning mode `tuning` works under this option, else why not (a clause)."""
        ...

    def memory(self, shape, strategy_cfg, job) -> Any:
        """Per-rank model states and buffers (distft.strategies.memory.States) of `job`
        (distft.strategies.memory.Job) on a model of `shape` (distft.plan.shape.ModelShape)."""
        ...


@runtime_checkable
class Tuning(Protocol):
    """A registered tuning mode (a module under distft/tuning): a transform of the model."""

    config: type
    adapter: bool
    """Trains an adapter on a frozen base (loaded in the compute dtype) rather than full weights."""

    def validate(self, cfg) -> None: ...

    def load_kwargs(self, cfg, dtype) -> dict: ...

    def apply(self, model, cfg): ...


@dataclass
class MethodContext:
    """What a method may use of the run (given once to `Method.setup`, and to each
    `Method.train_step`): never the Trainer."""

    cfg: Any
    info: DistInfo
    tokenizer: Any
    strategy: Strategy
    tuning: Tuning
    data: Any
    """distft.data.pipeline.PreparedData: encoded train/val/test examples and held-out rows."""
    geometry: BatchGeometry
    sampler: Any
    """distft.data.sampler.GlobalBatchSampler over the train split (a StreamSampler with data.streaming)."""
    lr_at: Callable[[int], float]
    run_dir: Path
    model_path: str
    resume_path: Path | None
    run_step: Callable[..., StepResult]
    """distft.strategies.step.optimizer_step bound to the run's strategy and device (and the
    engine's fault-injection hook): run_step(batches, loss_fn, lr, **options)."""
    load_frozen: Callable[..., Any]
    """load_frozen(path, auto_class=None, dtype=None) -> a frozen model placed by the strategy
    (see distft.methods.frozen)."""
    fault_hook: Callable[[int], Callable | None] = lambda step: None
    """The engine's fault injection for step `step` (a loss -> loss hook; see distft.engine.guard)."""

    def rank_examples(self, step: int) -> list[list[dict]]:
        """This rank's micro-batches of the step's global batch (examples, not yet collated)."""
        g = self.geometry
        return self.sampler.rank_examples(step, g.dp_rank(self.info.rank), g.dp, g.accum, self.data.train)


class Method:
    """A training method: data encoding, a loss over a collated batch, held-out metrics.

    Required: `config` (its dataclass), `auto_class` (None: AutoModelForCausalLM), `validate`,
    `default_rows`, `encode`, `collate`, `loss`, `evaluate`. Optional hooks below default to
    nothing; `train_step` defaults to one optimizer step of `loss` over the step's batch."""

    config: ClassVar[type]
    auto_class: Any = None
    scored_head: bool = False
    """Its output head runs on the scored tokens only (distft.methods.logprobs): the MFU meter
    counts the head's FLOPs on that share of the tokens."""

    def __init__(self, cfg, tokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer

    @staticmethod
    def validate(cfg) -> None:
        """Config rules of this method (raise ConfigError)."""

    def collate(self, examples: list[dict]) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self, model, rows: list[dict], info: DistInfo, sharded: bool) -> dict:
        return {}

    def train_step(self, ctx: MethodContext, step: int) -> StepResult:
        batches = [self.collate(rows) for rows in ctx.rank_examples(step)]
        return ctx.run_step(batches, self.loss, ctx.lr_at(step), loss_hook=ctx.fault_hook(step))

    # ---- optional hooks (defaults: nothing to do)
    def on_data(self, data) -> None:
        """After the data is encoded, before the model is built (e.g. fix the label set)."""

    def setup(self, ctx: MethodContext) -> None:
        """After the strategy wrapped the model: extra models (reference, critic), precomputation."""

    def save_state(self, path: Path) -> None:
        """State of extra models, into checkpoint `path` (every rank calls it)."""

    def load_state(self, path: Path) -> None:
        """Restore what save_state wrote."""

    def export_extra(self, ctx: MethodContext, out: Path) -> None:
        """Extra models (e.g. a critic) into the export directory."""

    def export_meta(self) -> dict:
        """Extra keys for export/distft_export.json."""
        return {}
