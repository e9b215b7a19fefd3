"""Evaluation metrics, early stopping, train.export=best and eval.json.

Quick tests check the scorers against hand-computed values; one real 2-rank run trains on messy
data with early stopping and checks the data report, the eval rows, the best checkpoint and that
the export holds the best weights (its val loss equals the best logged eval/loss).
"""

from __future__ import annotations

import json
import math

import pytest

from distft.config.load import load_config
from distft.errors import ConfigError, DataError
from distft.eval.classification import check_known_labels, classification_metrics, per_class
from distft.eval.early_stop import BestTracker
from distft.eval.text_metrics import score_texts
from distft.methods import METHODS
from tests.util import metrics, train

ALL_TEXT = ["exact_match", "rouge1", "rouge2", "rougeL", "bleu", "chrf"]


@pytest.mark.quick
def test_text_metrics_hand_computed():
    refs = ["the cat sat on the mat", "hello world"]
    perfect = score_texts(refs, refs, ALL_TEXT)
    assert perfect == pytest.approx(dict.fromkeys(ALL_TEXT[:4], 1.0) | {"bleu": 100.0, "chrf": 100.0})
    got = score_texts(["the cat sat", " hello world "], refs, ALL_TEXT)
    assert got["exact_match"] == 0.5  # surrounding whitespace does not count
    # rouge1, first pair: P = 3/3, R = 3/6 -> F = 2/3; second pair: 1
    assert got["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    # rouge2, first pair: bigrams "the cat", "cat sat" both in the reference: P = 1, R = 2/5
    assert got["rouge2"] == pytest.approx((2 * 0.4 / 1.4 + 1) / 2)
    assert 0 < got["chrf"] < 100
    # every n-gram of the hypothesis matches: BLEU is 100 x the brevity penalty exp(1 - 8/7)
    bleu = score_texts(["the cat sat on the", "hello world"], refs, ["bleu"])["bleu"]
    assert bleu == pytest.approx(100 * math.exp(1 - 8 / 7))
    assert list(score_texts(["a"], ["a"], ["chrf", "exact_match"])) == ["chrf", "exact_match"]
    assert score_texts([], [], ALL_TEXT) == {}


@pytest.mark.quick
def test_classification_metrics_hand_computed():
    y_true = ["a", "a", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "a"]
    m = classification_metrics(y_true, y_pred, labels=["a", "b", "c"])
    # per class P/R: a 1/2, 1/2; b 2/3, 1; c 0, 0 (never predicted: 0, not an error)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert m["recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    w = classification_metrics(y_true, y_pred, labels=["a", "b", "c"], average="weighted", names=["f1"])
    assert w == {"f1": pytest.approx((2 * 0.5 + 2 * 0.8 + 0) / 5)}
    assert per_class(y_true, y_pred, ["a", "b", "c"])["b"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    with pytest.raises(DataError, match=r"the test split has labels never seen in training: \['z'\]"):
        check_known_labels(["a", "z"], ["a", "b"], "test")


@pytest.mark.quick
def test_best_tracker_patience_min_delta_and_modes():
    t = BestTracker("eval/loss", "min", patience=2, min_delta=0.05)
    seq = [(2, 3.0), (4, 2.5), (6, 2.49), (8, 2.6)]
    decisions = [(t.update(s, {"eval/loss": v}), t.should_stop(s)) for s, v in seq]
    assert decisions == [(True, False), (True, False), (False, False), (False, True)]
    assert (t.best, t.best_step, t.stopped_step) == (2.5, 4, 8)
    restored = BestTracker("eval/loss", "min", 2, 0.05)
    restored.load(t.state())
    assert restored == t
    other = BestTracker("eval/exact_match", "max", 2)
    other.load(t.state())  # another metric: tracking starts afresh
    assert other.best is None and other.bad_evals == 0
    m = BestTracker("eval/exact_match", "max", patience=1)
    assert m.update(1, {"eval/exact_match": 0.2}) and not m.update(2, {"eval/exact_match": 0.2})
    assert m.should_stop(2)
    assert not BestTracker(patience=0).should_stop(5)  # patience 0: never stops
    with pytest.raises(ConfigError, match=r"eval.monitor='eval/f1' is not among .*eval/loss"):
        BestTracker("eval/f1", "max").update(1, {"eval/loss": 1.0})


@pytest.mark.quick
def test_eval_config_errors():
    cfg, _ = load_config(["eval.metrics=[rougeL,bleu]", "eval.monitor=eval/rougeL"])
    assert cfg.eval.metrics == ["rougeL", "bleu"]
    with pytest.raises(
        ConfigError, match=r"'accuracy' does not fit method=sft; metrics it can compute: exact_match"
    ):
        load_config(["eval.metrics=[accuracy]"])
    with pytest.raises(ConfigError, match="unknown metric 'meteor'"):
        load_config(["eval.metrics=[meteor]"])
    with pytest.raises(
        ConfigError, match=r"train.export=best need periodic validation: set train.eval_every"
    ):
        load_config(["train.export=best"])
    with pytest.raises(ConfigError, match="eval.patience>0 need periodic validation"):
        load_config(["eval.patience=3", "train.eval_every=10", "data.splits=[9,0,1]"])
    with pytest.raises(ConfigError, match="eval.mode='up'"):
        load_config(["eval.mode=up"])
    if "dpo" in METHODS:  # preference methods compute no generation metrics
        with pytest.raises(ConfigError, match="'bleu' does not fit method=dpo"):
            load_config(["method=dpo", "eval.metrics=[bleu]"])


# ---------------------------------------------------------------- 2 ranks, end to end
def _messy_file(path):
    from distft.data.default_tasks import sft_rows

    base = [{"prompt": r["prompt"], "completion": r["completion"]} for r in sft_rows(500, seed=5)]
    distinct = len({(r["prompt"], r["completion"]) for r in base})
    lines = [json.dumps(r) for r in base]
    lines += [json.dumps(base[i]) for i in (0, 1, 2)]  # exact duplicates
    lines += [json.dumps({"prompt": " " + base[3]["prompt"], "completion": base[3]["completion"] + " \t"})]
    lines += [
        json.dumps({"prompt": base[4]["prompt"].replace(" ", "  "), "completion": base[4]["completion"]})
    ]
    lines += [json.dumps({}), json.dumps({"prompt": "sort ab=", "completion": ""})]  # empty
    lines += [json.dumps({"prompt": "reverse " + "x" * 80 + "=", "completion": "x" * 80})]  # overlong
    lines += ['{"prompt": "sort cab=", "completion": "abc"']  # malformed
    path.write_text("\n".join(lines) + "\n")
    return distinct, len(lines)


@pytest.fixture(scope="module")
def early_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    data = root / "messy.jsonl"
    distinct, n_lines = _messy_file(data)
    run = root / "run"
    train(
        run,
        f"data.path=[{data}]",
        "data.overlong=drop",
        "train.max_steps=40",
        "train.eval_every=2",
        "train.export=best",
        # The val loss falls as the model learns, so with mode=max the first eval is the best
        # and the run stops after `patience` evals without "improvement": a deterministic stop.
        "eval.monitor=eval/loss",
        "eval.mode=max",
        "eval.patience=2",
        f"eval.metrics=[{','.join(ALL_TEXT)}]",
        "train.micro_batch_size=8",
    )
    return run, data, distinct, n_lines


@pytest.mark.slow
def test_messy_data_report_of_a_real_run(early_run):
    run, data, distinct, n_lines = early_run
    report = json.loads((run / "data_report.json").read_text())
    c = report["counts"]
    assert c["bad_lines"] == 1 and report["drops"]["bad_line"]["examples"][0]["where"] == f"{data}:{n_lines}"
    assert c["loaded"] == n_lines - 1
    assert c["empty"] == 2 and c["too_long"] == 1 and c["near_duplicate"] == 0
    assert c["exact_duplicate"] == (500 - distinct) + 3 + 2
    assert c["kept"] == distinct
    assert sum(report["splits"][s]["rows"] for s in ("train", "val", "test")) == distinct
    parts = [(run / "data" / f"{s}.jsonl").read_text().splitlines() for s in ("train", "val", "test")]
    prompts = [{json.loads(x)["prompt"] for x in p} for p in parts]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


@pytest.mark.slow
def test_early_stopping_tracks_and_exports_the_best(early_run):
    run = early_run[0]
    rows = metrics(run)
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    # replay the rule on the logged values
    t = BestTracker("eval/loss", "max", patience=2)
    stop = next(s for s, v in evals if (t.update(s, {"eval/loss": v}), t.should_stop(s))[1])
    assert stop < 40 and max(r["step"] for r in rows if "loss" in r) == stop
    summary = json.loads((run / "summary.json").read_text())
    assert summary["early_stopped_at"] == stop and summary["best"]["step"] == t.best_step
    assert (run / "checkpoints" / "best").read_text().strip() == f"step_{t.best_step}"
    assert (run / "checkpoints" / f"step_{t.best_step}").is_dir()  # kept by pruning
    for r in rows:
        if "eval/loss" in r and r["step"] > 0:
            assert set(ALL_TEXT) <= {k.split("/", 1)[-1] for k in r}
    result = json.loads((run / "eval.json").read_text())
    assert result["weights"] == f"best (step {t.best_step})" and result["split"] == "test"
    assert {f"test/{k}" for k in ["loss", "ppl", *ALL_TEXT]} == set(result["metrics"])
    assert any("test/loss" in r for r in rows)
    # The export holds the best weights: its val loss is the best step's logged eval/loss.
    best_loss = dict(evals)[t.best_step]
    assert export_val_loss(run) == pytest.approx(best_loss, rel=1e-5)
    assert not math.isclose(best_loss, dict(evals)[stop], rel_tol=1e-3)


def export_val_loss(run) -> float:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from distft.data.collate import pad_batch
    from distft.data.pipeline import load_run_data

    val = list(load_run_data(run).val)
    model = AutoModelForCausalLM.from_pretrained(run / "export", dtype=torch.float32).eval()
    total, targets = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), 16):
            b = pad_batch(val[i : i + 16], 0)
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum")
            )
            targets += b["num_targets"]
    return total / targets
