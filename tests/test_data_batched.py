"""Preparation in batches (issue 15 point 2): reading, mapping, cleaning, dedup and the grouped
split run a batch at a time in data.num_proc workers (distft/data/batched.py) and decide exactly
as the whole-list steps (read_sources, to_canonical, clean, split_rows, mix) on rows with exact
and near duplicates, malformed lines, personal data, blank, too short, too long and overlong rows,
filtered rows, conflicting answers, chat rows and two weighted sources."""

from __future__ import annotations

import json
import random

import pytest

from distft.config.load import load_config
from distft.data import batched, report
from distft.data.clean import clean
from distft.data.encode import sft_lengths_and_tokens, token_lengths
from distft.data.schemas import to_canonical
from distft.data.sft_format import PRETOKENIZED
from distft.data.sources import mix, read_sources
from distft.data.split import split_rows
from distft.errors import DataError
from distft.methods.sft import SFT
from distft.models.tiny import build_tokenizer

pytestmark = pytest.mark.quick

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _generate(path, n: int, seed: int, classify: bool = False) -> None:
    rng = random.Random(seed)
    lines, rows, plain = [], [], []  # plain: the prompt/completion rows
    for i in range(n):
        r = rng.random()
        if rows and r < 0.12:  # exact duplicate (sometimes only after normalization)
            row = dict(rng.choice(rows))
            if rng.random() < 0.5 and "prompt" in row:
                row["prompt"] = row["prompt"].replace(" ", "  ") + " \r\n"
        elif plain and r < 0.25:  # near duplicate: one word changed, same answer
            row = dict(rng.choice(plain))
            words = row["prompt"].split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            row["prompt"] = " ".join(words)
        elif plain and r < 0.3:  # same prompt, another answer (a conflict)
            row = dict(rng.choice(plain), completion=f" {rng.choice(WORDS)} {i}")
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 22)))
            if rng.random() < 0.05:
                prompt += f" mail me at user{i}@example.com or call +1 415 555 {1000 + i:04d}"
            if rng.random() < 0.03:
                prompt += " FORBIDDEN"
            if classify:
                row = {"text": prompt, "label": rng.choice(["pos", "neg", "neu"])}
            elif rng.random() < 0.1:
                row = {
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "ok"}]
                }
            else:
                row = {
                    "prompt": prompt + " =",
                    "completion": " " + " ".join(rng.choices(WORDS, k=rng.randint(rng.random() < 0.97, 6))),
                }
        rows.append(row)
        lines.append(json.dumps(row))
        if rng.random() < 0.02:
            lines.append('{"prompt": "broken')  # malformed
        if rng.random() < 0.02:
            lines.append(json.dumps({"prompt": "", "completion": ""}))  # no content
    path.write_text("\n".join(lines) + "\n")


def _old(cfg, tok, kind):
    """The whole-list steps (what the pipeline did before it worked in batches)."""
    d = cfg.data
    sources = read_sources(d.path, d.bad_lines)
    rows = [r for s in sources for r in s.rows]
    canonical, empty, formats = to_canonical(rows, d.format, d.columns, kind, cfg.method.name)
    cleaned = clean(canonical, d, token_lengths(tok), d.max_length, empty)
    train, val, test = split_rows(cleaned.rows, d.splits, cfg.train.seed, d.stratify)
    mixed = mix(train, d.weights, cfg.train.seed) if d.weights else None
    return sources, formats, cleaned, {"train": mixed[0] if mixed else train, "val": val, "test": test}, mixed


def _report(cleaned, formats, max_length):
    return report.build(
        sources=[], bad_lines=[], cleaned=cleaned, splits={}, mix=None, max_length=max_length,
        warn_ratio=3.0, formats=formats,
    )  # fmt: skip


