"""method=classify: labelled text → a classification head on the LM backbone."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from distft.config.load import load_config
from distft.data.pipeline import PreparedData
from distft.errors import ConfigError, DataError
from distft.methods.classify import Classify, default_rows
from distft.models.tiny import build_tokenizer
from tests.util import metrics, train


def _method(*overrides):
    cfg = load_config(["method=classify", *overrides])[0]
    return Classify(cfg, build_tokenizer())


def _prepared(method, train_rows, val_rows=(), test_rows=()):
    enc = [
        method.encode(list(r), method.tokenizer, method.cfg, False)[0]
        for r in (train_rows, val_rows, test_rows)
    ]
    return PreparedData(enc[0], enc[1], enc[2], list(val_rows), list(test_rows))


@pytest.mark.quick
def test_default_data_is_balanced_and_correctly_labelled():
    rows = default_rows(600)
    assert Counter(r["label"] for r in rows) == {"ascending": 200, "descending": 200, "mixed": 200}
    for r in rows:
        t = r["text"]
        want = (
            "ascending" if list(t) == sorted(t) else "descending" if list(t) == sorted(t)[::-1] else "mixed"
        )
        assert r["label"] == want and 3 <= len(t) <= 6 and len(set(t)) == len(t)


@pytest.mark.quick
def test_label_mapping_collate_and_unseen_labels():
    m = _method()
    rows = [{"text": "abc", "label": "b"}, {"text": "cba", "label": "a"}, {"text": "acb", "label": "b"}]
    m.on_data(_prepared(m, rows, [{"text": "ab", "label": "a", "_source": "val.jsonl:1"}]))
    assert m.label2id == {"a": 0, "b": 1}  # sorted train labels
    head = m.head_config()
    assert head["num_labels"] == 2 and head["id2label"] == {0: "a", 1: "b"}
    assert m.export_meta() == {"id2label": {"0": "a", "1": "b"}}
    batch = m.collate(m.encode(rows, m.tokenizer, m.cfg, True)[0])
    assert batch["labels"].tolist() == [1, 0, 1] and batch["num_targets"] == 3
    assert batch["attention_mask"].sum().item() == batch["num_tokens"] == 9

    bad = [{"text": "zz", "label": "c", "_source": "val.jsonl:7"}]
    with pytest.raises(
        DataError, match=r"labels unseen in training: \['c'\] in the val split \(first at val.jsonl:7\)"
    ):
        m.on_data(_prepared(m, rows, bad))
    with pytest.raises(DataError, match="never seen in training"):
        m.evaluate(None, bad, None, False)

    fixed = _method("method.labels=[b,a,c]")
    fixed.on_data(_prepared(fixed, rows))
    assert fixed.label2id == {"b": 0, "a": 1, "c": 2}  # the configured order
    with pytest.raises(DataError, match="'c'.*in the test split"):  # c is listed but never trained
        fixed.on_data(_prepared(fixed, rows, (), [{"text": "q", "label": "c", "_source": "t:1"}]))


@pytest.mark.quick
def test_config_errors():
    with pytest.raises(ConfigError, match="method.average='binary'; valid: macro, weighted, micro"):
        _method("method.average=binary")
    with pytest.raises(ConfigError, match="data.packing=true does not apply to method=classify"):
        _method("data.packing=true")
    with pytest.raises(ConfigError, match="duplicates"):
        _method("method.labels=[a,a]")
    with pytest.raises(DataError, match="needs 'text' and 'label' fields; found \\['prompt'\\]"):
        Classify.encode([{"prompt": "x", "_source": "f:3"}], build_tokenizer(), _method().cfg, True)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One 2-rank LoRA classify run on the embedded data (ZeRO-2)."""
    run = tmp_path_factory.mktemp("classify") / "run"
    train(
        run,
        "method=classify",
        "tuning=lora",
        "strategy=zero2",
        "data.num_examples=900",
        "train.max_steps=60",
        "train.micro_batch_size=16",
        "train.lr=1e-2",
        "train.eval_every=30",
    )
    return run


@pytest.mark.slow
def test_lora_classifier_learns_and_exports_labels(lora_run):
    summary = json.loads((lora_run / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert set(after) == {"accuracy", "precision", "recall", "f1"}
    assert after["accuracy"] > before["accuracy"] + 0.15, (before, after)
    rows = metrics(lora_run)
    assert any("eval/f1" in r for r in rows) and any("accuracy" in r and "loss" in r for r in rows)

    export = lora_run / "export"
    meta = json.loads((export / "distft_export.json").read_text())
    assert meta["id2label"] == {"0": "ascending", "1": "descending", "2": "mixed"}
    assert meta["probe_max_abs_diff"] < 1e-3
    # The adapter (with its trained head as modules_to_save) loads with PEFT and predicts as trained.
    from peft import AutoPeftModelForSequenceClassification

    model = AutoPeftModelForSequenceClassification.from_pretrained(str(export), dtype=torch.float32).eval()
    assert model.config.num_labels == 3 and model.config.id2label[2] == "mixed"  # from the base copy
    probe = torch.tensor(meta["probe_input_ids"])
    with torch.no_grad():
        logits = model(input_ids=probe).logits.flatten()
    assert torch.allclose(logits, torch.tensor(meta["probe_logits"]), atol=1e-4)
    # distft-export merge: a full classifier with the label names in its config, same predictions.
    from transformers import AutoModelForSequenceClassification

    from distft.tools.adapters import merge

    merged_dir = merge(export, lora_run / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config.id2label == {0: "ascending", 1: "descending", 2: "mixed"}
    with torch.no_grad():
        logits = merged(input_ids=probe).logits.flatten()
    assert torch.allclose(logits, torch.tensor(meta["probe_logits"]), atol=1e-4)
