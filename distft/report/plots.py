"""PNG plots of metrics.jsonl series (matplotlib's object API on the Agg canvas: no display, no
pyplot import, no global figure state, so the report can be drawn in a thread beside the export).

Fixed margins rather than tight_layout: tight_layout draws every figure once more to measure it,
which doubled the report's time at the end of every run."""

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
MARGINS = {"left": 0.14, "right": 0.97, "bottom": 0.14, "top": 0.9}


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def eval_figure(rows: list[dict]) -> tuple | None:
    """Eval metrics beside the loss (exact_match, accuracy, ...): the y axis names the metric when
    there is one, and the legend names each series."""
    keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k not in SKIP_EVAL})
    if not keys:
        return None
    ylabel = keys[0].removeprefix("eval/") if len(keys) == 1 else "score"
    return (
        "eval",
        "Evaluation metrics (validation split)",
        ylabel,
        [(k, k.removeprefix("eval/")) for k in keys],
    )


def figures(rows: list[dict]) -> list[tuple]:
    """(file stem, matplotlib figure) for every topic the rows have a series of."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    topics = list(FIGURES)
    ev = eval_figure(rows)
    if ev:
        topics.insert(1, ev)
    out = []
    for stem, title, ylabel, keys in topics:
        lines = [(label, *series(rows, key)) for key, label in keys]
        lines = [(label, xs, ys) for label, xs, ys in lines if xs]
        if not lines:
            continue
        fig = Figure(figsize=(6.4, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
        values = [y for _, _, ys in lines for y in ys]
        if stem == "loss" and all(y > 0 for y in values):
            ax.set_yscale("log")
            # Plain numbers (4.5, not 4.5 x 10^0) on a short log range's minor ticks.
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            if max(values) < 10 * min(values):  # less than a decade: label the minor ticks too
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        if stem == "eval" and all(0 <= y <= 1 for y in values):
            ax.set_ylim(-0.02, 1.02)  # rates and scores in [0, 1]: the whole range, not a flat line's noise
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1 or stem == "eval":
            ax.legend()
        fig.subplots_adjust(**MARGINS)
        out.append((stem, fig))
    return out


def plot_all(rows: list[dict], out: Path) -> list[Path]:
    written = []
    for stem, fig in figures(rows):
        path = out / f"{stem}.png"
        fig.savefig(path)
        written.append(path)
    return written
