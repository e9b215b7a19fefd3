"""One rank's program for bench/load_memory.py: build the trainer (config, data, model load,
strategy setup), read every parameter this rank holds once (weights that are still lazily
memory-mapped become resident, as the first forward would make them), then stop before training;
bench/rss.py records the peak RSS at exit."""

import sys

import torch

from distft.config.load import load_config
from distft.engine.trainer import Trainer
from distft.runtime import dist

if __name__ == "__main__":
    cfg, composed = load_config(sys.argv[1:])
    trainer = Trainer.build(cfg, composed)
    with torch.no_grad():
        for p in trainer.strategy.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            float(local.float().sum())
    dist.shutdown()
