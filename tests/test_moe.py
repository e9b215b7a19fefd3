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


EP_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from distft.models import expert_parallel as ep
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
path = sys.argv[1]
ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # ep=1: every expert, whole batch
model = ep.load(path, ep=2, world_size=world)
g = torch.Generator().manual_seed(5)
batches = [torch.randint(0, 64, (2 * world, 12), generator=g) for _ in range(5)]
opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
losses = []
for ids in batches:
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward(); opt_ref.step(); opt_ref.zero_grad()
    mine = ids[2 * rank : 2 * rank + 2]  # each rank its share of the global batch
    loss = model(input_ids=mine, labels=mine).loss
    loss.backward(); opt.step(); opt.zero_grad()
    mean = loss.detach().clone(); dist.all_reduce(mean)
    losses.append((float(ref_loss), float(mean) / world))
full = ep.full_state_dict(model)
diff = max(float((full[n] - p).abs().max()) for n, p in ref.named_parameters())
if rank == 0:
    print(json.dumps({"losses": losses, "param_diff": diff, "local_experts": ep.local_experts(model)}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_expert_parallel_equals_ep1_over_five_fp32_steps(tmp_path):
    import json
    import subprocess
    import sys

    from tests.util import REPO, env, free_port

    torch.manual_seed(0)
    _mixtral().save_pretrained(tmp_path / "mixtral")
    script = tmp_path / "ep_check.py"
    script.write_text(EP_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    out = subprocess.run(
        [*cmd, str(script), str(tmp_path / "mixtral")], cwd=REPO, env=env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["local_experts"] == [2, 2]  # 4 experts per layer, 2 layers, ep=2: half on each rank
    for ref_loss, ep_loss in result["losses"]:
        assert abs(ref_loss - ep_loss) <= 1e-4 * max(1.0, abs(ref_loss))
    assert result["param_diff"] < 1e-4
