"""The prepared-data cache (issue 15 points 1, 3, 6): Arrow files every rank memory-maps, keyed by
what shapes the data and shared by runs, resumes and sweep trials; one writer per key; eval loss
capped by data.max_eval_examples."""

from __future__ import annotations

import json
import multiprocessing as mp
import tracemalloc

import pytest

from distft.config.load import load_config
from distft.data import cache as data_cache
from distft.data import pipeline
from distft.data.rows import Rows, write_rows
from distft.methods import METHODS
from distft.models.tiny import build_tokenizer

pytestmark = pytest.mark.quick


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _cfg(tmp_path, *overrides):
    cfg, _ = load_config([f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    return cfg


def _prepared(cfg, tok, run_dir, is_main=True):
    method = METHODS[cfg.method.name](cfg, tok)
    return pipeline.prepare_cached(cfg, method, tok, run_dir, is_main, quiet=True)


@pytest.mark.parametrize(
    "overrides,encoding",
    [
        ([], "tokens16"),  # the tiny tokenizer: ids far below 65,536
        (["data.packing=true", "data.max_length=48"], "tokens16"),
        (["method=dpo", "data.num_examples=300"], "json"),
        (["method=classify", "data.num_examples=300"], "json"),
    ],
)
def test_cached_rows_equal_the_prepared_rows(tmp_path, tok, overrides, encoding):
    cfg = _cfg(tmp_path, *overrides)
    fresh = pipeline.prepare(cfg, METHODS[cfg.method.name](cfg, tok), tok)
    cached = _prepared(cfg, tok, tmp_path / "run")
    assert isinstance(cached.train, Rows) and cached.train.encoding == encoding
    for name in ("train", "val", "test", "val_rows", "test_rows"):
        want = json.loads(json.dumps(getattr(fresh, name), default=str))
        assert list(getattr(cached, name)) == want, name
    assert cached.train[-1] == want_last(fresh.train)
    assert cached.val[:2] == json.loads(json.dumps(fresh.val[:2]))
    assert cached.report["counts"] == fresh.report["counts"]


def want_last(rows):
    return json.loads(json.dumps(rows[-1], default=str))


def test_tokens_encoding_round_trips_packed_and_odd_rows(tmp_path):
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, 8, 9], "position_ids": [0, 1, 0, 1, 2]},
        {"input_ids": [], "labels": [], "position_ids": []},
        {"input_ids": [70000], "labels": [70000], "position_ids": [0]},
    ]
    assert write_rows(tmp_path / "a.arrow", rows) == "tokens"
    assert list(Rows(tmp_path / "a.arrow", "tokens")) == rows
    odd = [*rows, {"input_ids": [1, 2], "labels": [-100, 3], "position_ids": [0, 1]}]  # label != id
    assert write_rows(tmp_path / "b.arrow", odd) == "json"
    assert list(Rows(tmp_path / "b.arrow", "json")) == odd
    gap = [{"input_ids": [1, 2], "labels": [1, 2], "position_ids": [0, 2]}]
    assert write_rows(tmp_path / "c.arrow", gap) == "json"
    small = rows[:2] * 500  # every id below 65,536: two bytes a token
    assert write_rows(tmp_path / "d.arrow", small) == "tokens16"
    assert list(Rows(tmp_path / "d.arrow", "tokens16")) == small
    assert Rows(tmp_path / "d.arrow", "tokens16").lengths().tolist() == [5, 0] * 500


def test_a_second_run_reuses_the_cache_and_gets_its_report(tmp_path, tok, monkeypatch):
    cfg = _cfg(tmp_path, "data.num_examples=400")
    first = _prepared(cfg, tok, tmp_path / "run1")

    def no_prepare(*a, **k):
        raise AssertionError("prepared again")

    monkeypatch.setattr(pipeline, "prepare", no_prepare)
    cfg2 = _cfg(tmp_path, "data.num_examples=400", "train.lr=0.1", "data.max_eval_generations=3")
    second = _prepared(cfg2, tok, tmp_path / "run2")
    assert list(second.train) == list(first.train)
    run2 = tmp_path / "run2"
    assert json.loads((run2 / "data_report.json").read_text())["counts"] == first.report["counts"]
    assert sum(1 for _ in open(run2 / "data" / "train.jsonl")) == first.report["splits"]["train"]["rows"]
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and str(entries[0]) == first.report["cache"]
    assert not str(entries[0]).startswith(str(tmp_path / "run1"))  # outside the run dir


