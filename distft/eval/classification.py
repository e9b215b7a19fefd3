"""Classification metrics via scikit-learn, for methods that predict labels (method=classify)."""

from __future__ import annotations

from distft.errors import DataError
from distft.eval import CLASSIFICATION_METRICS


def classification_metrics(
    y_true: list,
    y_pred: list,
    labels: list | None = None,
    average: str = "macro",
    names: list[str] | tuple[str, ...] = CLASSIFICATION_METRICS,
) -> dict[str, float]:
    """accuracy, precision, recall, f1 (averaged over `labels` by `average`: macro, weighted,
    micro); a class never predicted counts as precision 0 rather than raising."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_pred)} predictions for {len(y_true)} labels")
    if not y_true:
        return {}
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=average, zero_division=0
    )
    out.update({"precision": float(p), "recall": float(r), "f1": float(f)})
    return {n: out[n] for n in names if n in out}


def per_class(y_true: list, y_pred: list, labels: list) -> dict[str, dict[str, float]]:
    """Precision/recall/F1/support per label (for eval.json)."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        str(lab): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, lab in enumerate(labels)
    }


def check_known_labels(labels: list, known: list, split: str) -> None:
    """Labels of an eval split must be ones the model was trained on."""
    unseen = sorted({str(x) for x in labels} - {str(x) for x in known})
    if unseen:
        raise DataError(
            f"the {split} split has labels never seen in training: {unseen} (trained labels: "
            f"{sorted(str(x) for x in known)}); add training rows for them or drop those rows"
        )
