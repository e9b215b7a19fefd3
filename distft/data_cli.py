"""`distft-data [overrides]`: prepare the data as a training run would (same Hydra overrides),
write data_report.json, the cleaned splits (data/{train,val,test}.jsonl) and the tokenized cache
to the run dir, print the report table, and stop before any model is built.

A later `python -m distft.train output_dir=<same dir> <same overrides>` reuses the cache.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from distft.errors import DistftError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from distft.config.cli import early_exit

    if (rc := early_exit("distft-data", __doc__, argv)) is not None:  # --help, --cfg job
        return rc
    try:
        import torch

        from distft.config.load import load_config
        from distft.data.pipeline import prepare_cached
        from distft.methods import METHODS
        from distft.models import load_tokenizer, resolve_model_path
        from distft.runtime import dist

        cfg, _ = load_config(argv)
        default = Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
        run_dir = Path(cfg.output_dir or default).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        info = dist.DistInfo(0, 1, 0, 1, torch.device("cpu"), "none")  # one process, no group
        tokenizer = load_tokenizer(resolve_model_path(cfg, run_dir, info), cfg)
        method = METHODS[cfg.method.name](cfg, tokenizer)
        data = prepare_cached(cfg, method, tokenizer, run_dir, is_main=True, quiet=True)
        from distft.data.report import table

        print(table(data.report))
        print(f"  report   : {run_dir / 'data_report.json'}")
        if (run_dir / "data").is_dir():
            print(f"  prepared : {run_dir / 'data'}/{{train,val,test}}.jsonl")
    except DistftError as e:
        print(f"distft-data: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
