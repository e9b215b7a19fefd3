"""Bad input files become one clear error naming file:line (issue 12 points 6 and 10, data parts):
non-string values, a UTF-8 BOM, invalid UTF-8, a JSON document in a .jsonl file, chat rows with
no assistant turn, and a missing local path that must not be tried as a hub dataset id."""

from __future__ import annotations

import json

import pytest

from distft.data.pipeline import prepare
from distft.data.schemas import to_canonical
from distft.data.sources import looks_like_hub_id, read_all, read_sources
from distft.errors import DataError

pytestmark = pytest.mark.quick
USER_DICT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": {"a": 1}}]
USER_LIST = [{"role": "user", "content": ["q", 2]}, {"role": "assistant", "content": "a"}]


def _canonical(path, kind="sft"):
    rows = [r for s in read_sources([str(path)]) for r in s.rows]
    return to_canonical(rows, "auto", {}, kind, "sft")[0]


@pytest.mark.parametrize(
    "row,field",
    [
        ({"prompt": ["hdcggc", 1], "completion": "x"}, "'prompt'"),
        ({"prompt": "p", "completion": {"text": "x"}}, "'completion'"),
        ({"instruction": "i", "output": ["a"]}, "'output'"),
        ({"messages": USER_DICT}, "turn 1"),
        ({"messages": USER_LIST}, "turn 0"),
    ],
)
def test_non_string_values_are_refused_with_file_line(tmp_path, row, field):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "completion": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"{f}:2: field {field}.* not a string"):
        _canonical(f)


def test_numbers_and_content_parts_still_read(tmp_path):
    f = tmp_path / "d.jsonl"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    rows = [
        {"prompt": "3*4=", "completion": 12},  # CSV/Parquet readers give numbers
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "c"}]},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _canonical(f)
    assert out[0]["completion"] == "12" and out[1]["messages"][0]["content"] == "ab"


def test_bom_does_not_drop_the_first_row(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'
    f.write_bytes(b"\xef\xbb\xbf" + rows)
    src = read_sources([str(f)])[0]
    assert [r["prompt"] for r in src.rows] == ["a", "c"] and not src.bad_lines
    g = tmp_path / "d.json"
    g.write_bytes(b"\xef\xbb\xbf" + b'[{"prompt": "a", "completion": "b"}]')
    assert read_all([str(g)])[0]["prompt"] == "a"


def test_invalid_utf8_names_file_line_and_offset(tmp_path):
    f = tmp_path / "d.jsonl"
    first = b'{"prompt": "a", "completion": "b"}\n'
    f.write_bytes(first + b'{"prompt": "caf\xe9", "completion": "b"}\n')
    at = len(first) + 15
    with pytest.raises(DataError, match=rf"{f}:2: invalid UTF-8 at byte offset {at} \(byte 0xe9\)"):
        read_sources([str(f)])
    g = tmp_path / "d.json"
    g.write_bytes(b'[\n{"prompt": "caf\xe9"}]')
    with pytest.raises(DataError, match=rf"{g}:2: invalid UTF-8 at byte offset 17"):
        read_all([str(g)])


@pytest.mark.parametrize(
    "text,what",
    [
        ('[{"prompt": "a", "completion": "b"},\n {"prompt": "c", "completion": "d"}]\n', "a JSON array"),
        ('[{"prompt": "a", "completion": "b"}]\n', "a JSON array"),
        ('{\n  "prompt": "a",\n  "completion": "b"\n}\n', "one pretty-printed JSON value"),
    ],
)
def test_json_document_in_a_jsonl_file_says_so(tmp_path, text, what):
    f = tmp_path / "train.jsonl"
    f.write_text(text)
    with pytest.raises(DataError, match=rf"{f}: holds {what}, not JSON Lines.*rename it to train.json"):
        read_sources([str(f)])  # bad_lines=skip must not turn it into 'no rows'


def test_chat_rows_without_assistant_turn_are_named(tmp_path):
    f = tmp_path / "chat.jsonl"
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    no = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    f.write_text("".join(json.dumps(r) + "\n" for r in (ok, no, ok, no)))
    with pytest.raises(DataError) as e:
        _canonical(f)
    msg = str(e.value)
    assert f"2 chat row(s) have no assistant turn ({f}:2, {f}:4" in msg
    assert "nothing to train on" in msg and "system, user" in msg
    _canonical(f, kind="prompt")  # RL prompts need no assistant turn


def test_missing_path_like_file_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import datasets

    def no_hub(*a, **k):
        raise AssertionError("tried the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for spec in ("mydata/train.jsonl", "mydata/train.csv"):
        with pytest.raises(DataError, match=rf"data.path {spec}: no such file or directory"):
            read_all([spec])
    (tmp_path / "local").mkdir()
    with pytest.raises(DataError, match="no such file or directory"):
        read_all(["local/train"])  # an existing local folder: a path, not an owner on the hub
    assert looks_like_hub_id("teknium/OpenHermes-2.5") and looks_like_hub_id("tatsu-lab/alpaca")
    assert not looks_like_hub_id("mydata/train.jsonl")


def test_errors_reach_prepare_before_training(tmp_path):
    from distft.config.load import load_config
    from distft.methods import METHODS
    from distft.models.tiny import build_tokenizer

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "completion": ["b"]}) + "\n")
    cfg, _ = load_config([f"data.path=[{f}]"])
    tok = build_tokenizer()
    with pytest.raises(DataError, match=rf"{f}:1: field 'completion' is a list"):
        prepare(cfg, METHODS["sft"](cfg, tok), tok)


@pytest.mark.slow
def test_a_training_run_stops_with_one_error_line(tmp_path):
    """Real process: the error is the one `distft: error:` line, before any training step."""
    import subprocess
    import sys

    from tests.util import env

    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps([{"prompt": "a", "completion": "b"}], indent=2))
    out = subprocess.run(
        [sys.executable, "-m", "distft.train", f"data.path=[{f}]", f"output_dir={tmp_path / 'run'}",
         f"data.cache_dir={tmp_path / 'cache'}"],
        env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("distft: error:")]
    assert errors == [f"distft: error: {f}: holds a JSON array, not JSON Lines (one object per line); "
                      "rename it to train.json or write one object per line"]  # fmt: skip
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