@pytest.mark.parametrize("case", ["sft", "classify"])
def test_batched_preparation_decides_as_the_whole_list(tmp_path, monkeypatch, case):
    monkeypatch.setattr(batched, "BATCH", 37)  # many batches over two workers
    tok = build_tokenizer()
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    _generate(paths[0], 700, 1, case == "classify")
    _generate(paths[1], 150, 2, case == "classify")
    over = [
        f"data.path=[{paths[0]},{paths[1]}]", "data.weights=[1,2]", "data.num_proc=2", "data.pii_mask=true",
        "data.min_chars=12", "data.max_chars=150", "data.drop_patterns=[FORBIDDEN]", "data.max_length=140",
        "data.overlong=drop", "data.near_dedup_threshold=0.7",
    ]  # fmt: skip
    if case == "classify":
        over.append("method=classify")
    cfg = load_config(over)[0]
    kind = "classification" if case == "classify" else "sft"
    sources, formats, cleaned, parts, mixed = _old(cfg, tok, kind)
    tokens_of = sft_lengths_and_tokens(tok) if case == "sft" else None  # SFT: tokenized once
    store = batched.Store(tmp_path / "rows.arrow")
    new = batched.prepare_rows(cfg, None, token_lengths(tok), store, kind, tokens_of=tokens_of)
    c = new.cleaned
    # every stage removed something, and the data report says the same, key order included
    counts = cleaned.counts
    assert all(counts[k] for k in ("empty", "too_short", "too_long", "filtered", "exact_duplicate")), counts
    assert case == "classify" or (counts["near_duplicate"] and cleaned.conflicts and cleaned.pii["email"])
    want, got = _report(cleaned, formats, 140), _report(c, new.formats, 140)
    assert json.dumps(got) == json.dumps(want)
    assert list(c.rows) == cleaned.rows and c.lengths == cleaned.lengths
    assert [s.rows for s in sources] and new.sources.rows == [len(s.rows) for s in sources]
    assert new.sources.bad_lines == [s.bad_lines for s in sources] and any(new.sources.bad_lines)
    for name in ("train", "val", "test"):  # the grouped (and stratified) split, then the mix
        assert list(new.parts[name]) == parts[name], name
    assert new.mixed == mixed[1]
    if case == "sft":  # the tokens kept while cleaning encode as the rows do, chat rows included
        for name in ("train", "val", "test"):
            rows, tokens = new.parts[name].read(0, len(new.parts[name]))  # as an encoding worker reads
            assert all(t is not None for t in tokens) and not any(PRETOKENIZED in r for r in new.parts[name])
            rows = [{**r, PRETOKENIZED: t} for r, t in zip(rows, tokens)]
            assert any("messages" in r for r in rows)
            assert SFT.encode(rows, tok, cfg, True) == SFT.encode(parts[name], tok, cfg, True), name


def test_batched_errors_come_in_the_old_order(tmp_path, monkeypatch):
    monkeypatch.setattr(batched, "BATCH", 5)
    tok = build_tokenizer()
    rows = [{"prompt": f"q{i} =", "completion": f" a{i}"} for i in range(30)]
    rows[3] = {"messages": [{"role": "user", "content": "no reply"}]}  # no assistant turn
    rows[12] = {"question": "unknown schema"}
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in rows] + ["{broken"]
    path.write_text("\n".join(lines) + "\n")

    def run(*over):
        cfg = load_config([f"data.path=[{path}]", "data.num_proc=2", *over])[0]
        store = batched.Store(tmp_path / f"rows{len(over)}.arrow")
        return batched.prepare_rows(cfg, None, token_lengths(tok), store, "sft")

    with pytest.raises(DataError, match=r"d.jsonl:31: malformed JSON"):  # reading errors first
        run("data.bad_lines=error")
    with pytest.raises(DataError, match=r"d.jsonl:13"):  # then the first row of no known schema
        run()
    path.write_text("\n".join(lines[:12] + lines[13:]) + "\n")
    with pytest.raises(DataError, match=r"1 chat row\(s\) have no assistant turn \(.*d.jsonl:4"):
        run("data.format=auto")


def test_minhash_signatures_are_datasketchs(monkeypatch):
    """near_dedup._signatures hashes many texts per numpy step (ASCII texts' shingles cut by numpy, each
    distinct one hashed once); the values are datasketch's own."""
    import numpy as np
    from datasketch import MinHash

    from distft.data import near_dedup as c

    monkeypatch.setattr(c, "SIG_SHINGLES", 300)  # several steps, texts longer than one step
    rng = random.Random(3)
    texts = ["".join(rng.choice("ab cdé\n") for _ in range(rng.randint(0, 400))) for _ in range(300)]
    texts += ["".join(rng.choice("ab cd\n") for _ in range(rng.randint(0, 400))) for _ in range(300)]  # ASCII
    texts += ["", "abc", "abcde", "abcdef", "Ünïcode ☃ text", "nul\0in a text", "A  TAB\tand CASE"]
    want = MinHash.bulk([c._shingles(t) for t in texts], num_perm=c.NUM_PERM)
    assert np.array_equal(c._signatures(texts), np.stack([m.hashvalues for m in want]).astype(np.uint32))
