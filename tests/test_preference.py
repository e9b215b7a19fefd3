"""Preference methods: reward model, DPO (sigmoid/hinge/ipo/simpo/orpo), KTO.

In-process units: data encoding, bad rows, the loss formulas, log-probs, the reference paths and
config errors. Training runs (one process and 2 real ranks) are in test_preference_runs.py.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distft.config.load import load_config
from distft.data.default_tasks import TASKS
from distft.data.preference import IGNORE, collate_pairs, default_pairs, encode_pairs
from distft.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny base model directory and its tokenizer."""
    from distft.models import load_tokenizer

    cfg, _ = load_config(["method=dpo"])
    return tiny_model_dir, load_tokenizer(str(tiny_model_dir), cfg)


def _cfg(*overrides: str):
    return load_config(list(overrides))[0]


# ---------------------------------------------------------------------------- data
@pytest.mark.quick
def test_default_pairs_prefer_the_right_answer():
    rows = default_pairs(300)
    assert rows == default_pairs(300)  # deterministic
    kinds = set()
    for r in rows:
        task, word = r["prompt"].rstrip("=").split(" ")
        assert r["chosen"] == TASKS[task](word) != r["rejected"]
        other = TASKS["sort" if task == "reverse" else "reverse"](word)
        kinds.add("other task" if r["rejected"] == other else "word" if r["rejected"] == word else "swap")
    assert "other task" in kinds and len(kinds) >= 2


@pytest.mark.quick
def test_rows_without_a_prompt_are_implicit_pairs(tiny):
    """chosen/rejected that both hold the prompt (TRL's implicit form), as chat or text, are
    recognized by the schema detection and split at their shared start."""
    from distft.data.schemas import to_canonical

    _, tok = tiny
    user = {"role": "user", "content": "sort cab="}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "abc"}],
            "rejected": [user, {"role": "assistant", "content": "bca"}],
            "_source": "p.jsonl:1",
        },
        {"chosen": "sort cab= abc", "rejected": "sort cab= cba", "_source": "p.jsonl:2"},
        {"chosen": "yes", "rejected": "no", "_source": "p.jsonl:3"},
        {"chosen": "a b", "rejected": "a-c", "_source": "p.jsonl:4"},  # differ right after "a"
        {"chosen": "x abc ", "rejected": "x abc def", "_source": "p.jsonl:5"},  # chosen is a prefix
    ]
    out, _, formats = to_canonical(rows, "auto", {}, "preference", "dpo")
    assert formats == {"preference_implicit": 5}
    for r in out[1:]:  # the prompt is a shared start, and each side keeps something of its own
        assert r["chosen"] and r["rejected"]
    assert (out[3]["prompt"], out[3]["chosen"], out[3]["rejected"]) == ("", "a b", "a-c")
    assert (out[4]["prompt"], out[4]["chosen"], out[4]["rejected"]) == ("x ", "abc ", "abc def")
    assert out[0]["prompt"] == [user] and out[0]["chosen"] == [{"role": "assistant", "content": "abc"}]
    assert (out[1]["prompt"], out[1]["chosen"], out[1]["rejected"]) == ("sort cab= ", "abc", "cba")
    assert (out[2]["prompt"], out[2]["chosen"]) == ("", "yes")
    ex, stats = encode_pairs(out, tok, 64, 0.0)
    assert stats["skipped"] == 0 and len(ex) == 5
    with pytest.raises(DataError, match="p.jsonl:4.*both be texts or both be message lists"):
        to_canonical([{"chosen": "a", "rejected": [user], "_source": "p.jsonl:4"}], "auto", {}, None, "dpo")


