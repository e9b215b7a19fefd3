"""SFT rows encoded by the workers straight to Arrow (issue 15 point 7, prepare wall time): the
tables `sft_arrow.sft_tables` builds from the tokens cleaning kept are byte for byte the ones
SFT.encode's lists give through RowWriter; the row copies the workers render (data/*.jsonl, the
val/test rows) are the bytes the serial writers wrote; a worker's narrower batch is written in the
file's wider encoding."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from distft.config.load import load_config
from distft.data import batched, encode
from distft.data.rows import BATCH, RowWriter, narrowest, write_rows
from distft.data.sft_arrow import sft_tables
from distft.data.sft_format import PRETOKENIZED, sft_tokens
from distft.methods.sft import SFT
from distft.models.tiny import build_tokenizer

pytestmark = pytest.mark.quick


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choices(words, k=rng.randint(0, 12)))  # some beyond max_length below
        completion = "" if rng.random() < 0.05 else " " + " ".join(rng.choices(words, k=rng.randint(1, 4)))
        rows.append({"prompt": prompt, "completion": completion, "_source": f"x:{i}", "_src": 0})
    return rows


def _bytes(tables) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, tables[0].schema) as w:
        for t in tables:
            w.write_table(t)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_sft_tables_are_sft_encode_through_the_row_writer(tok, train_on_prompt):
    cfg, _ = load_config(["data.max_length=40", f"method.train_on_prompt={str(train_on_prompt).lower()}"])
    rows = _rows(3 * BATCH)
    tokens = sft_tokens(rows, tok)
    examples, stats = SFT.encode([dict(r, **{PRETOKENIZED: t}) for r, t in zip(rows, tokens)], tok, cfg, True)
    assert 0 < stats["truncated"] and 0 < stats["dropped_no_target"]  # both cut and dropped rows
    want = [narrowest(examples[i : i + BATCH]) for i in range(0, len(examples), BATCH)]
    tables, lengths, got_stats = sft_tables(tokens, tok.eos_token_id, 40, train_on_prompt)
    assert [e for e, _ in tables] == [e for e, _ in want] == ["tokens16"] * len(want) and len(want) >= 2
    assert _bytes([t for _, t in tables]) == _bytes([t for _, t in want])
    assert lengths.tolist() == [len(ex["input_ids"]) for ex in examples]
    assert list(got_stats.items()) == list(stats.items())


def test_worker_copies_and_tables_are_the_serial_bytes(tmp_path, tok, monkeypatch):
    """encode_split over a StoreRows split in 2 workers (chunks of 150 rows read in the workers)
    writes train.arrow, data/<name>.jsonl and <name>_rows.arrow as the serial code did."""
    monkeypatch.setattr(encode, "CHUNK", 150)
    cfg, _ = load_config(["data.max_length=40", "data.num_proc=2"])
    rows = _rows(1300)
    tokens = sft_tokens(rows, tok)
    store = batched.Store(tmp_path / "rows.arrow")
    for i in range(0, len(rows), 200):
        store.add(
            [batched.pickle.dumps(r) for r in rows[i : i + 200]],
            [batched.pack_tokens(t) for t in tokens[i : i + 200]],
        )
    store.close()
    order = random.Random(1).sample(range(len(rows)), len(rows))
    part = store.rows(order)
    assert part[5] == rows[order[5]] and part[-1] == rows[order[-1]]  # read in any order
    copies = encode.RowCopies(tmp_path / "data" / "val.jsonl", tmp_path / "val_rows.arrow")
    got, _ = encode.encode_split("val", part, False, cfg, SFT(cfg, tok), tok, tmp_path, copies)
    assert copies.close() is None  # closed by encode_split
    shuffled = [rows[i] for i in order]
    want = RowWriter(tmp_path / "want.arrow")  # the old main process: each chunk's lists written
    for i in range(0, len(shuffled), 150):
        want.add(SFT.encode(shuffled[i : i + 150], tok, cfg, False)[0])
    assert want.close().encoding == got.encoding == "tokens16"
    assert (tmp_path / "val.arrow").read_bytes() == (tmp_path / "want.arrow").read_bytes()
    write_rows(tmp_path / "want_rows.arrow", shuffled, "json")
    assert (tmp_path / "val_rows.arrow").read_bytes() == (tmp_path / "want_rows.arrow").read_bytes()
    lines = "".join(json.dumps({k: v for k, v in r.items() if k != "_src"}) + "\n" for r in shuffled)
    assert (tmp_path / "data" / "val.jsonl").read_text() == lines


def test_a_narrower_batch_is_written_in_the_files_encoding(tmp_path):
    wide = [{"input_ids": [70000, 3], "labels": [-100, 3], "position_ids": [0, 1]}]
    narrow = [{"input_ids": [1, 2], "labels": [-100, 2], "position_ids": [0, 1]}] * 3
    by_rows, by_tables = RowWriter(tmp_path / "a.arrow"), RowWriter(tmp_path / "b.arrow")
    for batch in (narrow, wide, narrow):
        by_rows.add(batch)
        by_tables.add_table(*narrowest(batch))
    assert by_rows.close().encoding == by_tables.close().encoding == "tokens"
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()
