"""Paths a first GPU run takes, exercised on CPU with the same objects: the fp16 loss scaler's
overflows and the bad-step guard (issue 19.10), QLoRA's non-reentrant checkpointing (19.12),
micro_batch_size=auto's headroom (19.9). GPU-only checks carry the `gpu` marker."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from distft.config.load import load_config
from distft.engine import guard
from distft.runtime.dist import DistInfo
from tests.util import metrics, train

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CPU1 = DistInfo(
    rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo"
)


# ------------------------------------------------------------------ fp16 overflows (19.10)
def ddp_strategy(precision: str):
    """distft's real DDP strategy on one CPU rank (no wrapper at world size 1): its GradScaler,
    clipping and skipped step are the ones a GPU run uses."""
    from distft.strategies import ddp

    cfg, _ = load_config(["strategy=ddp", f"train.precision={precision}"])
    strategy = ddp.make(cfg, CPU1)
    torch.manual_seed(0)
    strategy.setup(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)))
    return strategy


def run_step(strategy, step: int) -> tuple[float, float]:
    """One step as Trainer.train_step runs it: autocast, fault hook, scaled backward, step."""
    x = torch.randn(4, 8)
    with strategy.accumulate(True):
        loss = strategy.model(x).float().pow(2).mean()
        loss = guard.inject_nan(loss, step, 0)
        strategy.backward(loss, True)
    return float(loss), strategy.step()


def weights(strategy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in strategy.model.parameters()]


@pytest.mark.quick
def test_overflows_the_grad_scaler_handles_are_skipped_but_not_bad(monkeypatch):
    """Six overflowing first steps (the scale settling from 2^16) used to stop the run at the
    fifth (train.max_bad_steps=5)."""
    monkeypatch.setenv(guard.INF_GRAD_ENV, "1,2,3,4,5,6")
    strategy = ddp_strategy("fp16")
    assert isinstance(strategy.scaler, torch.amp.GradScaler)
    bad = guard.BadStepGuard(5, scaler=guard.LossScaleWatch.of(strategy))
    start = weights(strategy)
    for step in range(6):
        loss, norm = run_step(strategy, step)
        assert torch.isfinite(torch.tensor(loss)) and not torch.isfinite(torch.tensor(norm))  # inf or nan
        assert bad.check(step + 1, loss, norm, [step], lambda: None) is True  # skipped, not fatal
    assert bad.skipped == 6 and bad.in_a_row == 0
    assert strategy.scaler.get_scale() == 2.0**16 / 2**6
    assert all(torch.equal(a, b) for a, b in zip(start, weights(strategy)))  # no update applied
    loss, norm = run_step(strategy, 6)
    assert bad.check(7, loss, norm, [6], lambda: None) is False
    assert not all(torch.equal(a, b) for a, b in zip(start, weights(strategy)))


@pytest.mark.quick
def test_non_finite_steps_no_scaler_handles_still_stop_the_run(monkeypatch):
    assert guard.LossScaleWatch.of(ddp_strategy("fp32")) is None  # fp32: every non-finite step counts

    # fp16 with a NaN loss: the scaler backs off, but no loss scale fixes the forward
    monkeypatch.setenv(guard.FAULT_ENV, "1,2")
    strategy = ddp_strategy("fp16")
    bad = guard.BadStepGuard(2, scaler=guard.LossScaleWatch.of(strategy))
    bad.check(1, *run_step(strategy, 0), [0], lambda: None)
    assert bad.in_a_row == 1
    with pytest.raises(guard.NonFiniteError):
        bad.check(2, *run_step(strategy, 1), [1], lambda: None)

    # fp16 with the scale driven to the floor: the gradients are non-finite at any scale
    monkeypatch.delenv(guard.FAULT_ENV)
    monkeypatch.setenv(guard.INF_GRAD_ENV, "1,2,3")
    strategy = ddp_strategy("fp16")
    bad = guard.BadStepGuard(2, scaler=guard.LossScaleWatch.of(strategy))
    run_step(strategy, 99)  # a good step creates the scale, as a run's first step does
    strategy.scaler.update(new_scale=2.0)
    bad.scaler.last_scale = 2.0
    assert bad.check(1, *run_step(strategy, 0), [0], lambda: None) is True  # 2 → 1: at the floor
    assert bad.in_a_row == 1
    with pytest.raises(guard.NonFiniteError):
        bad.check(2, *run_step(strategy, 1), [1], lambda: None)


@pytest.mark.quick
def test_deepspeed_fp16_overflow_flag_counts_as_handled_through_hysteresis():
    """DeepSpeed's fp16 optimizers set `overflow` on a skipped step and keep the scale for
    `hysteresis` (default 2) overflows before halving it: the flag, not the scale, says the step
    was skipped. DeepSpeed has no fp16 on CPU, so the engine is stood in for by the two attributes
    the watch reads, set as DynamicLossScaler.update_scale sets them."""
    optimizer = SimpleNamespace(overflow=False, loss_scale=2.0**16)
    engine = SimpleNamespace(fp16_enabled=lambda: True, optimizer=optimizer)
    bad = guard.BadStepGuard(2, scaler=guard.LossScaleWatch.of(SimpleNamespace(engine=engine)))
    for step, scale in enumerate([2.0**16, 2.0**15, 2.0**14], start=1):  # hysteresis, then halving
        optimizer.overflow, optimizer.loss_scale = True, scale
        assert bad.check(step, 1.0, float("inf"), [], lambda: None) is True
    assert bad.in_a_row == 0 and bad.skipped == 3
    optimizer.overflow = False
    assert bad.check(4, 1.0, 0.5, [], lambda: None) is False
    optimizer.overflow, optimizer.loss_scale = True, 1.0  # at the floor (raise_error_at_min_scale=false)
    bad.check(5, 1.0, float("inf"), [], lambda: None)
    assert bad.in_a_row == 1
    bf16 = SimpleNamespace(engine=SimpleNamespace(fp16_enabled=lambda: False))
    assert guard.LossScaleWatch.of(bf16) is None  # bf16 overflow checks are real bad steps


@pytest.mark.slow
def test_fp16_run_survives_early_overflows(tmp_path):
    """A real fp16 DDP run whose first six steps overflow completes (it stopped at step 5)."""
    run = tmp_path / "run"
    overrides = [
        "strategy=ddp", "train.precision=fp16", "train.max_steps=8", "train.eval_generate=false",
        "train.export=none", "train.max_bad_steps=5",
    ]  # fmt: skip
    env = {guard.INF_GRAD_ENV: "1,2,3,4,5,6"}
    train(run, *overrides, nproc=1, plain=True, extra_env=env)
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["skipped_steps"] == 6
    assert all(r["grad_norm"] is None or not math.isfinite(r["grad_norm"]) for r in rows[:6])  # null: NaN
    assert all(0 < r["grad_norm"] < float("inf") for r in rows[6:])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_fp16_overflows_on_gpu(tmp_path, strategy):
    run = tmp_path / strategy
    overrides = [
        f"strategy={strategy}", "train.precision=fp16", "train.max_steps=8", "train.eval_generate=false",
        "train.export=none", "cluster.gpus_per_node=1", "cluster.nproc_per_node=1",
    ]  # fmt: skip
    train(run, *overrides, nproc=1, plain=True, extra_env={guard.INF_GRAD_ENV: "1,2,3,4,5,6"})
    rows = [r for r in metrics(run) if "loss" in r]
    assert rows[-1]["step"] == 8 and rows[-1]["skipped_steps"] >= 6


# ------------------------------------------------------------------ QLoRA checkpointing (19.12)
@pytest.mark.quick
def test_qlora_keeps_non_reentrant_gradient_checkpointing(tmp_path):
    """Trainer.build enables non-reentrant checkpointing; QLoRA's prepare_model_for_kbit_training
    re-enabled it with PEFT's default kwargs, i.e. torch's reentrant checkpoint."""
    import warnings

    from distft.models import load_model
    from distft.models.tiny import build_tiny
    from distft.tuning import qlora

    cfg, _ = load_config(["tuning=qlora", "train.gradient_checkpointing=true"])
    path = str(build_tiny(tmp_path / "base", cfg.model))
    model = load_model(path, cfg, torch.float32, qlora.load_kwargs(cfg, torch.float32))
    model.gradient_checkpointing_enable({"use_reentrant": False})  # as Trainer.build does
    model = qlora.apply(model, cfg)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers, "no checkpointed module after qlora setup"
    for m in layers:
        assert m._gradient_checkpointing_func.keywords.get("use_reentrant") is False, type(m).__name__
    model.train()
    ids = torch.randint(3, 50, (2, 12))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*use_reentrant.*")  # torch warns on the implicit default
        model(input_ids=ids, labels=ids).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)


# ------------------------------------------------------------------ micro_batch_size=auto (19.9)
@pytest.mark.quick
def test_auto_micro_batch_counts_optimizer_state_and_headroom():
    """The trial runs before AdamW has state: a budget that holds the trial's peak but not the
    Adam moments the first step adds (nor the 10% headroom) must not pass the trial's micro-batch.
    Real DDP strategy and SFT loss on one CPU rank; the budget is passed in (a card's size)."""
    import resource

    from transformers import LlamaConfig, LlamaForCausalLM

    from distft.methods import METHODS
    from distft.models.tiny import build_tokenizer
    from distft.plan import auto
    from distft.plan.memory import GIB
    from distft.strategies import ddp

    cfg, _ = load_config(["strategy=ddp", "train.micro_batch_size=4"])
    tok = build_tokenizer()
    shape = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **shape))
    strategy = ddp.make(cfg, CPU1)
    strategy.setup(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adam = auto.pending_optimizer_bytes(strategy, CPU1.device)
    assert adam == 2 * 4 * trainable  # exp_avg + exp_avg_sq in fp32, none allocated yet

    method = METHODS["sft"](cfg, tok)
    rows = [
        {"input_ids": list(range(3, 19)), "labels": list(range(3, 19)), "position_ids": list(range(16))}
    ] * 8
    # Peak RSS so far, plus room for the trial's gradients (half the Adam state): the trial's peak
    # fits this budget, the trial's peak plus Adam's moments does not.
    limit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + 0.75 * adam
    record = auto.confirm_micro_batch(cfg, CPU1, method, strategy, rows, limit=limit)
    first = record["trials"][0]
    assert first["micro"] == 4 and first["peak_gib"] * GIB <= limit  # what the old check accepted
    assert first["optimizer_gib"] * GIB == adam and not first["fits"]
    assert record["micro_batch_size"] == 1 and record["usable_gib"] == pytest.approx(0.9 * limit / GIB)

    loss, _ = method.loss(strategy.model, method.collate(rows[:1]))
    strategy.backward(loss, True)
    strategy.step()
    assert auto.pending_optimizer_bytes(strategy, CPU1.device) == 0  # the real step allocated it


# ------------------------------------------------------------------ bench/gpu.py (19.14)
@pytest.mark.slow
def test_gpu_bench_smoke_runs_the_end_of_a_job(tmp_path):
    """bench/gpu.py --smoke (CPU, shrunk shapes): QLoRA trains, checkpoints, exports (the path
    whose probe crashed on a GPU), resumes and exports again; the table names what holds memory."""
    import json
    import subprocess
    import sys

    from tests.util import REPO

    out = tmp_path / "gpu"
    cmd = [sys.executable, "bench/gpu.py", "--smoke", "--only", "qlora", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "qlora: trained 3, exported" in proc.stdout and "resumed to 5, exported again" in proc.stdout
    run = out.with_name("gpu-smoke") / "qlora"
    assert (run / "export" / "adapter_model.safetensors").is_file()
    assert (run / "export_first" / "adapter_model.safetensors").is_file()
    (result,) = json.loads((out.with_name("gpu-smoke") / "results.json").read_text())["results"]
    terms = result["planner_gib"]
    assert set(terms) == {"params", "grads", "optimizer", "activations", "logits", "buffers", "total"}
    assert terms["logits"] > 0 and 0 < result["peak_gib"] < 8
    assert "What holds the memory" in proc.stdout


# ------------------------------------------------------------------ adapter bases (19.1 / 14.1)
@pytest.mark.quick
@pytest.mark.parametrize(
    "tuning, method, precision",
    [
        ("lora", "sft", "bf16"),
        ("lora", "classify", "bf16"),
        ("qlora", "sft", "bf16"),
        ("lora", "sft", "fp32"),
    ],
)
def test_adapter_base_loads_in_the_compute_precision(tmp_path, tuning, method, precision):
    """The frozen base of an adapter tuning is loaded in the compute precision (it was fp32 whatever
    train.precision said; QLoRA's embeddings and head were upcast to fp32 again); the weights that
    train are fp32 (a classification head too, which PEFT copies in the base's dtype)."""
    from transformers import AutoModelForSequenceClassification

    from distft.models import base_dtype, load_model
    from distft.models.tiny import build_tiny
    from distft.tuning import TUNINGS

    cfg, _ = load_config([f"tuning={tuning}", f"method={method}", f"train.precision={precision}"])
    path = str(build_tiny(tmp_path / "base", cfg.model))
    dtype = base_dtype(cfg, TUNINGS[tuning].adapter)
    assert dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    assert base_dtype(cfg, adapter=False) == torch.float32  # full tuning: fp32 master weights
    auto = AutoModelForSequenceClassification if method == "classify" else None
    extra = {"num_labels": 2} if method == "classify" else {}
    model = load_model(path, cfg, dtype, {**TUNINGS[tuning].load_kwargs(cfg, dtype), **extra}, auto)
    model = TUNINGS[tuning].apply(model, cfg)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {dtype} and trainable == {torch.float32}
    assert model.get_input_embeddings().weight.dtype == dtype


@pytest.mark.quick
def test_fast_kernels_are_refused_on_cpu_and_named_when_missing(monkeypatch):
    """model.kernels=liger and flash-attention are CUDA kernels: refused in one line on CPU, and
    on GPU nodes a missing package is named with its install command."""
    from distft.config.load import load_config
    from distft.errors import ConfigError
    from distft.models import kernels

    def refused(overrides: list[str]) -> str:
        with pytest.raises(ConfigError) as e:
            load_config(overrides)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert load_config([])[0].model.kernels == "none"
    assert "model.kernels=liger needs CUDA GPUs" in refused(["model.kernels=liger"])
    msg = refused(["model.attn_implementation=flash_attention_2"])
    assert "is a CUDA kernel" in msg and "model.attn_implementation=sdpa on CPU" in msg
    assert "is a CUDA kernel" in refused(["model.attn_implementation=kernels-community/flash-attn"])
    monkeypatch.setattr(kernels, "_installed", lambda module: False)
    gpu = ["cluster.gpus_per_node=1"]
    assert "pip install liger-kernel" in refused([*gpu, "model.kernels=liger"])
    assert "pip install flash-attn" in refused([*gpu, "model.attn_implementation=flash_attention_2"])
    assert "pip install kernels" in refused([*gpu, "model.attn_implementation=kernels-community/flash-attn"])
    monkeypatch.setattr(kernels, "_installed", lambda module: True)
    load_config([*gpu, "model.kernels=liger", "model.attn_implementation=flash_attention_2"])


@pytest.mark.gpu
@requires_gpu
def test_liger_and_flash_attention_train_like_the_plain_kernels(tmp_path):
    """On a GPU with liger-kernel and flash-attn installed: the same job with and without them
    trains to losses within bf16 noise, and Liger's modules are in the model."""
    pytest.importorskip("liger_kernel")
    pytest.importorskip("flash_attn")
    base = ["cluster.gpus_per_node=1", "train.precision=bf16", "train.max_steps=4", "train.export=none"]
    base += ["train.eval_generate=false"]
    train(tmp_path / "plain", *base, nproc=1)
    train(
        tmp_path / "fast",
        *base,
        "model.kernels=liger",
        "model.attn_implementation=flash_attention_2",
        nproc=1,
    )
    plain = [r["loss"] for r in metrics(tmp_path / "plain") if "loss" in r]
    fast = [r["loss"] for r in metrics(tmp_path / "fast") if "loss" in r]
    assert len(plain) == len(fast) == 4
    assert all(abs(a - b) <= 0.05 * max(1.0, abs(a)) for a, b in zip(plain, fast)), (plain, fast)


@pytest.mark.gpu
@requires_gpu
def test_liger_patches_the_model_instance(tmp_path):
    pytest.importorskip("liger_kernel")
    from transformers import AutoModelForCausalLM

    from distft.models import kernels
    from distft.models.tiny import build_tiny

    cfg = load_config(["cluster.gpus_per_node=1", "model.kernels=liger"])[0]
    model = AutoModelForCausalLM.from_pretrained(build_tiny(tmp_path / "m", cfg.model)).cuda()
    assert kernels.apply(model, cfg.model) == ["liger (llama)"]
    ids = torch.randint(0, 50, (2, 16), device="cuda")
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