@pytest.mark.quick
def test_encode_text_chat_and_implicit_prompt_rows(tiny):
    _, tok = tiny
    chat_prompt = [{"role": "user", "content": "sort cab="}]
    rows = [
        {"prompt": "sort cab=", "chosen": "abc", "rejected": "cab"},
        {"prompt": chat_prompt, "chosen": "abc", "rejected": "bca"},
        {
            "chosen": chat_prompt + [{"role": "assistant", "content": "abc"}],
            "rejected": chat_prompt + [{"role": "assistant", "content": "bca"}],
        },
    ]
    ex, stats = encode_pairs(rows, tok, 64, 0.0)
    assert stats["skipped"] == 0 and len(ex) == 3
    assert ex[1] == ex[2]  # the implicit prompt is the shared first message
    assert tok.decode(ex[0]["prompt_ids"]) == "sort cab="
    assert ex[0]["chosen_ids"] == tok("abc", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ex[1]["chosen_ids"]) == "abc<|end|>"  # the chat template closes the turn
    batch = collate_pairs(ex, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["num_targets"] == 3
    # Labels: exactly the completion tokens (chosen rows first, then rejected).
    for row, e in zip(batch["labels"], [*ex, *ex]):
        assert row[row != IGNORE].tolist() in (e["chosen_ids"], e["rejected_ids"])
    assert batch["labels"][0][batch["labels"][0] != IGNORE].tolist() == ex[0]["chosen_ids"]
    assert batch["labels"][3][batch["labels"][3] != IGNORE].tolist() == ex[0]["rejected_ids"]


@pytest.mark.quick
def test_bad_rows_are_counted_skips_with_a_limit(tiny):
    _, tok = tiny
    good = [
        {"prompt": f"sort {w}=", "chosen": "".join(sorted(w)), "rejected": w} for w in ("cab", "zyx", "dca")
    ]
    bad = [
        {"prompt": "sort ba=", "chosen": "ab", "_source": "f.jsonl:7"},
        {"prompt": "sort ba=", "chosen": "ab", "rejected": "ab", "_source": "f.jsonl:8"},
    ]
    ex, stats = encode_pairs(good * 20 + bad, tok, 64, 0.05)
    assert len(ex) == 60
    assert stats["skipped"] == 2
    assert set(stats["skipped_by_reason"]) == {
        "missing 'rejected'",
        "'chosen' and 'rejected' are identical",
    }
    with pytest.raises(DataError) as e:
        encode_pairs(good + bad, tok, 64, 0.05)
    msg = str(e.value)
    assert "2 of 5 preference rows" in msg and "method.max_skip_fraction=0.05" in msg
    assert "f.jsonl:7: missing 'rejected'" in msg and "expected 'prompt', 'chosen' and 'rejected'" in msg
    assert "f.jsonl:8: 'chosen' and 'rejected' are identical" in msg


@pytest.mark.quick
def test_bad_rows_through_the_data_pipeline(tiny, tmp_path):
    """A half pair and an identical pair in a JSONL file reach the encoder and are counted in the
    data report (the pipeline's schema detection does not trip over the half pair)."""
    from distft.data.pipeline import prepare
    from distft.methods.dpo import DPO

    _, tok = tiny
    rows = [{k: v for k, v in r.items() if k != "_source"} for r in default_pairs(60)]
    rows += [{"prompt": "sort ba=", "chosen": "ab"}, {"prompt": "sort ba=", "chosen": "ab", "rejected": "ab"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg("method=dpo", f"data.path={path}", "method.max_skip_fraction=0.2")
    data = prepare(cfg, DPO(cfg, tok), tok)
    reasons: dict[str, int] = {}
    for split in data.report["splits"].values():
        for k, v in split["skipped_by_reason"].items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons == {"missing 'rejected'": 1, "'chosen' and 'rejected' are identical": 1}
    assert len(data.train) + len(data.val) + len(data.test) == 60


@pytest.mark.quick
def test_kto_rows_pairs_and_bad_labels(tiny):
    from distft.methods.kto import KTO

    _, tok = tiny
    cfg = _cfg("method=kto", "method.max_skip_fraction=0.5")
    rows = [
        {"prompt": "sort cab=", "chosen": "abc", "rejected": "cab"},
        {"prompt": "reverse abc=", "completion": "cba", "label": True},
        {"prompt": "reverse abc=", "completion": "abc", "label": "maybe", "_source": "k.jsonl:3"},
    ]
    ex, stats = KTO.encode(rows, tok, cfg, True)
    assert (stats["good"], stats["bad"], stats["skipped"]) == (2, 1, 1)
    assert [e["pair"] for e in ex] == [0, 0, -1]
    # Each example's KL partner is another example's completion (a fixed, seeded cycle).
    assert sorted(tuple(e["kl_ids"]) for e in ex) == sorted(tuple(e["completion_ids"]) for e in ex)
    assert all(e["kl_ids"] != e["completion_ids"] for e in ex)
    with pytest.raises(DataError, match="k.jsonl:3: 'label' must be true or false"):
        KTO.encode(rows, tok, _cfg("method=kto"), True)


# ---------------------------------------------------------------------------- losses and log-probs
@pytest.mark.quick
def test_sequence_logps_match_a_plain_log_softmax():
    from distft.methods.logprobs import sequence_logps

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = IGNORE
    labels[2, 5:] = IGNORE
    total, count = sequence_logps(logits, labels)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    mask = labels[:, 1:] != IGNORE
    torch.testing.assert_close(total, (ref * mask).sum(-1))
    assert count.tolist() == [4.0, 4.0, 2.0]
    half, _ = sequence_logps(logits.bfloat16(), labels)  # rows normalized in fp32
    torch.testing.assert_close(half, total, atol=0.1, rtol=0.02)


@pytest.mark.quick
def test_dpo_loss_types_follow_their_formulas():
    from distft.methods.dpo import pair_rewards

    logps = torch.tensor([-4.0, -9.0, -6.0, -7.0])  # chosen ×2, rejected ×2
    ref = torch.tensor([-5.0, -8.0, -5.0, -8.0])
    counts = torch.tensor([2.0, 3.0, 4.0, 1.0])
    lc, lr = torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0])  # logratios

    def run(loss_type, **kw):
        method = SimpleNamespace(loss_type=loss_type, beta=0.5, label_smoothing=0.0, simpo_gamma=0.3, **kw)
        return pair_rewards(logps, ref, counts, SimpleNamespace(method=method))

    loss, c, r = run("sigmoid")
    torch.testing.assert_close(loss, -F.logsigmoid(0.5 * (lc - lr)))
    torch.testing.assert_close(c - r, 0.5 * (lc - lr))
    loss, _, _ = run("hinge")
    torch.testing.assert_close(loss, torch.relu(1 - 0.5 * (lc - lr)))
    loss, _, _ = run("ipo")
    torch.testing.assert_close(loss, (lc / counts[:2] - lr / counts[2:] - 1.0) ** 2)
    avg_c, avg_r = logps[:2] / counts[:2], logps[2:] / counts[2:]
    loss, c, r = run("simpo")
    torch.testing.assert_close(loss, -F.logsigmoid(0.5 * (avg_c - avg_r) - 0.3))
    torch.testing.assert_close(c, 0.5 * avg_c)
    loss, _, _ = run("orpo")
    pc, pr = avg_c.exp(), avg_r.exp()
    log_odds = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    torch.testing.assert_close(loss, -avg_c - 0.5 * F.logsigmoid(log_odds))
    assert float(run("sigmoid")[0][0]) < math.log(2) < float(run("sigmoid")[0][1])


@pytest.mark.quick
def test_adapter_disabled_reference_is_the_base_model(tiny):
    """LoRA: the reference is the policy with adapters off, equal to the base model, while the
    policy itself (non-zero adapter) differs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from distft.methods.logprobs import model_logps
    from distft.methods.reference import Reference

    path, tok = tiny
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    ex, _ = encode_pairs(default_pairs(4), tok, 64, 0.0)
    batch = collate_pairs(ex, tok.pad_token_id)
    info = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    trainer = SimpleNamespace(
        info=info,
        tuning=SimpleNamespace(adapter=True),
        strategy=SimpleNamespace(module=policy, model=policy),
        cfg=SimpleNamespace(
            train=SimpleNamespace(precision="fp32", loss_chunks=0), tuning=SimpleNamespace(init_adapter=None)
        ),
    )
    ref = Reference(trainer, precompute=False)
    with torch.no_grad():
        expected = model_logps(base, batch)[0]
        own = model_logps(policy, batch)[0]
    torch.testing.assert_close(ref.logps(batch), expected)
    assert (own - expected).abs().max() > 1e-3
    # Precomputed: the same values, carried by the examples into the batch.
    Reference(trainer, precompute=True).precompute(
        ex, lambda e: collate_pairs(e, tok.pad_token_id), _assign, batch_size=3
    )
    torch.testing.assert_close(collate_pairs(ex, tok.pad_token_id)["ref_logps"].float(), expected)


def _assign(example, values):
    example["ref_chosen"], example["ref_rejected"] = values


@pytest.mark.quick
def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="method.loss_type='kl'; valid: sigmoid, hinge, ipo, simpo, orpo"):
        _cfg("method=dpo", "method.loss_type=kl")
    with pytest.raises(ConfigError, match="precompute_ref=true with method.loss_type=simpo"):
        _cfg("method=dpo", "method.loss_type=simpo", "method.precompute_ref=true")
    with pytest.raises(ConfigError, match="label_smoothing"):
        _cfg("method=dpo", "method.label_smoothing=0.7")
    with pytest.raises(ConfigError, match="method.beta"):
        _cfg("method=kto", "method.beta=0")
    adapter = tmp_path / "adapter"  # continuing a saved adapter: the bare base is not the reference
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="tuning.init_adapter with method=kto.*precompute_ref=true"):
        _cfg("method=kto", "tuning=lora", f"tuning.init_adapter={adapter}")
    assert _cfg("method=dpo", "tuning=lora", f"tuning.init_adapter={adapter}", "method.precompute_ref=true")
    for m in ("reward", "dpo", "kto"):
        assert _cfg(f"method={m}").method.name == m
