"""MFU accounting: FLOPs per token against the closed form and TRL's independent count, the GPU
peak table, the cached CPU calibration, and mfu/mem_gib logged by a real run."""

from __future__ import annotations

import json

import pytest
import torch

from distft.perf import mfu
from tests.util import metrics, train

SHAPE = dict(hidden=64, inter=160, layers=2, heads=4, vocab=100)


def llama(tie: bool = True, kv_heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=SHAPE["vocab"],
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["inter"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


@pytest.mark.quick
@pytest.mark.parametrize("tie", [True, False])
def test_matmul_params_exclude_the_embedding_and_count_the_head(tie):
    h, i, L, V = SHAPE["hidden"], SHAPE["inter"], SHAPE["layers"], SHAPE["vocab"]
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q k v o, gate up down, two norms
    expected = L * per_layer + h + V * h  # + final norm + the output head (tied or not)
    n, n_trainable = mfu.matmul_params(llama(tie=tie))
    assert n == expected
    assert n_trainable == expected


@pytest.mark.quick
def test_full_finetuning_is_6n_plus_attention():
    model = llama()
    n, nt = mfu.matmul_params(model)
    L, H, Q = mfu.model_shape(model.config)
    assert (L, H, Q) == (2, 4, 16)
    assert mfu.flops_per_token(n, nt, L, H, Q, 32) == 6 * n + 12 * L * H * Q * 32


@pytest.mark.quick
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_agrees_with_trl_compute_flops_per_token(kv_heads):
    """TRL counts matmul FLOPs layer by layer (no norms); the two must agree within 1%."""
    from trl.trainer.utils import compute_flops_per_token

    model = llama(kv_heads=kv_heads)
    meter = mfu.MfuMeter.for_model(model, 128, torch.device("cpu"), torch.float32, 1)
    theirs = compute_flops_per_token(model.config, 128)
    assert abs(meter.flops_per_token - theirs) / theirs < 0.01


@pytest.mark.quick
def test_frozen_base_costs_4n_plus_2n_trainable():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=4, target_modules="all-linear"))
    n, nt = mfu.matmul_params(model)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert nt == lora and 0 < nt < n
    assert mfu.flops_per_token(n, nt, 2, 4, 16, 0) == 4 * n + 2 * nt


@pytest.mark.quick
@pytest.mark.parametrize("tie", [True, False])
def test_head_counted_on_the_scored_share_of_tokens(tie):
    """The head runs on scored positions only (distft.methods.logprobs): its 6·V·H per token is
    counted times the scored fraction; the rest of the model on every token."""
    model = llama(tie=tie)
    h, v = SHAPE["hidden"], SHAPE["vocab"]
    assert mfu.head_params(model) == (v * h, v * h)
    cpu = torch.device("cpu")
    full = mfu.MfuMeter.for_model(model, 32, cpu, torch.float32, 1).flops_per_token
    part = mfu.MfuMeter.for_model(model, 32, cpu, torch.float32, 1, head_fraction=0.25).flops_per_token
    assert full - part == 6 * v * h * 0.75


@pytest.mark.quick
def test_scored_fraction_of_sft_and_preference_examples():
    sft = [
        {"input_ids": [1] * 6, "labels": [-100, -100, -100, 4, 5, 6]},  # 3 scored positions of 6
        {"input_ids": [1] * 4, "labels": [-100, 2, -100, 3]},  # 2 of 4 (a packed row)
    ]
    assert mfu.scored_fraction(sft) == 5 / 10
    dpo = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}]
    assert mfu.scored_fraction(dpo) == 3 / (5 + 4)
    kto = [{"prompt_ids": [1, 2], "completion_ids": [3, 4], "kl_ids": [5, 6], "label": 1}]
    assert mfu.scored_fraction(kto) == 4 / 8
    assert mfu.scored_fraction([{"text": "x", "label": 1}]) is None
    assert mfu.scored_fraction(sft * 5000, sample=100) == 5 / 10  # a sample of evenly spaced rows


@pytest.mark.quick
@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", 165.2e12),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_gpu_peak_table(name, peak):
    assert mfu.gpu_peak_flops(name) == peak


@pytest.mark.quick
def test_cpu_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTFT_CACHE", str(tmp_path))
    measured = mfu.cpu_peak_flops(torch.float32, threads=1)
    assert 1e8 < measured < 1e13  # a real matmul rate, not a placeholder
    cache = tmp_path / "cpu_peak_flops.json"
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: 12345.0}))  # a later call must read it, not measure again
    assert mfu.cpu_peak_flops(torch.float32, threads=1) == 12345.0


@pytest.mark.quick
def test_meter_divides_by_peak_times_world_size():
    meter = mfu.MfuMeter(flops_per_token=1e6, peak_flops=1e9, world_size=2)
    assert meter.mfu(1000.0) == pytest.approx(0.5)
    assert mfu.MfuMeter(1e6, None, 1).mfu(1000.0) is None


@pytest.mark.slow
def test_a_run_logs_mfu_and_memory(tmp_path):
    """mfu in every row is tokens/s × FLOPs per token of the model / the cached CPU peak."""
    from transformers import AutoModelForCausalLM

    run, cache = tmp_path / "run", tmp_path / "cache"
    overrides = ["train.max_steps=3", "train.eval_generate=false", "train.export=none"]
    train(run, *overrides, nproc=1, plain=True, extra_env={"DISTFT_CACHE": str(cache)})
    rows = [r for r in metrics(run) if "loss" in r]
    assert len(rows) == 3
    (peak,) = json.loads((cache / "cpu_peak_flops.json").read_text()).values()
    model = AutoModelForCausalLM.from_pretrained(run / "base_model")
    seq = json.loads((run / "data_report.json").read_text())["splits"]["train"]["tokens_p50"]
    expected = (
        mfu.MfuMeter.for_model(model, seq, torch.device("cpu"), torch.float32, 1).flops_per_token / peak
    )
    for r in rows:
        assert 0 < r["mfu"] < 1
        assert r["mfu"] / r["tokens_per_s"] == pytest.approx(expected, rel=0.02)
        assert 0.1 < r["mem_gib"] < 64
        assert r["time"] > 1.7e9


