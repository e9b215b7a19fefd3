"""Batched, parallel encoding for every method (issue 15 point 2): preference pairs (dpo,
reward), RL prompts (grpo), classification and KTO (its KL partners linked across chunks) are
encoded in chunks of encode.CHUNK rows with data.num_proc workers, written as they are done, with
the same rows and report as one call; the skip limit is checked once on the whole split."""

from __future__ import annotations

import json

import pytest

from distft.config.load import load_config
from distft.data import encode, pipeline
from distft.errors import DataError
from distft.methods import METHODS
from distft.models.tiny import build_tokenizer

pytestmark = pytest.mark.quick


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _cfg(tmp_path, *overrides):
    return load_config([f"data.cache_dir={tmp_path / 'cache'}", *overrides])[0]


@pytest.mark.parametrize("method", ["dpo", "grpo", "classify"])  # reward shares dpo's PairRows; kto below
def test_chunked_parallel_encoding_equals_one_call(tmp_path, tok, monkeypatch, method):
    monkeypatch.setattr(encode, "CHUNK", 40)  # several chunks, two workers
    cfg = _cfg(tmp_path, f"method={method}", "data.num_examples=160", "data.num_proc=2")
    fresh = pipeline.prepare(cfg, METHODS[method](cfg, tok), tok)
    cached = pipeline.prepare_cached(cfg, METHODS[method](cfg, tok), tok, tmp_path / "run", True, quiet=True)
    for name in ("train", "val", "test"):
        assert list(getattr(cached, name)) == json.loads(json.dumps(getattr(fresh, name), default=str)), name
    cached.report["splits"]["val"].pop("eval_examples")
    assert cached.report["splits"] == fresh.report["splits"]
    assert cached.report["counts"] == fresh.report["counts"]


def test_kto_is_encoded_in_bounded_chunks_linked_across_them(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(encode, "CHUNK", 50)
    kto = METHODS["kto"]
    calls, real = [], kto.encode_chunk

    def spy(rows, tokenizer, cfg, train, start):
        calls.append((start, len(rows)))
        return real(rows, tokenizer, cfg, train, start)

    monkeypatch.setattr(kto, "encode_chunk", staticmethod(spy))
    cfg = _cfg(
        tmp_path, "method=kto", "data.num_examples=300", "data.splits=[1,0,0]", "data.num_proc=1"
    )  # spied here
    fresh = pipeline.prepare(cfg, kto(cfg, tok), tok)
    cached = pipeline.prepare_cached(cfg, kto(cfg, tok), tok, tmp_path / "run", True, quiet=True)
    assert [s for s, n in calls if n] == list(range(0, 300, 50)) and max(n for _, n in calls) == 50
    assert (
        list(cached.train) == fresh.train
        and cached.report["splits"]["train"] == fresh.report["splits"]["train"]
    )
    pairs = [ex["pair"] for ex in fresh.train]
    assert pairs == sorted(pairs) and pairs[-1] > 250  # pair ids are the rows' places in the split
    by_completion = {tuple(ex["completion_ids"]): i for i, ex in enumerate(fresh.train)}
    partners = [by_completion.get(tuple(ex["kl_ids"])) for ex in fresh.train]
    assert any(p is not None and abs(p - i) > 100 for i, p in enumerate(partners))  # across chunks


def test_pairs_are_encoded_in_bounded_chunks_and_skips_checked_on_the_split(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(encode, "CHUNK", 40)
    rows = [{"prompt": f"q{i} =", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(400)]
    for r in rows[:24]:  # 6% unusable, all in the first rows
        r["rejected"] = r["chosen"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    dpo = METHODS["dpo"]
    real = dpo.encode

    def spy(rows, tokenizer, cfg, train):
        calls.append(len(rows))
        return real(rows, tokenizer, cfg, train)

    monkeypatch.setattr(dpo, "encode", staticmethod(spy))
    over = [f"data.path=[{path}]", "method=dpo", "data.splits=[1,0,0]", "data.near_dedup=false"]
    over.append("data.num_proc=1")  # the spy counts calls in this process
    cfg = _cfg(tmp_path, *over, "method.max_skip_fraction=0.1")
    data = pipeline.prepare_cached(cfg, dpo(cfg, tok), tok, tmp_path / "run", True, quiet=True)
    assert max(calls) <= 40 and len(calls) >= 10  # never the whole split at once
    assert len(data.train) == 376 and data.report["splits"]["train"]["skipped"] == 24
    assert "skipped_first" not in data.report["splits"]["train"]
    # Over the limit on the whole split (6% > 5%): one error naming the first bad rows.
    cfg = _cfg(tmp_path, *over, "method.max_skip_fraction=0.05")
    with pytest.raises(DataError, match=r"24 of 400 preference rows are unusable.*pairs.jsonl:\d+"):
        pipeline.prepare_cached(cfg, dpo(cfg, tok), tok, tmp_path / "run2", True, quiet=True)


def _lsh_reference(rows, threshold):
    """The previous implementation's decisions: query a datasketch MinHashLSH of the kept rows."""
    from datasketch import MinHash, MinHashLSH

    from distft.data import near_dedup as c

    parts = [c.prompt_and_answer(r) for r in rows]
    sigs = MinHash.bulk([c._shingles(p) for p, _ in parts], num_perm=c.NUM_PERM)
    res = c.Cleaned([], None, {})
    lsh = MinHashLSH(threshold=threshold, num_perm=c.NUM_PERM)
    keep = []
    for i, sig in enumerate(sigs):
        match = [
            j
            for j in lsh.query(sig)
            if c._NUMBER.findall("\n".join(parts[i])) == c._NUMBER.findall("\n".join(parts[j]))
            and c.loose(parts[i][1]) == c.loose(parts[j][1])
            and sig.jaccard(sigs[j]) >= threshold
        ]
        if not match:
            lsh.insert(i, sig)
            keep.append(i)
    return keep, res


def test_near_dedup_at_scale_decides_as_datasketch_lsh(monkeypatch):
    import random

    from distft.data import near_dedup as c

    monkeypatch.setattr(c, "SIG_CHUNK", 97)  # several chunks over two workers
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    rows = []
    for _ in range(600):
        base = " ".join(rng.choice(words) for _ in range(12))
        if rows and rng.random() < 0.4:  # a variant of an earlier row: one word changed or none
            prev = rng.choice(rows)
            toks = prev["prompt"].split()
            toks[rng.randrange(len(toks))] = rng.choice(words)
            base, answer = " ".join(toks), prev["completion"] if rng.random() < 0.8 else "other"
        else:
            answer = rng.choice(words)
        rows.append({"prompt": base, "completion": answer})
    for threshold in (0.85, 0.6):
        res = c.Cleaned([], None, {})
        keep = c.near_duplicates(rows, threshold, res, num_proc=2)
        want, _ = _lsh_reference(rows, threshold)
        assert keep == want and 0 < len(rows) - len(keep) == res.drops["near_duplicate"]["count"]
