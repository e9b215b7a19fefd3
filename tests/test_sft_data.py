"""SFT data: completion-only masks, EOS trained, chat templates, truncation, packing that keeps
examples apart, a global-batch sampler independent of world size, and clear data errors."""

from __future__ import annotations

import pytest
import torch

from distft.config.load import load_config
from distft.data.collate import as_row, pack, pad_batch
from distft.data.sampler import GlobalBatchSampler
from distft.data.sft_format import IGNORE, tokenize_sft
from distft.data.sources import read_all
from distft.errors import DataError
from distft.methods.sft import SFT
from distft.models.tiny import build_tiny, build_tokenizer

pytestmark = pytest.mark.quick


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _targets(tok, ex):
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_completion_only_and_eos_trained(tok):
    ex = tokenize_sft({"prompt": "sort cab=", "completion": "abc"}, tok, 64, train_on_prompt=False)
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels[-1] == tok.eos_token_id
    assert _targets(tok, ex) == "abc" + tok.eos_token
    assert ex.labels[: len("sort cab=")] == [IGNORE] * len("sort cab=")


def test_train_on_prompt_option(tok):
    ex = tokenize_sft({"prompt": "sort cab=", "completion": "abc"}, tok, 64, train_on_prompt=True)
    # Every token but the first (nothing predicts it) is a target.
    assert ex.labels[0] == IGNORE and IGNORE not in ex.labels[1:]


def test_chat_messages_train_assistant_turns_and_end_of_turn(tok):
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    ex = tokenize_sft(row, tok, 128, train_on_prompt=False)
    assert _targets(tok, ex) == "yo<|end|>ok<|end|>"


def test_truncation_is_reported_and_targetless_rows_dropped(tok):
    cfg, _ = load_config(["data.max_length=8"])
    rows = [
        {"prompt": "p" * 20, "completion": "c"},  # nothing left to train on
        {"prompt": "ab", "completion": "c" * 20},  # truncated, still has targets
        {"prompt": "ab", "completion": "c"},
    ]
    examples, stats = SFT.encode(rows, tok, cfg, train=True)
    assert stats["truncated"] == 2 and stats["dropped_no_target"] == 1 and len(examples) == 2
    assert all(len(e["input_ids"]) <= 8 for e in examples)


def test_packing_keeps_examples_apart(tmp_path, tok):
    """Packed logits equal the logits of each example alone: attention never crosses examples."""
    from transformers import AutoModelForCausalLM

    cfg, _ = load_config([])
    path = build_tiny(tmp_path / "tiny", cfg.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = [{"prompt": f"reverse {w}=", "completion": w[::-1]} for w in ("abc", "hello", "xy")]
    exs = [tokenize_sft(r, tok, 64, False) for r in rows]
    packed = pack(exs, max_length=64)
    assert len(packed) == 1
    batch = pad_batch(packed, tok.pad_token_id)
    with torch.no_grad():
        together = model(**_fwd(batch)).logits[0]
        start = 0
        for ex in exs:
            alone = pad_batch([as_row(ex)], tok.pad_token_id)
            solo = model(**_fwd(alone)).logits[0]
            n = len(ex.input_ids)
            torch.testing.assert_close(together[start : start + n], solo, atol=1e-5, rtol=1e-5)
            start += n
    # Same targets packed or not: the loss per token is the same.
    assert batch["num_targets"] == sum(pad_batch([as_row(e)], 0)["num_targets"] for e in exs)


@pytest.mark.parametrize("world,accum", [(1, 8), (2, 1), (2, 2), (4, 2)])
def test_global_batches_do_not_depend_on_world_size(world, accum):
    ref = GlobalBatchSampler(100, 8, seed=3)
    s = GlobalBatchSampler(100, 8, seed=3)
    for step in (0, 5, 11, 12, 30):  # 12 steps per epoch: crosses epochs
        shares = [s.rank_micro_batches(step, r, world, accum) for r in range(world)]
        flat = [i for share in shares for micro in share for i in micro]
        assert flat == ref.global_indices(step)
        assert all(len(m) == 8 // world // accum for share in shares for m in share)
    assert ref.global_indices(0) != ref.global_indices(12)  # a new permutation each epoch


def test_sampler_rejects_too_little_data():
    with pytest.raises(DataError, match="global batch needs 16"):
        GlobalBatchSampler(10, 16, seed=0)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataError, match=rf"{f}:2: malformed JSON"):
        read_all([str(f)])


def test_missing_fields_name_found_and_expected(tmp_path, tok):
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"question": "a", "answer": "b"}\n')
    rows = read_all([str(f)])
    cfg, _ = load_config([])
    with pytest.raises(DataError) as e:
        SFT.encode(rows, tok, cfg, train=True)
    msg = str(e.value)
    assert f"{f}:2" in msg and "['answer', 'question']" in msg and "'prompt' and 'completion'" in msg


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        read_all([str(tmp_path / "nope.jsonl")])


def _fwd(batch):
    # No KV cache: transformers detects packed sequences from position ids only without one.
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