H100 = "NVIDIA H100 80GB HBM3"


@pytest.mark.quick
@pytest.mark.parametrize(
    "name, kind, peak",
    [
        (H100, "fp32", 67e12),
        (H100, "tf32", 494.7e12),
        (H100, "fp16", 989e12),
        ("NVIDIA H800", "bf16", 989e12),
        ("NVIDIA H800 PCIe", "tf32", 378e12),
        ("NVIDIA B200", "bf16", 2250e12),
        ("NVIDIA B200", "fp32", 75e12),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
    ],
)
def test_gpu_peak_table_per_matmul_kind(name, kind, peak):
    assert mfu.gpu_peak_flops(name, kind) == peak


@pytest.mark.quick
def test_matmul_kind_follows_dtype_and_tf32():
    assert mfu.matmul_kind(torch.bfloat16, tf32=True) == "bf16"
    assert mfu.matmul_kind(torch.float16, tf32=False) == "fp16"
    assert mfu.matmul_kind(torch.float32, tf32=True) == "tf32"
    assert mfu.matmul_kind(torch.float32, tf32=False) == "fp32"


@pytest.fixture
def cuda_precision_restored():
    from distft.perf import precision

    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield precision
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.quick
def test_an_fp32_run_on_a_gpu_is_measured_against_its_own_peak(monkeypatch, cuda_precision_restored):
    """The device name is the one query with no real CUDA here; the TF32 switch is torch's real one.
    An fp32 run was divided by the bf16 peak (MFU ~15x low on an H100 without TF32)."""
    precision = cuda_precision_restored
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    cuda = torch.device("cuda", 0)
    assert precision.configure(True, cuda) is True
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert mfu.device_peak_flops(cuda, torch.float32) == 494.7e12
    assert mfu.device_peak_flops(cuda, torch.bfloat16) == 989e12
    assert precision.configure(False, cuda) is False
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert mfu.device_peak_flops(cuda, torch.float32) == 67e12


@pytest.mark.quick
def test_tf32_is_on_by_default_and_only_touches_cuda(cuda_precision_restored):
    from distft.config.schema import TrainConfig

    precision = cuda_precision_restored
    assert TrainConfig().tf32 is True
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert precision.configure(True, torch.device("cpu")) is False
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"  # CPU runs leave CUDA's flag alone
    assert torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")  # CPU matmuls stay IEEE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tf32_on_a_real_gpu_run(tmp_path):
    """GPU: an fp32 run turns TF32 on (train.tf32's default) and its mfu is measured against the
    card's TF32 peak (tokens/s × FLOPs per token / peak)."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    overrides = ["train.max_steps=3", "train.eval_generate=false", "train.export=none"]
    train(run, *overrides, "cluster.gpus_per_node=1", "cluster.nproc_per_node=1", nproc=1, plain=True)
    peak = mfu.gpu_peak_flops(torch.cuda.get_device_name(0), "tf32")
    model = AutoModelForCausalLM.from_pretrained(run / "base_model")
    seq = json.loads((run / "data_report.json").read_text())["splits"]["train"]["tokens_p50"]
    fpt = mfu.MfuMeter.for_model(model, seq, torch.device("cpu"), torch.float32, 1).flops_per_token
    for r in (r for r in metrics(run) if "loss" in r):
        if peak is None:
            assert r["mfu"] is None
        else:
            assert r["mfu"] / r["tokens_per_s"] == pytest.approx(fpt / peak, rel=0.02)


@pytest.mark.quick
def test_engine_meter_counts_the_head_on_scored_tokens_for_methods_that_do_so(tmp_path, monkeypatch):
    """distft.engine.build.mfu_meter: SFT/DPO/KTO (`scored_head`) get the train rows' scored share."""
    from types import SimpleNamespace

    monkeypatch.setenv("DISTFT_CACHE", str(tmp_path))  # the CPU peak's cache
    monkeypatch.setattr(mfu, "calibrate_cpu", lambda dtype, threads: 1e9)

    from distft.engine.build import mfu_meter

    cfg = SimpleNamespace(data=SimpleNamespace(max_length=32), train=SimpleNamespace(precision="fp32"))
    info = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    rows = [{"input_ids": [1] * 8, "labels": [-100] * 4 + [5] * 4}]  # 4 of 8 positions scored
    data = SimpleNamespace(train=rows)
    model, (h, v) = llama(), (SHAPE["hidden"], SHAPE["vocab"])
    full = mfu_meter(cfg, info, model, data, SimpleNamespace(scored_head=False)).flops_per_token
    scored = mfu_meter(cfg, info, model, data, SimpleNamespace(scored_head=True)).flops_per_token
    assert full - scored == 6 * v * h * (1 - 4 / 8)


@pytest.mark.quick
def test_attention_span_is_the_token_weighted_example_length():
    rows = [{"input_ids": [1] * 10}, {"input_ids": [1] * 30}]  # unpacked: (100 + 900) / 40
    assert mfu.attention_span(rows, 64) == 25.0
    packed = [{"input_ids": [1] * 40, "position_ids": [*range(10), *range(30)]}]  # the same two examples
    assert mfu.attention_span(packed, 64) == 25.0
    assert mfu.attention_span([{"prompt_ids": [1, 2]}], 64) == 64.0