def test_the_key_follows_content_tokenizer_and_settings(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = _cfg(tmp_path, f"data.path=[{f}]")
    key = data_cache.cache_key(cfg, tok)
    st = f.stat()
    f.write_text('{"prompt": "a", "completion": "c"}\n')  # same size and path
    import os

    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert data_cache.cache_key(cfg, tok) != key
    key = data_cache.cache_key(cfg, tok)
    for same in ("data.max_eval_examples=5", "data.num_proc=2", "train.lr=0.5", "data.cache_dir=/elsewhere"):
        assert data_cache.cache_key(_cfg(tmp_path, f"data.path=[{f}]", same), tok) == key, same
    for other in ("data.max_length=32", "train.seed=7", "data.dedup=false", "method.train_on_prompt=true"):
        assert data_cache.cache_key(_cfg(tmp_path, f"data.path=[{f}]", other), tok) != key, other
    tok2 = build_tokenizer()
    tok2.chat_template = "{{ messages }}"
    assert data_cache.cache_key(cfg, tok2) != key


def test_max_eval_examples_caps_eval_loss_not_generation(tmp_path, tok):
    cfg = _cfg(tmp_path, "data.num_examples=600", "data.max_eval_examples=7")
    data = _prepared(cfg, tok, tmp_path / "run")
    assert len(data.val) == 7 and len(data.val_rows) > 7
    assert data.report["splits"]["val"]["eval_examples"] == 7
    full = _prepared(_cfg(tmp_path, "data.num_examples=600"), tok, tmp_path / "run2")
    assert data.report["cache"] == full.report["cache"]  # same entry: the cap is read-time
    assert list(data.val) == list(full.val)[:7]
    with pytest.raises(Exception, match="data.max_eval_examples must be >= 0"):
        load_config(["data.max_eval_examples=-1"])


def test_loading_a_split_holds_no_python_rows(tmp_path):
    n = 50_000
    ex = {"input_ids": list(range(40)), "labels": list(range(40)), "position_ids": list(range(40))}
    rows = [ex] * n
    write_rows(tmp_path / "big.arrow", rows)
    del rows
    tracemalloc.start()
    split = Rows(tmp_path / "big.arrow", "tokens")
    assert len(split) == n and split[n - 1]["input_ids"][-1] == 39 and len(split.lengths()) == n
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 << 20  # a JSON cache parsed into lists takes ~100x this for these rows


def _race(args):
    cache_dir, run_dir, marker = args
    from distft.config.load import load_config
    from distft.data import pipeline
    from distft.methods import METHODS
    from distft.models.tiny import build_tokenizer

    real = pipeline.prepare

    def counted(*a, **k):
        with open(marker, "a") as f:
            f.write("x")
        return real(*a, **k)

    pipeline.prepare = counted
    cfg, _ = load_config([f"data.cache_dir={cache_dir}", "data.num_examples=800"])
    tok = build_tokenizer()
    data = pipeline.prepare_cached(cfg, METHODS["sft"](cfg, tok), tok, run_dir, True, quiet=True)
    return [data.train[i] for i in range(0, len(data.train), 97)]


def test_concurrent_preparers_of_one_key_wait_for_one_writer(tmp_path):
    marker = tmp_path / "builds"
    cfg, _ = load_config([f"data.cache_dir={tmp_path / 'cache'}", "data.num_examples=800"])
    key = data_cache.cache_key(cfg, build_tokenizer())
    (tmp_path / "cache" / f"{key}.tmp1" / "data").mkdir(parents=True)  # a killed writer's leftover
    ctx = mp.get_context("fork")
    with ctx.Pool(3) as pool:
        out = pool.map(_race, [(tmp_path / "cache", tmp_path / f"run{i}", marker) for i in range(3)])
    assert marker.read_text() == "x"  # one preparation, the others waited and reused it
    assert out[0] == out[1] == out[2]
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name]
    assert not leftovers


@pytest.mark.parametrize("packing", [False, True])
def test_batched_parallel_encoding_equals_one_call(tmp_path, tok, monkeypatch, packing):
    from distft.data import encode

    monkeypatch.setattr(encode, "CHUNK", 150)  # several chunks, two workers
    over = ["data.num_examples=900", "data.num_proc=2", f"data.packing={str(packing).lower()}"]
    cfg = _cfg(tmp_path, *over, "data.max_length=40")
    fresh = pipeline.prepare(cfg, METHODS["sft"](cfg, tok), tok)
    cached = _prepared(cfg, tok, tmp_path / "run")
    assert list(cached.train) == fresh.train and list(cached.val) == fresh.val
    assert cached.report["splits"].pop("val").pop("eval_examples") == len(fresh.val)  # added at read time
    fresh.report["splits"].pop("val")
    assert cached.report["splits"] == fresh.report["splits"]
    assert ("packing" in cached.report) == packing
    assert not list((tmp_path / "cache").glob("*/*.unpacked.arrow"))


def test_row_writer_switches_to_json_for_the_whole_file(tmp_path):
    from distft.data.rows import RowWriter

    tokens = [{"input_ids": [1, 2], "labels": [-100, 2], "position_ids": [0, 1]}] * 1500
    other = [{"chosen_ids": [1], "rejected_ids": [2]}]
    w = RowWriter(tmp_path / "x.arrow")
    w.add(tokens)
    w.add(other)
    rows = w.close()
    assert rows.encoding == "json" and list(rows) == tokens + other
    # tokens16 widens to tokens (int32 ids) from the first batch with an id of 65,536 or more.
    wide = [{"input_ids": [70000, 3], "labels": [-100, 3], "position_ids": [0, 1]}]
    w = RowWriter(tmp_path / "y.arrow")
    w.add(tokens)
    assert w.encoding == "tokens16"
    w.add(wide)
    rows = w.close()
    assert rows.encoding == "tokens" and list(rows) == tokens + wide
