"""Rank-0 metrics: metrics.jsonl (appended on resume) plus an optional dashboard backend."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path


class MetricsLogger:
    def __init__(self, cfg, run_dir: Path, is_main: bool, resumed_step: int):
        self.is_main = is_main
        self.backend = None
        if not is_main:
            return
        self.path = run_dir / "metrics.jsonl"
        if resumed_step and self.path.is_file():
            # Drop rows past the checkpoint we resume from (written after it, then lost).
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            kept = [r for r in rows if r.get("step", 0) <= resumed_step]
            if len(kept) != len(rows):
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        if cfg.logger.name == "wandb":
            self.backend = WandbBackend(cfg, run_dir)
        elif cfg.logger.name == "tensorboard":
            self.backend = TensorBoardBackend(run_dir)

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step}
        for k, v in metrics.items():
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.backend:
            self.backend.log(step, metrics)

    def close(self) -> None:
        if not self.is_main:
            return
        self.file.close()
        if self.backend:
            self.backend.close()


def _tags(cfg) -> list[str]:
    return [
        f"model:{cfg.model.name}",
        f"tuning:{cfg.tuning.name}",
        f"method:{cfg.method.name}",
        f"strategy:{cfg.strategy.name}",
        *cfg.logger.tags,
    ]


class WandbBackend:
    def __init__(self, cfg, run_dir: Path):
        import dataclasses

        import wandb

        id_file = run_dir / "wandb_run_id"
        # wandb 0.31 has no public id generator: 8 random hex chars are a valid run id.
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.logger.project,
            group=cfg.logger.group,
            name=cfg.logger.run_name or run_dir.name,
            tags=_tags(cfg),
            config=dataclasses.asdict(cfg),
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode=os.environ.get("WANDB_MODE"),
        )

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardBackend:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()
