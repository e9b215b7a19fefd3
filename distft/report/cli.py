"""`distft-report <run dir>`: plots and a one-page HTML summary of a run (also written at the end
of every run). Prints the path of the HTML page."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: distft-report <run dir>\n\n{__doc__}")
        return 0
    if len(argv) != 1:
        print("usage: distft-report <run dir>", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    if not (run_dir / "metrics.jsonl").is_file():
        print(
            f"distft-report: error: {run_dir} has no metrics.jsonl (is it a distft run dir?)", file=sys.stderr
        )
        return 2
    from distft.report import write_report

    print(write_report(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
