"""The end of a run, after the loop: final eval (or the early stop's), the last checkpoint, the
best checkpoint reloaded when train.export=best, the test split, the export, summary.json, the
printed summary and the report."""

from __future__ import annotations

import json
from pathlib import Path

from distft.engine import checkpoint
from distft.engine.export import export


def finish(trainer, summary: dict, last_loss: float) -> dict:
    """Everything after the last step; returns the run summary (also written to summary.json)."""
    info, t = trainer.info, trainer.cfg.train
    tracker = trainer.tracker
    end = tracker.stopped_step or trainer.total_steps
    summary["train_loss"] = last_loss
    if tracker.stopped_step is not None:
        summary["early_stopped_at"] = end
    if tracker.stopped_step is not None and trainer.last_eval is not None:
        (final_eval, after), improved = trainer.last_eval, False  # evaluated at this very step
    else:
        final_eval, after = trainer.eval_split(trainer.data.val, trainer.data.val_rows, "eval/")
        trainer.logger.log(end, final_eval)
        improved = trainer.track(end, final_eval)
    # Every plotted series is in metrics.jsonl now (test/* rows are not plotted): the plots are
    # drawn in a thread beside the save and the export.
    report = start_report(trainer.run_dir) if info.is_main else None
    summary.update(final_eval)
    summary["after"] = after
    if trainer.start_step < end or checkpoint.latest(trainer.run_dir) is None:
        trainer.save(end)
    trainer.ckpt.wait_pending()  # an async save must be complete (and latest) before the run ends
    if improved and t.export == "best":
        trainer.ckpt.mark_best(end)
    if tracker.best_step is not None:
        summary["best"] = {"metric": tracker.monitor, "value": tracker.best, "step": tracker.best_step}
    weights = "last"
    if t.export == "best" and tracker.best_step not in (None, end):
        load_best(trainer)
        weights = f"best (step {tracker.best_step})"
    if trainer.cfg.eval.test and trainer.data.test:
        summary["test"] = test_eval(trainer, end, weights)
    if t.export != "none":
        summary["export"] = str(export(trainer))
        trainer.method.export_extra(trainer.ctx, Path(summary["export"]))  # e.g. a critic
    trainer.logger.close()
    if info.is_main:
        (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary, trainer.notes)
        write_report(trainer.run_dir, report)
    return summary


def load_best(trainer) -> None:
    path = checkpoint.best(trainer.run_dir)
    if path is None:
        raise RuntimeError(f"train.export=best but no best checkpoint in {trainer.run_dir / 'checkpoints'}")
    checkpoint.load(trainer.strategy, path, trainer.info)
    trainer.method.load_state(path)
    if trainer.info.is_main:
        print(f"distft: loaded the best checkpoint {path} for the test eval and export", flush=True)


def test_eval(trainer, step: int, weights: str) -> dict:
    """Final evaluation on the test split: logged as test/* and written to eval.json."""
    data, tracker = trainer.data, trainer.tracker
    out, _ = trainer.eval_split(data.test, data.test_rows, "test/")
    trainer.logger.log(step, out)
    if trainer.info.is_main:
        result = {"split": "test", "rows": len(data.test_rows), "weights": weights, "step": step}
        if tracker.best_step is not None:
            result["best_val"] = {"metric": tracker.monitor, "value": tracker.best}
            result["best_val"]["step"] = tracker.best_step
        result["metrics"] = out
        (trainer.run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return out


def start_report(run_dir: Path):
    """The report's plots, drawn in a thread from here on (None if that cannot even start)."""
    try:
        from distft.report import BackgroundReport

        return BackgroundReport(run_dir)
    except Exception:  # noqa: BLE001  write_report draws them in line then, and says why it fails
        return None


def write_report(run_dir: Path, report=None) -> None:
    """Plots and report/index.html (the plots from `report`, a BackgroundReport, where given);
    complete when this returns. A plotting failure must never fail a finished training run."""
    try:
        from distft.report import write_report as write

        page = report.finish() if report is not None else write(run_dir)
        print(f"  report           : {page}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"distft: run report not written ({type(e).__name__}: {e})", flush=True)


def print_summary(summary: dict, notes: list) -> None:
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
