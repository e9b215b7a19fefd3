"""LoRA on mixture-of-experts models (distft/tuning/moe.py): the fused 3-D expert weights of
Mixtral and Qwen2-MoE get adapters, the router stays frozen unless tuning.train_router=true."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch

from distft.tuning import lora

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(
        MixtralConfig(**SMALL, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    )


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    conf = Qwen2MoeConfig(
        **SMALL,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen2MoeForCausalLM(conf)


def _cfg(train_router: bool) -> NS:
    tuning = NS(
        name="lora",
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=["all-linear"],
        init_adapter=None,
        train_router=train_router,
    )
    return NS(tuning=tuning, model=NS(freeze_vision=True, freeze_projector=False))


@pytest.mark.quick
@pytest.mark.parametrize("build", [_mixtral, _qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_lora_reaches_the_experts_and_the_router_is_frozen_unless_asked(build):
    torch.manual_seed(0)
    for train_router in (False, True):
        model = lora.apply(build(), _cfg(train_router))
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        expert = [n for n in trainable if ".mlp.experts." in n and "lora_" in n]
        router = [n for n in trainable if ".mlp.gate." in n]
        # both fused weights (gate_up_proj, down_proj) of every layer's experts: nested ParamWrappers
        assert len(expert) == 2 * 2 * 2, expert
        assert any("self_attn.q_proj.lora_A" in n for n in trainable)
        assert not any("lm_head" in n for n in trainable)
        if not train_router:
            assert router == [], router
            assert all(not p.requires_grad for n, p in model.named_parameters() if ".mlp.gate." in n)
        else:
            assert router and all("modules_to_save" in n for n in router), router
        ids = torch.randint(0, 64, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        for n in expert + router:
            assert trainable[n].grad is not None, n
        # lora_B starts at zero: the gradient reaching lora_B of the experts proves they are in the graph
        assert any(float(trainable[n].grad.abs().sum()) > 0 for n in expert if "lora_B" in n)
