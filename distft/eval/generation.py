"""Generation metrics on held-out rows: greedy generations sharded over ranks, gathered, scored
once (corpus BLEU/chrF need every pair), the same result on every rank."""

from __future__ import annotations

from distft.data.sft_format import prompt_text, reference_answer
from distft.dtypes import PRECISION_DTYPES
from distft.eval.text_metrics import score_texts
from distft.models.generation import generate
from distft.runtime import dist

DEFAULT = ("exact_match",)


def generate_pairs(model, tokenizer, rows: list[dict], cfg, info, sharded: bool) -> list[tuple[str, str]]:
    """(prediction, reference) for every row, in row order, on every rank."""
    mine = rows[info.dp_rank :: info.dp_size]  # [tp] a replica's ranks generate the same rows
    prompts = [prompt_text(r, tokenizer) for r in mine]
    dtype = PRECISION_DTYPES[cfg.train.precision]  # DDP generates in the compute dtype, as it trains
    outs = generate(model, tokenizer, prompts, cfg.train.max_new_tokens, info.device, sharded, dtype=dtype)
    pairs = [(o, reference_answer(r)) for o, r in zip(outs, mine)]
    gathered = dist.all_gather_objects(pairs)[:: info.replica_ranks]  # [tp] one list per replica
    # Undo the round-robin so the order is the rows' order whatever the world size.
    out = []
    for i in range(max((len(g) for g in gathered), default=0)):
        out += [g[i] for g in gathered if i < len(g)]
    return out


def generation_metrics(model, tokenizer, rows: list[dict], cfg, info, sharded: bool) -> dict[str, float]:
    names = tuple(cfg.eval.metrics) or DEFAULT
    pairs = generate_pairs(model, tokenizer, rows, cfg, info, sharded)
    return score_texts([p for p, _ in pairs], [r for _, r in pairs], names)
