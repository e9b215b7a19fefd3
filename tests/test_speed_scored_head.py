"""The output head runs only on scored positions (distft.methods.logprobs): SFT's loss and the
preference methods' log-probs equal the full-logits computation (values and gradients within
1e-5) while the head sees K rows instead of N×T, for plain, tied, soft-capped (Gemma 2),
logit-scaled (Cohere), LoRA-wrapped and half-precision models. In process, no ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from distft.methods.logprobs import model_logps, model_nll, model_token_logps, token_logps
from tests.test_loss_memory import _assert_same  # values and gradients within 1e-5

SMALL = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0)).double()
    if kind == "cohere":
        return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.5)).double()
    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=kind == "tied")).double()
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    return model


def _batch() -> dict:
    """3 rows of 12 tokens: a 4-token prompt, a padded tail on row 1, a packed row (positions
    restart) on row 2: 20 of the 33 shifted positions are scored."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 8:] = -100
    pos = torch.arange(12).repeat(3, 1)
    pos[2, 6:] = torch.arange(6)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _full_logits(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return out.logits


def _reference_nll(model, batch) -> torch.Tensor:
    logits = _full_logits(model, batch)[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


def _head_rows(model) -> list[int]:
    from distft.methods.logprobs import _output_head

    rows: list[int] = []
    _output_head(model).register_forward_hook(lambda _m, _a, out: rows.append(out.numel() // out.size(-1)))
    return rows


@pytest.mark.quick
@pytest.mark.parametrize("kind", ["untied", "tied", "gemma2", "cohere", "lora"])
def test_head_runs_on_scored_rows_with_the_same_loss_and_gradients(kind):
    model, batch = _model(kind), _batch()
    scored = int((batch["labels"][:, 1:] != -100).sum())
    assert scored == 20
    rows = _head_rows(model)
    _assert_same(model, lambda: _reference_nll(model, batch), lambda: model_nll(model, batch))
    assert rows == [3 * 12, scored]  # the reference's full head call, then only the scored rows

    def reference_logps():
        return token_logps(_full_logits(model, batch), batch["labels"], temperature=0.7)[0]

    def scored_logps():
        ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
        return model_token_logps(model, ids, pos, labels, temperature=0.7)[0]

    rows.clear()
    _assert_same(model, reference_logps, scored_logps)
    assert rows == [3 * 12, scored]
    total, count = model_logps(model, batch)
    ref_tokens, mask = token_logps(_full_logits(model, batch), batch["labels"])
    torch.testing.assert_close(total, ref_tokens.sum(-1), rtol=1e-5, atol=1e-8)
    assert torch.equal(count, mask.sum(-1))


@pytest.mark.quick
def test_chunked_loss_also_projects_only_scored_rows():
    model, batch = _model("untied"), _batch()
    rows = _head_rows(model)
    _assert_same(model, lambda: _reference_nll(model, batch), lambda: model_nll(model, batch, 4))
    assert rows[0] == 3 * 12 and rows[1] == 0  # reference; the model's own head call keeps nothing
    assert max(rows[2:]) == 5 and sum(rows[2:]) == 2 * 20  # 20 rows in chunks of 5, recomputed in backward


@pytest.mark.quick
def test_half_precision_log_probs_match_the_full_logits():
    model, batch = _model("untied").to(torch.bfloat16), _batch()
    with torch.no_grad():
        ref = token_logps(_full_logits(model, batch), batch["labels"])[0]
        got = model_token_logps(model, batch["input_ids"], batch["position_ids"], batch["labels"])[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2)  # bf16 matmuls over 20 rows vs 36
