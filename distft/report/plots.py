"""PNG plots of metrics.jsonl series (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

# One figure per topic: (file stem, title, y label, [(metric, legend label)]). Series that a run
# did not log are skipped; a figure with no series is not written.
FIGURES = [
    ("loss", "Loss", "loss", [("loss", "train"), ("eval/loss", "validation")]),
    ("lr", "Learning rate", "lr", [("lr", "lr")]),
    ("throughput", "Throughput", "non-padding tokens/s", [("tokens_per_s", "tokens/s")]),
    ("mfu", "Model FLOPs utilization", "MFU", [("mfu", "mfu")]),
    ("memory", "Peak memory (rank 0, so far)", "GiB", [("mem_gib", "peak")]),
    ("grad_norm", "Gradient norm (before clipping)", "norm", [("grad_norm", "grad norm")]),
]
SKIP_EVAL = {"eval/loss", "eval/ppl"}


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def eval_figure(rows: list[dict]) -> tuple | None:
    keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k not in SKIP_EVAL})
    if not keys:
        return None
    return ("eval", "Evaluation metrics", "value", [(k, k.removeprefix("eval/")) for k in keys])


def plot_all(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = list(FIGURES)
    ev = eval_figure(rows)
    if ev:
        figures.insert(1, ev)
    written = []
    for stem, title, ylabel, keys in figures:
        lines = [(label, *series(rows, key)) for key, label in keys]
        lines = [(label, xs, ys) for label, xs, ys in lines if xs]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
        if stem == "loss" and all(y > 0 for _, _, ys in lines for y in ys):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
