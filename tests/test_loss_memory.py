"""Chunked loss (train.loss_chunks) and activation offloading (train.activation_offload): same
losses and gradients as the plain forward, in process."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from distft.contracts import Strategy
from distft.methods.logprobs import model_logps, model_nll, model_token_logps


def _llama(tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).double()


def _batch(n: int = 3, t: int = 11) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (n, t), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[1, 8:] = -100  # padding
    pos = torch.arange(t).repeat(n, 1)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _value_and_grads(model, fn) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    value = fn()
    value.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def _assert_same(model, plain, chunked) -> None:
    v0, g0 = _value_and_grads(model, plain)
    v1, g1 = _value_and_grads(model, chunked)
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-8)
    assert g0.keys() == g1.keys() and any("lm_head" in k or "embed_tokens" in k for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-8, msg=k)


@pytest.mark.quick
@pytest.mark.parametrize("chunks", [1, 3, 64])
def test_chunked_nll_and_logps_match_unchunked(chunks):
    model, batch = _llama(), _batch()
    _assert_same(model, lambda: model_nll(model, batch), lambda: model_nll(model, batch, chunks))
    _assert_same(model, lambda: model_logps(model, batch)[0], lambda: model_logps(model, batch, chunks)[0])
    _, mask0 = model_logps(model, batch)
    _, mask1 = model_logps(model, batch, chunks)
    assert torch.equal(mask0, mask1)


@pytest.mark.quick
def test_chunked_loss_never_holds_whole_sequence_logits():
    """The head only ever sees a chunk's positions: forward and the recompute in backward."""
    model, batch = _llama(tie=True), _batch(t=12)
    seen = []
    model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.numel() // out.size(-1)))
    model_nll(model, batch, 4).backward()
    assert seen[0] == 0  # the model's own head call keeps no position
    assert max(seen) == 5 and len(seen) == 1 + 4 + 4  # 20 scored positions in chunks of 5; recomputed


@pytest.mark.quick
def test_chunked_loss_through_peft_and_softcap():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    batch = _batch()
    _assert_same(model, lambda: model_nll(model, batch), lambda: model_nll(model, batch, 2))
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=2.0,
        )  # fmt: skip
    ).double()
    _assert_same(gemma, lambda: model_nll(gemma, batch), lambda: model_nll(gemma, batch, 3))
    t0, _ = model_token_logps(gemma, batch["input_ids"], None, batch["labels"], 0, temperature=0.7)
    t1, _ = model_token_logps(gemma, batch["input_ids"], None, batch["labels"], 3, temperature=0.7)
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-8)


class _OneProcess(Strategy):
    """A strategy on one process with plain autograd (the contract's no-op hooks for the rest)."""

    loss_scale = 1.0

    def __init__(self, model, offload: bool):
        from types import SimpleNamespace

        self.model = model
        self.cfg = SimpleNamespace(train=SimpleNamespace(activation_offload=offload))
        self.info = SimpleNamespace(device=torch.device("cpu"))

    def accumulate(self, is_last: bool):
        from contextlib import nullcontext

        return nullcontext()

    def backward(self, loss, is_last: bool) -> None:
        loss.backward()

    def set_lr(self, lr) -> None:
        pass

    def step(self) -> float:
        return 0.0


@pytest.mark.quick
def test_activation_offload_engages_hooks_and_keeps_losses_and_grads():
    from distft.strategies.offload import ActivationOffload
    from distft.strategies.step import optimizer_step

    model, batch = _llama(), _batch()
    batch["num_targets"] = int((batch["labels"][:, 1:] != -100).sum())
    results, grads = {}, {}
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        strategy = _OneProcess(model, offload)
        results[offload] = optimizer_step(strategy, [batch], lambda m, b: (model_nll(m, b), {}), "cpu", None)
        grads[offload] = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert results[True].loss == pytest.approx(results[False].loss, rel=1e-12)
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-12, atol=0)
    assert "offload/tensors" not in results[False].parts
    assert results[True].parts["offload/tensors"][0] > 20  # every block's saved activations went through
    assert results[True].parts["offload/host_gib"][0] == 0  # CPU: host memory is the device memory
    # Under gradient checkpointing and chunked loss only the checkpoints' inputs pass the hooks.
    model.gradient_checkpointing_enable({"use_reentrant": False})
    offload = ActivationOffload("cpu")
    with offload:
        loss = model_nll(model, batch, 2)
    loss.backward()
    assert 0 < offload.packed < results[True].parts["offload/tensors"][0]
    assert loss.item() / batch["num_targets"] == pytest.approx(results[False].loss, rel=1e-6)
