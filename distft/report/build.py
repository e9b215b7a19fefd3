"""Write <run dir>/report/: the plots and index.html (config, final metrics, plots) on one page."""

from __future__ import annotations

import html
import json
import threading
from pathlib import Path

from distft.report.plots import plot_all


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return rows


def final_values(rows: list[dict]) -> dict:
    """The last logged value of every metric (train rows and eval rows alike)."""
    out: dict = {}
    for r in rows:
        for k, v in r.items():
            if k != "time" and v is not None:
                out[k] = v
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v))


def _table(d: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _throughput_summary(rows: list[dict]) -> dict:
    train = [r for r in rows if "tokens_per_s" in r]
    if not train:
        return {}
    steady = train[len(train) // 10 :] or train
    out = {
        "steps logged": len(train),
        "median tokens/s (after the first 10% of steps)": sorted(r["tokens_per_s"] for r in steady)[
            len(steady) // 2
        ],
    }
    mfus = sorted(r["mfu"] for r in steady if isinstance(r.get("mfu"), (int, float)))
    if mfus:
        out["median MFU"] = mfus[len(mfus) // 2]
    mems = [r["mem_gib"] for r in train if isinstance(r.get("mem_gib"), (int, float))]
    if mems:
        out["peak memory, rank 0 (GiB)"] = max(mems)
    times = [r["time"] for r in train if isinstance(r.get("time"), (int, float))]
    if len(times) > 1:
        out["training wall time (s)"] = times[-1] - times[0]
    return out


class BackgroundReport:
    """The end of a run draws its plots in a thread while rank 0 saves and exports (checkpoint I/O,
    collectives and tensor work release the GIL; the other ranks wait on rank 0's export, so a core
    is free). Start it once the last plotted row (the final eval) is in metrics.jsonl; `finish`,
    once summary.json is written, waits for the plots and writes index.html. A failure is raised
    by `finish`, never lost. (Started earlier, during the final eval, it slowed that eval on
    every rank: matplotlib's import holds the GIL.)"""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.images: list[Path] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="distft-report", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            self.images = draw_plots(self.run_dir, read_metrics(self.run_dir))
        except BaseException as e:  # noqa: BLE001  raised again by finish()
            self.error = e

    def finish(self) -> Path:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return write_report(self.run_dir, self.images)


def draw_plots(run_dir: Path, rows: list[dict]) -> list[Path]:
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    return plot_all(rows, out)


def write_report(run_dir: str | Path, images: list[Path] | None = None) -> Path:
    """Plots (unless already drawn: `images`) and index.html under <run dir>/report/; returns the
    HTML path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if images is None:
        images = draw_plots(run_dir, rows)
    summary = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    config = (
        (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else "(no config.yaml)"
    )
    finals = final_values(rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>distft run {html.escape(run_dir.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #ccc;padding:2px 8px;"
        "text-align:left;font-size:90%}img{width:48%;margin:0.5%}pre{background:#f6f6f6;padding:1em;"
        "font-size:80%;max-height:30em;overflow:auto}</style></head><body>",
        f"<h1>distft run: {html.escape(str(run_dir))}</h1>",
        "<h2>Final metrics</h2>",
        _table({k: v for k, v in finals.items() if k not in ("step",)} | {"last step": finals.get("step")}),
    ]
    throughput = _throughput_summary(rows)
    if throughput:
        parts += ["<h2>Speed and memory</h2>", _table(throughput)]
    if summary:
        flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        for k, v in summary.items():
            if isinstance(v, dict):
                # A section's keys may carry its name already ("test": {"test/loss": ...}).
                flat.update({kk if kk.startswith(f"{k}/") else f"{k}/{kk}": vv for kk, vv in v.items()})
        parts += ["<h2>Summary (summary.json)</h2>", _table(flat)]
    parts.append("<h2>Plots</h2>")
    parts += [f"<img src='{p.name}' alt='{p.stem}'>" for p in images] or ["<p>(no metrics logged)</p>"]
    parts += ["<h2>Config (config.yaml)</h2>", f"<pre>{html.escape(config)}</pre>", "</body></html>"]
    index = run_dir / "report" / "index.html"
    index.write_text("\n".join(parts))
    return index
