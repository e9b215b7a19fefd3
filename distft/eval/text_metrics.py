"""Scores of generated texts against references: exact match, ROUGE-1/2/L (rouge-score,
F-measure, 0-1), BLEU and chrF (sacrebleu corpus scores, 0-100 as sacrebleu reports them)."""

from __future__ import annotations

ROUGE = ("rouge1", "rouge2", "rougeL")


def score_texts(preds: list[str], refs: list[str], names: list[str] | tuple[str, ...]) -> dict[str, float]:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not preds:
        return {}
    out: dict[str, float] = {}
    if "exact_match" in names:
        out["exact_match"] = sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(preds)
    rouge = [n for n in ROUGE if n in names]
    if rouge:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(rouge, use_stemmer=False)
        sums = dict.fromkeys(rouge, 0.0)
        for p, r in zip(preds, refs):
            scores = scorer.score(r, p)
            for n in rouge:
                sums[n] += scores[n].fmeasure
        out.update({n: sums[n] / len(preds) for n in rouge})
    if "bleu" in names or "chrf" in names:
        import sacrebleu

        if "bleu" in names:
            out["bleu"] = sacrebleu.corpus_bleu(preds, [refs]).score
        if "chrf" in names:
            out["chrf"] = sacrebleu.corpus_chrf(preds, [refs]).score
    return {n: out[n] for n in names if n in out}
