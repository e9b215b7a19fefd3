"""Expert parallelism (`strategy.ep`, issue 14.3) through the engine: a tiny Mixtral trained by
`distft.train` on 2 ranks with its experts split over them equals the same job at ep=1 (losses and
exported weights, 6 fp32 steps), and its step-3 checkpoint resumes on 1 rank at ep=1 with the
same losses; a tiny Qwen2-MoE with LoRA on its experts, trained by DPO at ep=2, resumes at ep=1
with the same losses and merged weights. The refusals are one line, before any rank starts."""

from __future__ import annotations

import json
import re

import pytest

from tests.util import exported_weights, max_rel_diff, train, train_losses


def moe_dir(root, tokenizer_dir, family: str = "mixtral"):
    """A random-init Mixtral or Qwen2-MoE (4 experts, top-2, 2 layers; Qwen2-MoE with its shared
    expert) with the tiny model's tokenizer."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    if family == "mixtral":
        conf, cls = transformers.MixtralConfig(**shape, num_local_experts=4), "MixtralForCausalLM"
    else:
        conf = transformers.Qwen2MoeConfig(
            **shape, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32
        )
        cls = "Qwen2MoeForCausalLM"
    torch.manual_seed(0)
    getattr(transformers, cls)(conf).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.mark.quick
def test_ep_config_errors_are_one_line(tmp_path, tiny_model_dir):
    from distft.config.load import load_config, validate
    from distft.errors import ConfigError
    from distft.strategies.fsdp import check_ep

    moe = f"model.name_or_path={moe_dir(tmp_path / 'moe', tiny_model_dir)}"
    cases = {
        ("strategy.ep=2",): "model=tiny is not a mixture-of-experts model",
        ("model=hf", moe, "strategy.ep=3"): "does not divide the world size 2",
        ("model=hf", moe, "strategy.ep=2", "tuning=qlora"): r"tuning=full\|lora \(not yet tuning=qlora\)",
        ("model=hf", moe, "strategy.ep=2", "method=kto"): r"method=sft\|dpo only",
        ("model=hf", moe, "strategy.ep=2", "strategy.cp=2"): "not yet combined with strategy.cp/tp",
    }
    for extra, words in cases.items():
        with pytest.raises(ConfigError, match=words) as e:
            validate(load_config(["strategy=fsdp", *extra])[0])
        assert "\n" not in str(e.value)
    for other in ("ddp", "zero3"):
        with pytest.raises(ConfigError, match="strategy=fsdp") as e:
            load_config([f"strategy={other}", "strategy.ep=2"])
        assert "\n" not in str(e.value)
    # LoRA splits each expert's adapter with it: PEFT folds a stack of 2 or more experts
    with pytest.raises(ConfigError, match="at least 2 a rank: set strategy.ep <= 2") as e:
        cfg = load_config(["strategy=fsdp", "model=hf", moe, "tuning=lora"])[0]
        check_ep(cfg, 4, ep=4)
    assert "\n" not in str(e.value)
    check_ep(load_config(["strategy=fsdp", "model=hf", moe])[0], 4, ep=4)  # full: 1 a rank
    for ok in (["strategy=hsdp"], ["strategy=fsdp", "tuning=lora", "tuning.train_router=true", "method=dpo"]):
        validate(load_config([*ok, "model=hf", moe, "strategy.ep=2"])[0])  # accepted


@pytest.mark.slow
def test_ep2_equals_ep1_in_distft_verify_and_its_checkpoint_resumes_at_ep1_on_one_rank(
    tmp_path, tiny_model_dir, capsys
):
    """distft-verify's expert_parallel check (2 ranks at ep=2 vs at ep=1: 6 fp32 steps' losses and
    the exported weights within 1e-4); then ep=2's step-3 checkpoint resumed on 1 rank at ep=1."""
    moe = moe_dir(tmp_path / "moe", tiny_model_dir)
    user = ["model=hf", f"model.name_or_path={moe}", "strategy=fsdp", "train.precision=fp32", "strategy.ep=2"]
    work = tmp_path / "verify"
    from distft.verify.cli import main as verify  # in this process; its runs are torchrun jobs

    args = ["--work-dir", str(work), "--steps", "6", "--micro", "4", "--only", "expert_parallel"]
    assert verify([*args, *user]) == 0, capsys.readouterr().out[-4000:]
    [row] = json.loads((work / "verify.json").read_text())
    assert row["name"] == "expert parallel" and row["passed"], row
    measured = re.findall(r"([0-9.e+-]+) rel", row["measured"])
    assert len(measured) == 2 and all(float(x) <= 1e-4 for x in measured), row  # losses, weights
    ep2, ep1 = work / "expert_parallel", work / "reference"
    log = (ep2 / "train.log").read_text()
    assert re.search(r"each rank holds 2 of 4 experts in each of 2 MoE layers \(ep=2\)", log)
    for run, ep in ((ep2, 2), (ep1, 1)):
        assert re.search(rf"^  ep: {ep}$", (run / "config.yaml").read_text(), re.M)
    a = train_losses(ep2)
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and a == pytest.approx(train_losses(ep1), rel=1e-4)
    # export/ is an ordinary HF checkpoint: the experts gathered whole, under their usual names
    weights = exported_weights(ep2)
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in weights
    # ep=2's step-3 checkpoint on 1 rank at ep=1 (experts resharded by DCP), same global batch
    resumed = tmp_path / "resumed"
    same = ["train.micro_batch_size=4", "train.grad_accum=2", "train.max_steps=6", "data.num_examples=200"]
    ckpt = f"resume={ep2 / 'checkpoints' / 'step_3'}"
    train(resumed, *user[:-1], *same, "train.eval_every=0", ckpt, nproc=1)
    c = train_losses(resumed)
    assert sorted(c) == [4, 5, 6], c
    for step in c:
        assert abs(a[step] - c[step]) <= 1e-4 * abs(a[step]), (step, a[step], c[step])
    assert max_rel_diff(weights, exported_weights(resumed)) < 1e-4


