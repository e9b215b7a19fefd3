"""`distft-export`: merge an adapter into its base, or combine several LoRA adapters into one.

  distft-export merge RUN/export --out merged/              LoRA/DoRA/IA3 → full weights (fp32)
  distft-export merge QLORA_RUN/export --out merged/        4-bit base dequantized, saved in bf16
  distft-export combine A/export B/export --weights 0.7 0.3 --how ties --density 0.5 --out combined/

Continuing training from an export is config, not this command (see distft/continual.py):
  python -m distft.train model.name_or_path=merged/ data.path=[new.jsonl] \\
      data.replay_path=[old.jsonl] data.replay_fraction=0.2
  python -m distft.train tuning=lora tuning.init_adapter=RUN/export model.name_or_path=RUN/export/base ...
"""

from __future__ import annotations

import argparse
import sys
import warnings

from distft.errors import DistftError


def _parser() -> argparse.ArgumentParser:
    from distft.dtypes import PRECISION_DTYPES
    from distft.tools.adapters import COMBINATIONS

    p = argparse.ArgumentParser(prog="distft-export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge an adapter into its base and save full weights")
    m.add_argument("adapter", help="adapter directory (a run's export/)")
    m.add_argument("--out", required=True, help="directory for the merged model")
    m.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    m.add_argument(
        "--dtype", choices=sorted(PRECISION_DTYPES), help="saved dtype (default: fp32, bf16 for QLoRA)"
    )
    m.add_argument(
        "--from-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the adapter was trained on a 4-bit base (default: from distft_export.json)",
    )
    c = sub.add_parser("combine", help="combine LoRA adapters with weights (PEFT add_weighted_adapter)")
    c.add_argument("adapters", nargs="+", help="two or more adapter directories of the same base")
    c.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    c.add_argument("--how", default="linear", choices=COMBINATIONS, help="combination (default linear)")
    c.add_argument("--density", type=float, help="ties/dare/magnitude_prune: share kept (default 0.5)")
    c.add_argument("--base", help="base model (default: the first adapter's)")
    c.add_argument("--out", required=True, help="directory for the combined adapter")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from distft.tools import adapters

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.command == "merge":
                out = adapters.merge(args.adapter, args.out, args.base, args.dtype, args.from_4bit)
            else:
                out = adapters.combine(
                    args.adapters, args.weights, args.out, args.how, args.density, args.base
                )
        for w in caught:
            if str(w.message).startswith("merging a QLoRA adapter"):
                print(f"distft-export: warning: {w.message}", file=sys.stderr)
    except DistftError as e:
        print(f"distft-export: error: {e}", file=sys.stderr)
        return 2
    print(f"distft-export: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
