"""One rank's program for bench/load_memory.py: build the trainer (config, data, model load,
strategy setup) and stop before training; bench/rss.py records the peak RSS at exit."""

import sys

from distft import dist
from distft.config.load import load_config
from distft.engine.trainer import Trainer

if __name__ == "__main__":
    cfg, composed = load_config(sys.argv[1:])
    Trainer.build(cfg, composed)
    dist.shutdown()
