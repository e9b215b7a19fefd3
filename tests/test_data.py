"""Data formats, schema mapping, cleaning, dedup, PII masking, splits, mixing and the data report.

In-process and single-process on data the tests write; the multi-rank end-to-end run (messy data
through a real 2-rank training job with early stopping) lives in tests/test_eval.py.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from distft.config.load import load_config
from distft.data import report as data_report
from distft.data.clean import clean, mask_pii, normalize_text
from distft.data.pipeline import prepare
from distft.data.schemas import to_canonical
from distft.data.sources import mix, read_sources
from distft.data.split import split_rows
from distft.errors import ConfigError, DataError
from distft.methods import METHODS
from distft.models.tiny import build_tokenizer

pytestmark = pytest.mark.quick


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def data_cfg(**kw):
    cfg, _ = load_config([])
    for k, v in kw.items():
        setattr(cfg.data, k, v)
    return cfg.data


def pc(prompt, completion, i=0):
    return {"prompt": prompt, "completion": completion, "_source": f"t:{i}"}


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- formats
def test_every_file_format_reads_the_same_rows(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "c.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    specs = ["a.jsonl", "b.json", "c.csv", "d.parquet", "saved", "saved_dict"]
    sources = read_sources([str(tmp_path / s) for s in specs])
    for spec, src in zip(specs, sources):
        got = [{k: v for k, v in r.items() if not k.startswith("_")} for r in src.rows]
        assert got == rows, spec
        assert all(r["_src"] == specs.index(spec) for r in src.rows)
    assert sources[0].rows[2]["_source"].endswith("a.jsonl:3")
    assert sources[2].rows[1]["_source"].endswith("c.csv#1")


def test_malformed_jsonl_line_skipped_with_file_line_or_error(tmp_path):
    f = jsonl(tmp_path / "x.jsonl", [pc("a", "b"), '{"prompt": "a", "completion": ', pc("c", "d")])
    (src,) = read_sources([str(f)], bad_lines="skip")
    assert len(src.rows) == 2
    assert src.bad_lines[0]["where"] == f"{f}:2" and "malformed JSON" in src.bad_lines[0]["error"]
    with pytest.raises(DataError, match=rf"{f}:2: malformed JSON"):
        read_sources([str(f)], bad_lines="error")


def test_directory_and_missing_path(tmp_path):
    (tmp_path / "d").mkdir()
    jsonl(tmp_path / "d" / "1.jsonl", [pc("a", "b")])
    jsonl(tmp_path / "d" / "2.jsonl", [pc("c", "d")])
    (src,) = read_sources([str(tmp_path / "d")])
    assert [r["prompt"] for r in src.rows] == ["a", "c"]
    with pytest.raises(DataError, match="no such file or directory"):
        read_sources([str(tmp_path / "nope.csv")])


# ---------------------------------------------------------------- schemas
def test_schemas_are_recognized_and_mapped():
    rows = [
        {"prompt": "p", "completion": "c", "id": 7, "_source": "s:1"},
        {"instruction": "Add", "input": "2 2", "output": "4", "_source": "s:2"},
        {"instruction": "Hi", "input": "", "output": "Hello", "_source": "s:3"},
        {
            "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
            "_source": "s:4",
        },
        {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}], "_source": "s:5"},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "x"}]},
                {"role": "assistant", "content": "y"},
            ]
        },
    ]
    out, empty, formats = to_canonical(rows, "auto", {}, "sft", "sft")
    assert not empty
    assert formats == {"prompt_completion": 1, "alpaca": 2, "messages": 2, "sharegpt": 1}
    assert out[0] == {
        "prompt": "p",
        "completion": "c",
        "id": 7,
        "_source": "s:1",
    }  # extra fields pass through
    assert out[1]["prompt"] == "Add\n2 2\n" and out[1]["completion"] == "4"
    assert out[2]["prompt"] == "Hi\n"
    assert out[4]["messages"] == [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert out[5]["messages"][0]["content"] == "x"
    pref, _, f = to_canonical([{"prompt": "p", "chosen": "good", "rejected": "bad"}], "auto", {}, None, "dpo")
    assert f == {"preference": 1} and pref[0]["chosen"] == "good"
    cls, _, f = to_canonical(
        [{"sentence": "nice", "y": 1}], "auto", {"text": "sentence", "label": "y"}, None, "x"
    )
    assert f == {"classification": 1} and cls[0]["text"] == "nice" and cls[0]["label"] == 1


def test_unknown_schema_names_found_and_expected_fields():
    with pytest.raises(DataError) as e:
        to_canonical([{"question": "q", "answer": "a", "_source": "f.jsonl:3"}], "auto", {}, "sft", "sft")
    msg = str(e.value)
    assert "f.jsonl:3" in msg and "['answer', 'question']" in msg
    assert "prompt+completion" in msg and "instruction+output" in msg and "text+label" in msg
    assert "data.columns" in msg
    # forced format, wrong kind for the method, unknown ShareGPT role
    with pytest.raises(DataError, match=r"data.format=alpaca needs fields \[instruction, output\]"):
        to_canonical([{"prompt": "p", "completion": "c"}], "alpaca", {}, "sft", "sft")
    with pytest.raises(DataError, match="do not fit method=sft"):
        to_canonical([{"text": "t", "label": "x"}], "auto", {}, "sft", "sft")
    with pytest.raises(DataError, match="unknown ShareGPT role 'robot'"):
        to_canonical([{"conversations": [{"from": "robot", "value": "x"}]}], "auto", {}, "sft", "sft")


def test_empty_rows_are_set_aside_not_errors():
    out, empty, _ = to_canonical(
        [{}, {"prompt": "", "completion": None}, pc("a", "b")], "auto", {}, "sft", "sft"
    )
    assert len(out) == 1 and len(empty) == 2


# ---------------------------------------------------------------- cleaning
def test_normalization():
    assert normalize_text("ｆｕｌｌ\u00a0width  ﬁne") == "full width fine"  # NFKC
    assert normalize_text("  a \t b  \r\n\n\n\nc   ") == "a b\n\nc"
    assert normalize_text("    indented  code") == "indented code"  # ends are trimmed
    assert normalize_text("x\n    indented  code") == "x\n    indented code"  # indentation kept


def test_whitespace_variants_are_duplicates_and_boundary_kept():
    rows = [
        pc("Capital of France:", " Paris", 1),
        pc("  Capital   of France:", " Paris  ", 2),
        pc("Capital of France:", "Paris", 3),
    ]
    res = clean(rows, data_cfg(near_dedup=False))
    assert [r["_source"] for r in res.rows] == ["t:1", "t:3"]  # "Paris" without the space differs
    assert res.rows[0]["completion"] == " Paris"
    assert res.counts["exact_duplicate"] == 1
    assert res.drops["exact_duplicate"]["examples"][0] == {"where": "t:2", "detail": "same as t:1"}
    res = clean(rows, data_cfg())  # ... but it is a near duplicate
    assert [r["_source"] for r in res.rows] == ["t:1"] and res.counts["near_duplicate"] == 1


def test_templated_rows_with_different_answers_survive_near_dedup():
    rows = [pc("What is 3 times 4?", "12", 1), pc("What is 3 times 5?", "15", 2)]
    template = "You are a careful assistant. Read the question and answer with the capital city only. Q: "
    rows += [pc(template + "France?", "Paris", 3), pc(template + "Spain?", "Madrid", 4)]
    rows += [pc(template + "what is 7 + 8?", "15", 5), pc(template + "what is 7 + 9?", "15", 6)]
    res = clean(rows, data_cfg(near_dedup_threshold=0.5))  # even at a loose threshold
    assert len(res.rows) == 6 and res.counts["near_duplicate"] == 0


def test_near_duplicates_with_matching_answers_are_removed():
    q = "Explain briefly why the sky looks blue on a clear day at noon"
    rows = [
        pc(q + ".", "Rayleigh scattering.", 1),
        pc(q + "?", "Rayleigh scattering", 2),
        pc(q + "!!", "rayleigh  scattering!", 3),
    ]
    rows.append(pc("Explain briefly why grass looks green in spring", "Chlorophyll.", 4))
    rows.append(pc(q + ".", "Because of dust.", 5))  # same prompt, other answer: kept (a conflict)
    res = clean(rows, data_cfg())
    assert [r["_source"] for r in res.rows] == ["t:1", "t:4", "t:5"]
    assert res.counts["near_duplicate"] == 2 and res.counts["duplicates_removed"] == 2
    assert res.conflicts == 1
    off = clean(rows, data_cfg(near_dedup=False))
    assert len(off.rows) == 5


def test_empty_short_long_and_pattern_filters(tok):
    rows = [
        pc("a", "b", 1),
        pc("q", "  ", 2),
        pc("hello", "world", 3),
        pc("x" * 80, "y", 4),
        pc("drop me", "z", 5),
    ]
    res = clean(rows, data_cfg(min_chars=3, max_chars=50, drop_patterns=["^drop"]))
    assert [r["_source"] for r in res.rows] == ["t:3"]
    assert {k: res.counts[k] for k in ("empty", "too_short", "too_long", "filtered")} == {
        "empty": 1,
        "too_short": 1,
        "too_long": 1,
        "filtered": 1,
    }

    def lengths(rs):
        return [len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in rs]

    res = clean([pc("abc", "d", 1), pc("a" * 30, "b", 2)], data_cfg(overlong="drop"), lengths, max_tokens=10)
    assert [r["_source"] for r in res.rows] == ["t:1"] and res.lengths == [4]
    assert res.drops["too_long"]["examples"][0]["detail"] == "31 tokens > data.max_length=10"


def test_pii_masking_counts():
    text = (
        "Mail jane.doe@example.com or bob@mail.example.org, call +1 415-555-0132 or (415) 555-0199, "
        "server 192.168.1.20 and 2001:db8::8a2e:370:7334, card 4111 1111 1111 1111, "
        "order 1234567812345678 (not Luhn), version 1.2.3, 3 times 4 is 12"
    )
    out, counts = mask_pii(text, ["email", "phone", "ip", "card"])
    assert counts == {"email": 2, "card": 1, "ip": 2, "phone": 2}
    assert "[EMAIL]" in out and "[CARD]" in out and "[IP]" in out and "[PHONE]" in out
    assert "1234567812345678" in out and "version 1.2.3" in out and "3 times 4 is 12" in out
    res = clean([pc("reach me at a@b.io", "ok 10.0.0.1", 1)], data_cfg(pii_mask=True))
    assert res.rows[0]["prompt"] == "reach me at [EMAIL]" and res.rows[0]["completion"] == "ok [IP]"
    assert res.pii == {"email": 1, "phone": 0, "ip": 1, "card": 0}


# ---------------------------------------------------------------- splits and mixing
def test_split_is_deterministic_grouped_and_sized():
    rows = [pc(f"q{i % 50}", f"a{i}", i) for i in range(100)]  # each prompt twice, other answers
    a = split_rows(rows, [8, 1, 1], seed=3)
    b = split_rows(rows, [8, 1, 1], seed=3)
    assert a == b and split_rows(rows, [8, 1, 1], seed=4) != a
    assert [len({r["prompt"] for r in part}) for part in a] == [40, 5, 5]
    prompts = [{r["prompt"] for r in part} for part in a]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert sum(len(p) for p in a) == 100


def test_split_is_stratified_for_classification():
    rows = [{"text": f"t{i}", "label": "pos" if i % 5 else "neg", "_source": f"t:{i}"} for i in range(200)]
    train, val, test = split_rows(rows, [8, 1, 1], seed=0)
    assert (len(train), len(val), len(test)) == (160, 20, 20)
    for part, n in ((train, 160), (val, 20), (test, 20)):
        assert Counter(r["label"] for r in part) == {"pos": n * 4 // 5, "neg": n // 5}
    # a label with a single row stays in train
    rare = rows[:30] + [{"text": "odd", "label": "rare", "_source": "t:x"}]
    tr, _, _ = split_rows(rare, [8, 1, 1], seed=0)
    assert any(r["label"] == "rare" for r in tr)


def test_empty_split_and_unseen_labels_are_clear_errors():
    with pytest.raises(DataError, match=r"the val split would be empty: 2 rows .* data.splits=\[8, 1, 1\]"):
        split_rows([pc("a", "b"), pc("c", "d")], [8, 1, 1], seed=0)
    assert split_rows([pc("a", "b"), pc("c", "d")], [8, 0, 0], seed=0)[0]
    from distft.data.split import check_labels

    parts = {"train": [{"label": "a"}], "val": [{"label": "b", "_source": "f:9"}], "test": []}
    with pytest.raises(DataError, match=r"f:9: label 'b' is in the val split but never in train"):
        check_labels(parts)


def test_mixing_weights():
    rows = [{"_src": 0, "i": i} for i in range(60)] + [{"_src": 1, "i": i} for i in range(40)]
    out, counts = mix(rows, [3, 1], seed=0)
    assert counts == {0: 75, 1: 25} and len(out) == 100
    assert Counter(r["_src"] for r in out) == {0: 75, 1: 25}
    assert len({r["i"] for r in out if r["_src"] == 0}) == 60  # every row once, then repeats
    assert mix(rows, [3, 1], seed=0)[0] == out


# ---------------------------------------------------------------- report, end to end
def messy_rows():
    """40 distinct rows plus the mess; returns (lines, expected counts)."""
    good = [{"prompt": f"sort {w}=", "completion": "".join(sorted(w))} for w in _words(40)]
    lines = list(good)
    lines += [dict(good[0]), dict(good[1])]  # 2 exact duplicates
    lines += [
        {"prompt": "  " + good[2]["prompt"].replace(" ", "   "), "completion": good[2]["completion"] + "  "}
    ]
    lines += [{"prompt": good[3]["prompt"], "completion": good[3]["completion"] + "\u3000"}]  # NFKC space
    lines += [{}, {"prompt": "", "completion": ""}, {"prompt": "sort x=", "completion": "   "}]  # 3 empty
    lines += [{"prompt": "sort " + "q" * 90 + "=", "completion": "q" * 90}]  # 1 overlong
    lines += ['{"prompt": "sort abc=", "completion": "abc"', "not json at all"]  # 2 malformed
    return lines


def _words(n):
    import random
    import string

    rng = random.Random(1)
    words = set()
    while len(words) < n:
        words.add("".join(rng.sample(string.ascii_lowercase, 5)))
    return sorted(words)


def test_messy_data_report_counts_are_exact(tmp_path, tok, capsys):
    f = jsonl(tmp_path / "messy.jsonl", messy_rows())
    from distft.data_cli import main

    rc = main([f"data.path=[{f}]", "data.overlong=drop", "data.max_length=64", f"output_dir={tmp_path}/run"])
    assert rc == 0
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["counts"] == {
        "bad_lines": 2,
        "loaded": 48,
        "empty": 3,
        "too_short": 0,
        "too_long": 1,
        "filtered": 0,
        "exact_duplicate": 4,
        "near_duplicate": 0,
        "duplicates_removed": 4,
        "kept": 40,
    }
    assert report["duplicates_removed"] == 4 and report["kept"] == 40
    assert [b["where"] for b in report["drops"]["bad_line"]["examples"]] == [f"{f}:49", f"{f}:50"]
    assert report["drops"]["too_long"]["examples"][0]["where"] == f"{f}:48"
    assert {e["where"] for e in report["drops"]["empty"]["examples"]} == {f"{f}:{i}" for i in (45, 46, 47)}
    assert (
        report["splits"]["train"]["rows"] + report["splits"]["val"]["rows"] + report["splits"]["test"]["rows"]
        == 40
    )
    assert report["splits"]["val"]["rows"] == 4 and report["splits"]["test"]["rows"] == 4
    assert report["tokens"]["max"] == 17 and report["over_max_length"] == 0 and report["truncated"] == 0
    assert report["normalized_rows"] == 3  # the two variants and the blank completion
    # prepared splits: 40 distinct rows, none in two splits
    parts = {
        s: (tmp_path / "run" / "data" / f"{s}.jsonl").read_text().splitlines()
        for s in ("train", "val", "test")
    }
    rows = [json.loads(x)["prompt"] for p in parts.values() for x in p]
    assert len(rows) == len(set(rows)) == 40
    out = capsys.readouterr().out
    assert "duplicates_removed" in out and "kept" in out and "malformed lines skipped" in out
    # the same data truncated instead of dropped: the long row is kept and counted as truncated
    assert main([f"data.path=[{f}]", "data.max_length=64", f"output_dir={tmp_path}/run2"]) == 0
    r2 = json.loads((tmp_path / "run2" / "data_report.json").read_text())
    assert r2["kept"] == 41 and r2["over_max_length"] == 1 and r2["truncated"] == 1


def test_report_labels_imbalance_and_first_tokens(tok):
    cfg, _ = load_config(["data.num_examples=10"])
    rows = [{"text": f"t{i}", "label": "a" if i < 40 else "b", "_source": f"t:{i}"} for i in range(50)]
    cleaned = clean(rows, cfg.data)
    rep = data_report.build(
        sources=[],
        bad_lines=[],
        cleaned=cleaned,
        splits={},
        mix=None,
        max_length=64,
        warn_ratio=3.0,
        formats={},
    )
    assert rep["labels"]["distribution"] == {"a": 40, "b": 10} and rep["labels"]["imbalance_ratio"] == 4.0
    assert "imbalanced" in rep["labels"]["warning"]
    assert "WARNING" in data_report.table(rep | {"splits": {}})
    sft = clean([pc("q1", " Sure thing"), pc("q2", "Sure it is"), pc("q3", "No")], cfg.data)
    assert data_report.first_tokens(sft.rows) == [["Sure", 2, 0.6667], ["No", 1, 0.3333]]


def test_default_data_goes_through_cleaning(tok):
    cfg, _ = load_config(["data.num_examples=300"])
    method = METHODS["sft"](cfg, tok)
    data = prepare(cfg, method, tok)
    c = data.report["counts"]
    assert c["loaded"] == 300 and c["kept"] == 300 - c["duplicates_removed"]
    sizes = [data.report["splits"][s]["rows"] for s in ("train", "val", "test")]
    assert sum(sizes) == c["kept"] and sizes[1] == sizes[2] == c["kept"] // 10
    keys = [{r["prompt"] for r in rows} for rows in data.split_rows.values()]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def test_mixed_sources_in_the_train_split(tmp_path, tok):
    a = jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}=", "completion": "x"} for i in range(60)])
    b = jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}=", "completion": "y"} for i in range(60)])
    cfg, _ = load_config([f"data.path=[{a},{b}]", "data.weights=[1,3]"])
    data = prepare(cfg, METHODS["sft"](cfg, tok), tok)
    train = data.split_rows["train"]
    assert Counter(r["prompt"][0] for r in train) == {"a": len(train) // 4, "b": 3 * len(train) // 4}
    assert data.report["mix"] == {str(a): len(train) // 4, str(b): 3 * len(train) // 4}
    assert {r["prompt"][0] for r in data.split_rows["val"]} == {"a", "b"}


def test_config_errors():
    with pytest.raises(ConfigError, match="data.weights"):
        load_config(["data.path=[a.jsonl,b.jsonl]", "data.weights=[1]"])
    with pytest.raises(ConfigError, match="data.format='csv'"):
        load_config(["data.format=csv"])
    with pytest.raises(ConfigError, match="data.overlong"):
        load_config(["data.overlong=cut"])
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        load_config(["data.drop_patterns=['(']"])
    with pytest.raises(ConfigError, match="data.pii_kinds"):
        load_config(["data.pii_kinds=[ssn]"])


def test_preference_and_classification_rows_are_cleaned():
    pref = [
        {"prompt": "Q:", "chosen": " good", "rejected": " bad", "_source": "p:1"},
        {"prompt": "Q:", "chosen": " good  ", "rejected": " bad", "_source": "p:2"},  # whitespace variant
        {"prompt": "Q:", "chosen": " good", "rejected": " worse", "_source": "p:3"},  # another pair
    ]
    res = clean(pref, data_cfg())
    assert [r["_source"] for r in res.rows] == ["p:1", "p:3"] and res.counts["exact_duplicate"] == 1
    cls = [
        {"text": "great  movie", "label": "pos", "_source": "c:1"},
        {"text": "great movie", "label": "pos", "_source": "c:2"},
        {"text": "great movie", "label": "neg", "_source": "c:3"},  # conflicting label: kept, reported
    ]
    res = clean(cls, data_cfg())
    assert [r["_source"] for r in res.rows] == ["c:1", "c:3"] and res.conflicts == 1


def test_alpaca_csv_through_the_pipeline(tmp_path, tok):
    import datasets

    rows = [{"instruction": f"Reverse {w}", "input": "", "output": w[::-1]} for w in _words(30)]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"), index=False)
    cfg, _ = load_config([f"data.path=[{tmp_path / 'a.csv'}]"])
    data = prepare(cfg, METHODS["sft"](cfg, tok), tok)
    assert data.report["formats"] == {"alpaca": 30} and data.report["kept"] == 30
    row = data.val_rows[0]
    assert row["prompt"].startswith("Reverse ") and row["prompt"].endswith("\n")
    assert row["completion"] == row["prompt"].split()[1][::-1]
    cfg, _ = load_config([f"data.path=[{tmp_path / 'a.csv'}]", "data.format=messages"])
    with pytest.raises(DataError, match=r"a.csv#0: data.format=messages needs fields \[messages\]"):
        prepare(cfg, METHODS["sft"](cfg, tok), tok)
