"""The training loop: global batches → method.train_step (one optimizer step) → log → eval → save.

`Trainer.build` assembles the pieces picked from registries; `Trainer.train` runs the loop and
hands the end of the run (final eval, best reload, test, export, report) to `distft.engine.finish`.
The loop knows no method, tuning or strategy by name, and calls only what `distft.contracts`
declares.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from distft.contracts import Method, MethodContext, Strategy, Tuning
from distft.data.pipeline import PreparedData, prepare_cached
from distft.data.sampler import GlobalBatchSampler, make_sampler
from distft.engine import build, checkpoint, fingerprint, finish, guard, run_info
from distft.engine.evaluation import held_out_loss
from distft.engine.metrics import MetricsLogger
from distft.engine.schedule import lr_schedule
from distft.eval.early_stop import BestTracker
from distft.methods import METHODS
from distft.methods.frozen import frozen_loader
from distft.models import load_tokenizer, resolve_model_path
from distft.models.tiny import random_base_warning
from distft.parallel import tp
from distft.perf import precision as matmul_precision
from distft.perf import warm
from distft.perf.mfu import MfuMeter, peak_memory_gib
from distft.runtime import dist, preflight, stop
from distft.strategies import STRATEGIES
from distft.strategies.step import BatchGeometry, StepResult, optimizer_step
from distft.tuning import TUNINGS


@dataclasses.dataclass
class Trainer:
    cfg: object
    info: dist.DistInfo
    run_dir: Path
    tokenizer: object
    method: Method
    tuning: Tuning
    strategy: Strategy
    data: PreparedData
    geometry: BatchGeometry
    sampler: GlobalBatchSampler
    total_steps: int
    lr_at: Callable[[int], float]
    logger: MetricsLogger | None
    model_path: str
    start_step: int = 0
    notes: list = dataclasses.field(default_factory=list)
    tracker: BestTracker = dataclasses.field(default_factory=BestTracker)
    last_eval: tuple | None = None  # (logged row, method metrics) of the latest periodic eval
    saved_step: int | None = None  # a best-checkpoint save and a save_every save may coincide
    perf: MfuMeter | None = None
    resume_path: Path | None = None  # resolved (and manifest-checked) before the strategy is built
    bad_steps: guard.BadStepGuard | None = None
    ctx: MethodContext | None = None
    ckpt: checkpoint.Checkpointer | None = None  # saves, seals, finds this run's checkpoints
    fingerprint: dict | None = None  # what this run's checkpoints record (distft.engine.fingerprint)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, cfg, composed=None) -> Trainer:
        info = dist.init(cfg.cluster.timeout_s)
        info = dataclasses.replace(info, replica_ranks=tp.degree(cfg))  # [tp] ranks of one replica
        run_dir, ckpt, resume_path, run_fingerprint = build.open_run(cfg, composed, info)
        preflight.run(cfg, info, run_dir)  # report, stop-signal handler, hang stack dumps
        build.seed(cfg.train.seed)
        matmul_precision.configure(cfg.train.tf32, info.device)  # TF32 for fp32 on CUDA

        warm.model_stack(cfg)  # every rank imports in parallel, not after rank 0 built the tiny base
        model_path = resolve_model_path(cfg, run_dir, info)
        tokenizer = load_tokenizer(model_path, cfg)
        method: Method = METHODS[cfg.method.name](cfg, tokenizer)
        tuning: Tuning = TUNINGS[cfg.tuning.name]
        if info.is_main and (warning := random_base_warning(cfg, tuning.adapter)):
            print(warning, file=sys.stderr, flush=True)
        data = prepare_cached(cfg, method, tokenizer, run_dir, info.is_main)
        method.on_data(data)
        auto_micro = cfg.train.micro_batch_size == "auto"
        if auto_micro:  # the planner's estimate now, confirmed by a trial step once the strategy exists
            from distft.plan.auto import estimate_micro_batch

            cfg.train.micro_batch_size = estimate_micro_batch(cfg, data.train, info.world_size)
        option = STRATEGIES[cfg.strategy.name]
        strategy = option.make(cfg, info)
        model = build.model(cfg, info, method, tuning, model_path, strategy)  # sharded where it can be
        saved = checkpoint.read_state(resume_path) if resume_path is not None else {}
        run_fingerprint["params"] = fingerprint.check_params(model, saved, resume_path, run_dir)
        perf = build.mfu_meter(cfg, info, model, data, method)
        if resume_path is not None:
            checkpoint.check_compatible(strategy, saved, resume_path, cfg.strategy.name)
            strategy.prepare_resume(resume_path, saved)
        strategy.setup(model)
        if auto_micro:
            from distft.plan.auto import confirm_micro_batch

            confirm_micro_batch(cfg, info, method, strategy, data.train, run_dir)
        if info.is_main:
            strategy.write_config(run_dir)

        geometry = BatchGeometry.of(cfg, info)
        sampler = make_sampler(cfg, data, geometry.global_batch, saved.get("step", 0), saved)
        t = cfg.train
        total = t.max_steps or max(1, math.ceil(t.epochs * sampler.steps_per_epoch))
        parts = (cfg, info, run_dir, tokenizer, method, tuning, strategy, data, geometry, sampler, total)
        trainer = cls(
            *parts, lr_schedule(cfg, total), None, model_path, perf=perf, resume_path=resume_path, ckpt=ckpt
        )
        trainer.tracker = BestTracker.from_config(cfg)
        trainer.fingerprint = run_fingerprint
        trainer.bad_steps = guard.BadStepGuard(t.max_bad_steps, scaler=guard.LossScaleWatch.of(strategy))
        trainer.ctx = trainer.method_context()
        method.setup(trainer.ctx)  # extra models (reference, critic), precomputation
        trainer._maybe_resume()
        run_info.write(cfg, info, run_dir, resume_path)
        trainer.logger = MetricsLogger(cfg, run_dir, info.is_main, trainer.start_step)
        return trainer

    def method_context(self) -> MethodContext:
        """The narrow view of this run that the method gets."""
        return MethodContext(
            cfg=self.cfg,
            info=self.info,
            tokenizer=self.tokenizer,
            strategy=self.strategy,
            tuning=self.tuning,
            data=self.data,
            geometry=self.geometry,
            sampler=self.sampler,
            lr_at=self.lr_at,
            run_dir=self.run_dir,
            model_path=self.model_path,
            resume_path=self.resume_path,
            run_step=self.run_step,
            load_frozen=frozen_loader(self.cfg, self.info, self.strategy),
            fault_hook=lambda step: lambda loss: guard.inject_nan(loss, step, self.info.rank),
        )

    def run_step(self, batches: list[dict], loss_fn, lr: float | None, **options) -> StepResult:
        """One optimizer step of `loss_fn` over `batches` under the run's strategy."""
        return optimizer_step(self.strategy, batches, loss_fn, self.info.device, lr, **options)

    def _maybe_resume(self) -> None:
        path = self.resume_path
        if path is None:
            return
        state = checkpoint.load(self.strategy, path, self.info)
        self.bad_steps.skipped = state.get("skipped_steps", 0)
        self.method.load_state(path)  # state of extra models
        self.start_step = state["step"]
        self.tracker.load(state.get("early_stopping"))
        if state.get("total_steps") not in (None, self.total_steps):
            note = (
                f"resumed at step {self.start_step} with a new total of {self.total_steps} steps "
                f"(was {state['total_steps']}): the LR schedule is recomputed for the new total"
            )
            self.notes.append(note)
            if self.info.is_main:
                with open(self.run_dir / "notes.txt", "a") as f:
                    f.write(note + "\n")
        if self.info.is_main:
            print(f"distft: resumed from {path} at step {self.start_step}", flush=True)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        info, t = self.info, self.cfg.train
        summary: dict = {"run_dir": str(self.run_dir)}
        if self.start_step == 0:
            before = self.method.evaluate(
                self.strategy.module, self.data.val_rows, info, self.strategy.sharded_params
            )
            summary["before"] = before
            if before:
                self.logger.log(0, {f"eval/{k}": v for k, v in before.items()})
        bar = build.progress(self.total_steps, self.start_step, info.is_main and t.progress)
        last_loss = float("nan")
        window = [0.0, time.perf_counter()]  # tokens and start time of the logging window
        stop_at = self.tracker.stopped_step or self.total_steps  # a resumed early-stopped run
        for step in range(self.start_step, stop_at):
            guard.inject_sleep(step, info.rank)  # no-op unless DISTFT_FAULT_SLEEP
            result = self.train_step(step)
            done = step + 1
            # loss is all-reduced and the grad norm global: every rank takes the same decision.
            ids = self.sampler.global_indices(step)
            if self.bad_steps.check(done, result.loss, result.grad_norm, ids, self._last_good):
                if info.is_main:
                    print(
                        f"distft: step {done} skipped: loss={result.loss}, grad_norm={result.grad_norm}",
                        flush=True,
                    )
            else:
                last_loss = result.loss
            window[0] += result.tokens
            if done % t.log_every == 0 or done == self.total_steps:
                self._log_step(step, result, window, bar)
            if bar is not None:
                bar.update(1)
            if t.eval_every and done % t.eval_every == 0 and done != self.total_steps:
                if self.validate(done):  # early stopping: no improvement for eval.patience evals
                    break
            if t.save_every and done % t.save_every == 0 and done != self.total_steps:
                self.save(done)
            preflight.kick()
            if done != self.total_steps and stop.agreed(info.device):
                # A stop signal (e.g. SLURM's pre-timeout warning) reached a rank: all checkpoint, leave.
                if not (t.save_every and done % t.save_every == 0):
                    self.save(done)
                self.ckpt.wait_pending()
                self.logger.close()
                raise stop.StopRequested(done)
        if bar is not None:
            bar.close()
        return finish.finish(self, summary, last_loss)

    def train_step(self, step: int) -> StepResult:
        """One engine step: the method's (by default one optimizer step over a global batch)."""
        return self.method.train_step(self.ctx, step)

    def _log_step(self, step: int, result: StepResult, window: list, bar) -> None:
        info = self.info
        tokens_per_s = window[0] / max(time.perf_counter() - window[1], 1e-9)
        row = {
            "loss": result.loss,
            "lr": self.lr_at(step),
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": self.perf.mfu(tokens_per_s) if self.perf else None,
            "mem_gib": peak_memory_gib(info.device),  # this rank's peak so far
            "time": time.time(),
            "epoch": self.sampler.epoch(step),
            "skipped_steps": self.bad_steps.skipped,
            **self.data.metrics,  # packing/efficiency
            **result.metrics,
        }
        self.logger.log(step + 1, row)
        if bar is not None:
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}")
        window[0], window[1] = 0.0, time.perf_counter()

    def validate(self, step: int) -> bool:
        """Val loss and the method's eval metrics, logged; tracks the best step (saved when
        train.export=best). True when early stopping says stop."""
        row, metrics = self.eval_split(self.data.val, self.data.val_rows, "eval/")
        self.last_eval = (row, metrics)
        self.logger.log(step, row)
        if self.track(step, row) and self.cfg.train.export == "best":
            self.save(step)
            self.ckpt.mark_best(step)
        return self.tracker.should_stop(step)

    def track(self, step: int, row: dict) -> bool:
        t, e = self.cfg.train, self.cfg.eval
        if not row or (self.tracker.monitor not in row and not (e.patience or t.export == "best")):
            return False  # nothing to track (no val split, or an optional metric this method lacks)
        return self.tracker.update(step, row)

    def eval_split(self, examples: list, rows: list, prefix: str) -> tuple[dict, dict]:
        out = self.eval_loss(examples, prefix)
        metrics = self.method.evaluate(self.strategy.module, rows, self.info, self.strategy.sharded_params)
        out.update({f"{prefix}{k}": v for k, v in metrics.items()})
        return out, metrics

    def eval_loss(self, examples: list | None = None, prefix: str = "eval/") -> dict:
        """Loss over a whole held-out split (val by default), normalized by its target tokens."""
        val = self.data.val if examples is None else examples
        return held_out_loss(self.method, self.strategy, val, self.info, self.geometry.micro, prefix)

    def save(self, step: int) -> Path:
        if step == self.saved_step:
            return checkpoint.checkpoints_dir(self.run_dir) / f"step_{step}"
        self.saved_step = step
        state = {
            "step": step,
            "total_steps": self.total_steps,
            "world_size": self.info.world_size,
            "global_batch": self.sampler.global_batch,
            "examples_seen": step * self.sampler.global_batch,
            "strategy": self.cfg.strategy.name,
            "tuning": self.cfg.tuning.name,
            "early_stopping": self.tracker.state(),
            "skipped_steps": self.bad_steps.skipped,
            "fingerprint": self.fingerprint,
            **self.sampler.checkpoint_state(),  # data.streaming: every lane's position
        }
        extra = self.method.save_state  # state of extra models (a no-op for most methods)
        return self.ckpt.save(self.strategy, step, state, extra)

    def _last_good(self) -> str | None:
        path = checkpoint.latest(self.run_dir)
        return str(path) if path is not None else None
