"""Packed rows attend per example (distft.models.attention): loss and gradients equal transformers'
masked sdpa path and each example run alone (within 1e-5, fp32); a mask the position ids do not
explain (a sliding window shorter than an example) keeps the masked path. In process, no ranks."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from distft.models import attention

SMALL = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
LENGTHS = [[5, 9, 3, 7], [11, 6, 7]]  # two packed rows of 24 tokens (row 1's last example padded by 0)


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 24), generator=g)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row]).unsqueeze(0) for row in LENGTHS])
    labels = ids.clone()
    labels[:, ::5] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _loss_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


def _logits_alone(model, batch) -> torch.Tensor:
    """Every example through the model on its own (no packing at all), logits back in row order."""
    rows = []
    with torch.no_grad():
        for r, row in enumerate(LENGTHS):
            s, parts = 0, []
            for n in row:
                ids = batch["input_ids"][r : r + 1, s : s + n]
                parts.append(model(input_ids=ids, use_cache=False).logits)
                s += n
            rows.append(torch.cat(parts, 1))
    return torch.cat(rows)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * (1 + b.abs().max()))


@pytest.mark.quick
def test_varlen_equals_the_masked_path_and_each_example_alone():
    torch.manual_seed(0)
    masked = LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation="sdpa"))
    varlen = copy.deepcopy(masked)
    attention.register()
    varlen.set_attn_implementation(attention.ATTN)
    batch = _batch()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as mp:  # count the per-example calls: the varlen path ran
        count = lambda *a, **k: calls.append(1) or sdpa(*a, **k)  # noqa: E731
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", count)
        loss_v, grads_v = _loss_grads(varlen, batch)
    assert len(calls) == 2 * sum(len(r) for r in LENGTHS)  # 2 layers × 7 examples
    loss_m, grads_m = _loss_grads(masked, batch)
    assert _close(loss_v, loss_m)
    assert all(_close(a, b) for a, b in zip(grads_v, grads_m))
    with torch.no_grad():
        ids, pos = batch["input_ids"], batch["position_ids"]
        logits_v = varlen(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert _close(logits_v, _logits_alone(masked, batch))
    # a leak between examples would show: attending over the whole row gives other logits
    with torch.no_grad():
        whole = masked(input_ids=batch["input_ids"], use_cache=False).logits
    assert not _close(whole, logits_v, 1e-3)


@pytest.mark.quick
def test_varlen_keeps_the_masked_path_for_masks_it_does_not_explain():
    torch.manual_seed(0)
    cfg = MistralConfig(**SMALL, sliding_window=4, attn_implementation="sdpa")
    masked = MistralForCausalLM(cfg)
    varlen = copy.deepcopy(masked)
    attention.register()
    varlen.set_attn_implementation(attention.ATTN)
    batch = _batch()
    loss_v, grads_v = _loss_grads(varlen, batch)
    loss_m, grads_m = _loss_grads(masked, batch)
    assert _close(loss_v, loss_m)
    assert all(_close(a, b) for a, b in zip(grads_v, grads_m))
    assert attention.spans(batch["position_ids"].expand(2, -1))[1] == [(0, 11), (11, 17), (17, 24)]


@pytest.mark.quick
def test_used_for_packed_rows_on_cpu_with_sdpa_only():
    from distft.config.load import load_config

    def chosen(*overrides: str, device: str = "cpu") -> str:
        model = LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation="sdpa"))
        attention.use_for(model, load_config(list(overrides))[0], torch.device(device))
        return model.config._attn_implementation

    assert chosen("data.packing=true") == attention.ATTN
    assert chosen("data.packing=false") == "sdpa"
    assert chosen("data.packing=true", "train.compile=true") == "sdpa"
    assert chosen("data.packing=true", device="cuda") == "sdpa"  # flash-attention's varlen there
    assert chosen("data.packing=true", "model.attn_implementation=eager") == "sdpa"
