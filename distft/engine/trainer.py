"""The training loop: global batches → method.loss → strategy backward/step → log → eval → save.

`Trainer.build` assembles the pieces picked from registries; `Trainer.train` runs the loop. The
loop knows no method, tuning or strategy by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distft.data.pipeline import prepare_cached
from distft.data.sampler import GlobalBatchSampler
from distft.engine import checkpoint, guard, run_info
from distft.engine.export import export
from distft.engine.metrics import MetricsLogger
from distft.engine.schedule import lr_schedule
from distft.eval.early_stop import BestTracker
from distft.methods import METHODS
from distft.models import load_model, load_tokenizer, resolve_model_path
from distft.models.sharded_load import meta_model
from distft.perf.mfu import MfuMeter, mean_length, peak_memory_gib
from distft.runtime import dist, preflight, stop
from distft.strategies import STRATEGIES
from distft.tuning import TUNINGS

LOAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _default_output_dir() -> str:
    return str(Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))


@dataclasses.dataclass
class Trainer:
    cfg: object
    info: dist.DistInfo
    run_dir: Path
    tokenizer: object
    method: object
    tuning: object
    strategy: object
    data: object
    sampler: GlobalBatchSampler
    total_steps: int
    lr_at: object
    logger: MetricsLogger
    model_path: str
    start_step: int = 0
    notes: list = dataclasses.field(default_factory=list)
    step_metrics: dict = dataclasses.field(default_factory=dict)
    tracker: BestTracker = dataclasses.field(default_factory=BestTracker)
    last_eval: tuple | None = None  # (logged row, method metrics) of the latest periodic eval
    saved_step: int | None = None  # a best-checkpoint save and a save_every save may coincide
    perf: MfuMeter | None = None
    resume_path: Path | None = None  # resolved (and manifest-checked) before the strategy is built
    bad_steps: guard.BadStepGuard | None = None

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, cfg, composed=None) -> Trainer:
        info = dist.init(cfg.cluster.timeout_s)
        run_dir = Path(dist.broadcast_object(cfg.output_dir or _default_output_dir())).resolve()
        cfg.output_dir = str(run_dir)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_config(cfg, composed, run_dir)
        dist.barrier()
        preflight.run(cfg, info, run_dir)  # report, stop-signal handler, hang stack dumps
        _seed(cfg.train.seed)

        model_path = resolve_model_path(cfg, run_dir, info)
        tokenizer = load_tokenizer(model_path, cfg)
        method = METHODS[cfg.method.name](cfg, tokenizer)
        tuning = TUNINGS[cfg.tuning.name]
        data = prepare_cached(cfg, method, tokenizer, run_dir, info.is_main)
        if hasattr(method, "on_data"):  # optional: what the model depends on in the data (labels)
            method.on_data(data)
        auto_micro = cfg.train.micro_batch_size == "auto"
        if auto_micro:  # the planner's estimate now, confirmed by a trial step once the strategy exists
            from distft.plan.auto import estimate_micro_batch

            cfg.train.micro_batch_size = estimate_micro_batch(cfg, data.train, info.world_size)

        load_dtype = torch.float32 if not tuning.adapter else LOAD_DTYPES[cfg.train.precision]
        model = None
        sharded = getattr(STRATEGIES[cfg.strategy.name], "loads_sharded", False)
        if sharded and info.world_size > 1 and not tuning.adapter and method.auto_class is None:
            model = meta_model(model_path, cfg)  # each rank reads only its shards (strategy.setup)
        if model is None:
            model = load_model(
                model_path, cfg, torch.float32, tuning.load_kwargs(cfg, load_dtype), method.auto_class
            )
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
        model = tuning.apply(model, cfg)
        if cfg.train.compile:
            _compile_blocks(model)
        # FLOPs per token from the unwrapped model (sharding hides shapes); mean example length as T.
        seq_len = mean_length(data.train, cfg.data.max_length)
        perf = MfuMeter.for_model(
            model, seq_len, info.device, LOAD_DTYPES[cfg.train.precision], info.world_size
        )
        strategy = STRATEGIES[cfg.strategy.name].make(cfg, info)
        resume_path = checkpoint.resolve_resume(cfg.resume, run_dir)
        if resume_path is not None:
            saved = checkpoint.read_state(resume_path)
            checkpoint.check_compatible(strategy, saved, resume_path, cfg.strategy.name)
            if hasattr(strategy, "prepare_resume"):  # optional: e.g. a format conversion before setup
                strategy.prepare_resume(resume_path, saved)
        strategy.setup(model)
        if auto_micro:
            from distft.plan.auto import confirm_micro_batch

            confirm_micro_batch(cfg, info, method, strategy, data.train, run_dir)
        if info.is_main and hasattr(strategy, "write_config"):
            strategy.write_config(run_dir)

        t = cfg.train
        global_batch = t.micro_batch_size * t.grad_accum * info.world_size
        lengths = data.train.lengths() if cfg.data.group_by_length else None  # data's Rows: no decode
        sampler = GlobalBatchSampler(len(data.train), global_batch, t.seed, lengths)
        total = t.max_steps or max(1, math.ceil(t.epochs * sampler.steps_per_epoch))

        trainer = cls(
            cfg,
            info,
            run_dir,
            tokenizer,
            method,
            tuning,
            strategy,
            data,
            sampler,
            total,
            lr_schedule(cfg, total),
            None,
            model_path,
        )
        if hasattr(method, "setup"):  # optional: extra models (reference, critic), precomputation
            method.setup(trainer)
        trainer.perf = perf
        trainer.tracker = BestTracker.from_config(cfg)
        trainer.resume_path = resume_path
        trainer.bad_steps = guard.BadStepGuard(t.max_bad_steps)
        trainer._maybe_resume()
        run_info.write(cfg, info, run_dir, resume_path)
        trainer.logger = MetricsLogger(cfg, run_dir, info.is_main, trainer.start_step)
        return trainer

    def _maybe_resume(self) -> None:
        path = self.resume_path
        if path is None:
            return
        state = checkpoint.load(self.strategy, path, self.info)
        self.bad_steps.skipped = state.get("skipped_steps", 0)
        if hasattr(self.method, "load_state"):  # optional: state of extra models
            self.method.load_state(path)
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
        cfg, info = self.cfg, self.info
        t = cfg.train
        summary: dict = {"run_dir": str(self.run_dir)}
        if self.start_step == 0:
            before = self.method.evaluate(
                self.strategy.module, self.data.val_rows, info, self.strategy.sharded_params
            )
            summary["before"] = before
            if before:
                self.logger.log(0, {f"eval/{k}": v for k, v in before.items()})
        bar = _progress(self.total_steps, self.start_step, info.is_main and t.progress)
        last_loss = float("nan")
        tokens_window, time_window = 0.0, time.perf_counter()
        # A method may own the whole step (RL: rollouts, then several updates).
        method_step = getattr(self.method, "train_step", None)
        stop_at = self.tracker.stopped_step or self.total_steps  # a resumed early-stopped run
        for step in range(self.start_step, stop_at):
            guard.inject_sleep(step, info.rank)  # no-op unless DISTFT_FAULT_SLEEP
            loss, tokens, grad_norm = method_step(self, step) if method_step else self.train_step(step)
            done = step + 1
            # loss is all-reduced and the grad norm global: every rank takes the same decision.
            ids = self.sampler.global_indices(step)
            if self.bad_steps.check(done, loss, grad_norm, ids, self._last_good):
                if info.is_main:
                    print(f"distft: step {done} skipped: loss={loss}, grad_norm={grad_norm}", flush=True)
            else:
                last_loss = loss
            tokens_window += tokens
            if done % t.log_every == 0 or done == self.total_steps:
                elapsed = time.perf_counter() - time_window
                tokens_per_s = tokens_window / max(elapsed, 1e-9)
                row = {
                    "loss": loss,
                    "lr": self.lr_at(step),
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "mfu": self.perf.mfu(tokens_per_s) if self.perf else None,
                    "mem_gib": peak_memory_gib(info.device),  # this rank's peak so far
                    "time": time.time(),
                    "epoch": step / self.sampler.steps_per_epoch,
                    "skipped_steps": self.bad_steps.skipped,
                    **self.data.metrics,  # packing/efficiency
                    **self.step_metrics,
                }
                self.logger.log(done, row)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}"
                    )
                tokens_window, time_window = 0.0, time.perf_counter()
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
                checkpoint.wait_pending()
                self.logger.close()
                raise stop.StopRequested(done)
        if bar is not None:
            bar.close()
        end = self.tracker.stopped_step or self.total_steps
        summary["train_loss"] = last_loss
        if self.tracker.stopped_step is not None:
            summary["early_stopped_at"] = end
        if self.tracker.stopped_step is not None and self.last_eval is not None:
            (final_eval, after), improved = self.last_eval, False  # evaluated at this very step
        else:
            final_eval, after = self._eval_split(self.data.val, self.data.val_rows, "eval/")
            self.logger.log(end, final_eval)
            improved = self._track(end, final_eval)
        summary.update(final_eval)
        summary["after"] = after
        if self.start_step < end or checkpoint.latest(self.run_dir) is None:
            self.save(end)
        checkpoint.wait_pending()  # an async save must be complete (and latest) before the run ends
        if improved and t.export == "best":
            checkpoint.mark_best(self.run_dir, end, info)
        if self.tracker.best_step is not None:
            summary["best"] = {"metric": self.tracker.monitor, "value": self.tracker.best}
            summary["best"]["step"] = self.tracker.best_step
        weights = "last"
        if t.export == "best" and self.tracker.best_step not in (None, end):
            self._load_best()
            weights = f"best (step {self.tracker.best_step})"
        if cfg.eval.test and self.data.test:
            summary["test"] = self.test_eval(end, weights)
        if t.export != "none":
            summary["export"] = str(export(self))
            if hasattr(self.method, "export_extra"):  # optional: extra models (a critic) in export/
                self.method.export_extra(self, Path(summary["export"]))
        self.logger.close()
        if info.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            _print_summary(summary, self.notes)
            _write_report(self.run_dir)
        return summary

    def train_step(self, step: int) -> tuple[float, int, float]:
        """One optimizer step over a global batch; returns (global loss, global tokens, grad norm)."""
        t, info = self.cfg.train, self.info
        shares = self.sampler.rank_micro_batches(step, info.rank, info.world_size, t.grad_accum)
        batches = [self.method.collate([self.data.train[i] for i in ids]) for ids in shares]
        local_targets = sum(b["num_targets"] for b in batches)
        local_tokens = sum(b["num_tokens"] for b in batches)
        global_targets, global_tokens = dist.all_reduce_sum([local_targets, local_tokens], info.device)
        scale = self.strategy.loss_scale / max(global_targets, 1.0)
        self.strategy.set_lr(self.lr_at(step))
        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        extra: dict[str, list[float]] = {}
        for i, batch in enumerate(batches):
            is_last = i == len(batches) - 1
            batch = _to_device(batch, info.device)
            with self.strategy.accumulate(is_last):
                loss, parts = self.method.loss(self.strategy.model, batch)
                loss = guard.inject_nan(loss, step, info.rank)  # no-op unless DISTFT_FAULT_NAN_STEPS
                self.strategy.backward(loss * scale, is_last)
            loss_sum += loss.detach().double()
            _add_parts(extra, parts)
        grad_norm = self.strategy.step()
        self.step_metrics = _reduce_parts(extra, info.device)
        (total,) = dist.all_reduce_sum([float(loss_sum)], info.device)
        return total / max(global_targets, 1.0), int(global_tokens), grad_norm

    def validate(self, step: int) -> bool:
        """Val loss and the method's eval metrics, logged; tracks the best step (saved when
        train.export=best). True when early stopping says stop."""
        row, metrics = self._eval_split(self.data.val, self.data.val_rows, "eval/")
        self.last_eval = (row, metrics)
        self.logger.log(step, row)
        if self._track(step, row) and self.cfg.train.export == "best":
            self.save(step)
            checkpoint.mark_best(self.run_dir, step, self.info)
        return self.tracker.should_stop(step)

    def _track(self, step: int, row: dict) -> bool:
        t, e = self.cfg.train, self.cfg.eval
        if not row or (self.tracker.monitor not in row and not (e.patience or t.export == "best")):
            return False  # nothing to track (no val split, or an optional metric this method lacks)
        return self.tracker.update(step, row)

    def _eval_split(self, examples: list, rows: list, prefix: str) -> tuple[dict, dict]:
        out = self.eval_loss(examples, prefix)
        metrics = self.method.evaluate(self.strategy.module, rows, self.info, self.strategy.sharded_params)
        out.update({f"{prefix}{k}": v for k, v in metrics.items()})
        return out, metrics

    def _load_best(self) -> None:
        path = checkpoint.best(self.run_dir)
        if path is None:
            raise RuntimeError(f"train.export=best but no best checkpoint in {self.run_dir / 'checkpoints'}")
        checkpoint.load(self.strategy, path, self.info)
        if hasattr(self.method, "load_state"):
            self.method.load_state(path)
        if self.info.is_main:
            print(f"distft: loaded the best checkpoint {path} for the test eval and export", flush=True)

    def test_eval(self, step: int, weights: str) -> dict:
        """Final evaluation on the test split: logged as test/* and written to eval.json."""
        out, _ = self._eval_split(self.data.test, self.data.test_rows, "test/")
        self.logger.log(step, out)
        if self.info.is_main:
            result = {"split": "test", "rows": len(self.data.test_rows), "weights": weights, "step": step}
            if self.tracker.best_step is not None:
                result["best_val"] = {"metric": self.tracker.monitor, "value": self.tracker.best}
                result["best_val"]["step"] = self.tracker.best_step
            result["metrics"] = out
            (self.run_dir / "eval.json").write_text(json.dumps(result, indent=2))
        return out

    @torch.no_grad()
    def eval_loss(self, examples: list | None = None, prefix: str = "eval/") -> dict:
        """Loss over a whole held-out split (val by default), normalized by its target tokens."""
        val = self.data.val if examples is None else examples
        if not val:
            return {}
        info, micro = self.info, self.cfg.train.micro_batch_size
        mine = val[info.rank :: info.world_size]
        per_rank = math.ceil(len(val) / info.world_size)
        n_batches = math.ceil(per_rank / micro)
        model = self.strategy.model
        was_training = model.training
        model.eval()
        loss_sum, targets = 0.0, 0.0
        extra: dict[str, list[float]] = {}
        for b in range(n_batches):
            rows = mine[b * micro : (b + 1) * micro]
            # Sharded parameters need every rank in every forward: idle ranks run a dummy batch.
            batch = _to_device(self.method.collate(rows or val[:1]), info.device)
            with self.strategy.accumulate(True):
                loss, parts = self.method.loss(model, batch)
            if rows:
                loss_sum += float(loss)
                targets += batch["num_targets"]
                _add_parts(extra, parts)
        model.train(was_training)
        loss_sum, targets = dist.all_reduce_sum([loss_sum, targets], info.device)
        mean = loss_sum / max(targets, 1.0)
        out = {f"{prefix}loss": mean, f"{prefix}ppl": math.exp(min(mean, 50.0))}
        out.update({f"{prefix}{k}": v for k, v in _reduce_parts(extra, info.device).items()})
        return out

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
        }
        extra = getattr(self.method, "save_state", None)  # optional: state of extra models
        t = self.cfg.train
        return checkpoint.save(
            self.strategy, self.run_dir, step, state, self.info, t.keep_last, extra, async_ok=t.async_save
        )

    def _last_good(self) -> str | None:
        path = checkpoint.latest(self.run_dir)
        return str(path) if path is not None else None


def _add_parts(acc: dict[str, list[float]], parts: dict) -> None:
    """Method metrics come as {name: (sum, count)}; summed here, averaged after the all-reduce."""
    for k, (total, count) in parts.items():
        a = acc.setdefault(k, [0.0, 0.0])
        a[0] += float(total)
        a[1] += float(count)


def _reduce_parts(acc: dict[str, list[float]], device) -> dict[str, float]:
    keys = sorted(acc)
    flat = dist.all_reduce_sum([x for k in keys for x in acc[k]], device) if keys else []
    return {k: flat[2 * i] / max(flat[2 * i + 1], 1e-12) for i, k in enumerate(keys)}


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _write_config(cfg, composed, run_dir: Path) -> None:
    if composed is not None:
        plain = OmegaConf.to_container(composed, resolve=True)
        plain.pop("hydra", None)
        plain["output_dir"] = cfg.output_dir
        OmegaConf.save(OmegaConf.create(plain), run_dir / "config.yaml")
    else:
        OmegaConf.save(OmegaConf.structured(dataclasses.asdict(cfg)), run_dir / "config.yaml")


def _compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile every repeated block (they share one compiled graph) before the strategy
    wraps them, as torchtitan does; models without blocks are compiled whole."""
    from distft.models.layers import decoder_layers

    blocks = decoder_layers(model)
    for block in blocks or [model]:
        block.compile()


def _write_report(run_dir: Path) -> None:
    """Plots and report/index.html; a plotting failure must never fail a finished training run."""
    try:
        from distft.report import write_report

        print(f"  report           : {write_report(run_dir)}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"distft: run report not written ({type(e).__name__}: {e})", flush=True)


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)


def _print_summary(summary: dict, notes: list) -> None:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["", "distft run summary"]
    lines.append(f"  final train loss : {fmt(summary.get('train_loss'))}")
    if "eval/loss" in summary:
        lines.append(f"  final val loss   : {fmt(summary['eval/loss'])}")
    before, after = summary.get("before") or {}, summary.get("after") or {}
    for k in sorted(set(before) | set(after)):
        lines.append(f"  val {k:<13}: {fmt(before.get(k, '-'))} before -> {fmt(after.get(k))} after")
    if summary.get("early_stopped_at"):
        lines.append(f"  early stopped at : step {summary['early_stopped_at']}")
    if summary.get("best"):
        b = summary["best"]
        lines.append(f"  best {b['metric']:<12}: {fmt(b['value'])} at step {b['step']}")
    for k, v in (summary.get("test") or {}).items():
        lines.append(f"  {k:<17}: {fmt(v)}")
    lines.append(f"  run dir          : {summary['run_dir']}")
    files = "config.yaml metrics.jsonl summary.json data_report.json checkpoints/"
    lines.append(f"  files            : {files}" + (" eval.json" if summary.get("test") else ""))
    if summary.get("export"):
        lines.append(f"  export           : {summary['export']}")
    lines += [f"  note: {n}" for n in notes]
    print("\n".join(lines), flush=True)
