"""Evaluation: generation metrics (exact match, ROUGE, BLEU, chrF), classification metrics
(accuracy, precision, recall, F1), early stopping with best-checkpoint tracking.

Which metrics a method can compute: its `eval_metrics` attribute (a tuple of names), else those
of the kind of rows it declares (`data_schema` or `kind`): generation metrics for sft,
classification metrics for classification; other methods log their own metrics only.
"""

from __future__ import annotations

from distft.errors import ConfigError

GENERATION_METRICS = ("exact_match", "rouge1", "rouge2", "rougeL", "bleu", "chrf")
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")
BY_KIND = {"sft": GENERATION_METRICS, "classification": CLASSIFICATION_METRICS}


def supported_metrics(method_cls) -> tuple[str, ...]:
    declared = getattr(method_cls, "eval_metrics", None)
    if declared is not None:
        return tuple(declared)
    kind = getattr(method_cls, "data_schema", None) or getattr(method_cls, "kind", None)
    return BY_KIND.get(kind, ()) if isinstance(kind, str) else ()


def check_metrics(cfg, method_cls) -> None:
    """eval.metrics must be metrics the method computes (called by config validation)."""
    ok = supported_metrics(method_cls)
    for name in cfg.eval.metrics:
        if name in ok:
            continue
        known = GENERATION_METRICS + CLASSIFICATION_METRICS
        if name not in known:
            raise ConfigError(f"eval.metrics: unknown metric {name!r}; known: {', '.join(known)}")
        fits = ", ".join(ok) if ok else "none (it logs eval/loss, eval/ppl and its own eval/* metrics)"
        raise ConfigError(
            f"eval.metrics: {name!r} does not fit method={cfg.method.name}; metrics it can compute: {fits}"
        )