@pytest.mark.slow
def test_lora_at_ep2_resumed_at_ep1_trains_the_same_qwen2_moe_by_dpo(tmp_path, tiny_model_dir):
    """LoRA on the experts (each rank keeps its experts' factors), DPO and Qwen2-MoE (a shared expert
    beside the routed ones), 2 processes: 2 ranks at ep=2 for 6 fp32 steps, and its step-3
    checkpoint (the factors split by expert) resumed on 1 rank at ep=1, same global batch. Steps 4-6
    run the same state at ep=2 and at ep=1: their losses and the merged exported weights agree within
    1e-4 (distft-verify's comparison), and the adapter files hold the same tensors in PEFT's shapes."""
    moe = moe_dir(tmp_path / "qwen2_moe", tiny_model_dir, "qwen2_moe")
    user = ["model=hf", f"model.name_or_path={moe}", "strategy=fsdp", "train.precision=fp32", "tuning=lora"]
    user += ["method=dpo", "tuning.merge_on_export=true", "train.max_steps=6", "data.num_examples=200"]
    user += ["train.eval_every=0", "data.max_eval_generations=0", "eval.test=false"]
    ep2, ep1 = tmp_path / "ep2", tmp_path / "ep1"
    out = train(ep2, *user, "train.micro_batch_size=4", "strategy.ep=2", "train.save_every=3").stdout
    assert "each rank holds 2 of 4 experts in each of 2 MoE layers (ep=2)" in out
    ckpt = f"resume={ep2 / 'checkpoints' / 'step_3'}"
    train(ep1, *user, "train.micro_batch_size=4", "train.grad_accum=2", ckpt, nproc=1)
    a, c = train_losses(ep2), train_losses(ep1)
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and len({round(v, 5) for v in a.values()}) > 1, a  # off log 2
    assert sorted(c) == [4, 5, 6] and c == pytest.approx({s: a[s] for s in c}, rel=1e-4), (a, c)
    from distft.verify.checks import compare_exports

    check = compare_exports("ep", ep2, ep1, 1e-4, "ep=2 vs ep=1 from ep=2's step 3")
    assert check.passed and "(adapter merged)" in check.detail, check
    from safetensors.torch import load_file

    factors = load_file(str(ep2 / "export" / "adapter_model.safetensors"))
    experts = {k: v for k, v in factors.items() if ".mlp.experts." in k}
    assert len(experts) == 2 * 2 * 2, sorted(experts)  # lora_A/B of gate_up_proj and down_proj, 2 layers
    # PEFT's 2-D layout (lora_A: experts·r × in; lora_B: out × r·experts), lora_B trained off zero
    assert {tuple(v.shape) for k, v in experts.items() if "lora_A" in k} == {(32, 32)}
    assert all(float(v.abs().max()) > 0 for k, v in experts.items() if "lora_B" in k)
    merged = load_file(str(ep2 / "export" / "merged" / "model.safetensors"))
    base = load_file(str(moe / "model.safetensors"))
    assert max(float((merged[k] - base[k]).abs().max()) for k in base) > 1e-3  # the adapters changed it
