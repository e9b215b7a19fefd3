"""End-to-end runs on real ranks: the default job learns; LoRA/QLoRA on sharded strategies export
adapters that load offline in a fresh process and reproduce the trained logits; every strategy
trains and checkpoints; W&B offline gets the metrics; a plain single process works."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import pytest

from distft.models.tiny import build_tiny
from tests.util import REPO, env, metrics, reload_exports, train

pytestmark = pytest.mark.slow


def check_export(exp, meta_dir=None) -> dict:
    """Load an export offline in a fresh process and compare with the recorded trained logits."""
    return reload_exports([(exp, meta_dir or exp)])[str(exp)]


# ---------------------------------------------------------------- the default job
@pytest.fixture(scope="module")
def default_job(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("default") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.main", f"output_dir={run_dir}", "cluster.master_port=29611"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return run_dir, proc


def test_default_job_learns_the_task(default_job):
    run_dir, proc = default_job
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["before"]["exact_match"] <= 0.05
    assert summary["after"]["exact_match"] >= 0.5
    assert summary["eval/loss"] < 0.5
    assert "distft run summary" in proc.stdout and "exact_match" in proc.stdout
    assert "loss=" in proc.stderr and "tok_s=" in proc.stderr  # the progress bar


def test_default_job_writes_run_dir(default_job):
    run_dir, _ = default_job
    rows = metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[0]["step"] == 1 and len(train_rows) == train_rows[-1]["step"]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(isinstance(r[key], float) for r in train_rows), key
    assert any("eval/loss" in r and "eval/ppl" in r for r in rows)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "data_report.json").is_file()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{train_rows[-1]['step']}"
    assert (run_dir / "checkpoints" / latest / "dcp" / ".metadata").is_file()


def test_default_export_reproduces_trained_logits(default_job):
    run_dir, _ = default_job
    out = check_export(run_dir / "export")
    assert out["max_diff"] <= 1e-4 * out["scale"]
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert (run_dir / "export" / "tokenizer.json").is_file()


# ---------------------------------------------------------------- LoRA on ZeRO-3
@pytest.fixture(scope="module")
def lora_zero3(tmp_path_factory):
    """LoRA on ZeRO-3 (the empty-adapter trap), from a local HF directory, on chat data with
    packing, gradient checkpointing, W&B offline and a merged export."""
    root = tmp_path_factory.mktemp("lora_zero3")
    from distft.config.load import load_config

    cfg, _ = load_config([])
    model_dir = build_tiny(root / "local_model", cfg.model)
    data = root / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(300):
            w = "".join(chr(97 + (i * 7 + k * 3) % 26) for k in range(3 + i % 3))
            msgs = [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    run_dir = root / "run"
    train(
        run_dir,
        "strategy=zero3",
        "tuning=lora",
        "tuning.merge_on_export=true",
        "model=hf",
        f"model.name_or_path={model_dir}",
        f"data.path={data}",
        "data.packing=true",
        "data.max_length=48",
        "train.gradient_checkpointing=true",
        "train.max_steps=6",
        "train.micro_batch_size=4",
        "train.lr=1e-2",
        "logger=wandb",
    )
    return run_dir, model_dir


def test_lora_zero3_adapter_is_not_empty_and_reproduces_logits(lora_zero3):
    run_dir, model_dir = lora_zero3
    exp = run_dir / "export"
    assert (exp / "adapter_model.safetensors").is_file() and not (exp / "model.safetensors").exists()
    adapter_cfg = json.loads((exp / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(model_dir)
    out = check_export(exp)
    assert out["lora_b_abs_sum"] > 0
    assert out["diff_from_base"] > 1e-3
    assert out["max_diff"] <= 1e-4 * out["scale"]
    merged = check_export(exp / "merged", meta_dir=exp)
    assert merged["max_diff"] <= 1e-4 * merged["scale"]


def test_lora_checkpoint_holds_only_the_adapter(lora_zero3):
    run_dir, model_dir = lora_zero3
    ckpt = run_dir / "checkpoints" / "step_6"
    ds_files = list((ckpt / "deepspeed").glob("*model_states.pt"))
    assert ds_files
    import torch

    sd = torch.load(ds_files[0], map_location="cpu", weights_only=False)["module"]
    # Frozen base weights are not stored (ZeRO-3 keeps empty placeholders for tied ones).
    assert sd and all("lora_" in k for k, v in sd.items() if v.numel() > 0)
    # Weights plus Adam moments of the full model would be 3x the base; the adapter's are tiny.
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    base_bytes = (model_dir / "model.safetensors").stat().st_size
    assert ckpt_bytes < base_bytes, (ckpt_bytes, base_bytes)
    assert not (ckpt / "deepspeed" / "latest").exists() and not (ckpt / "latest").exists()


def test_wandb_offline_run_has_metrics_and_config(lora_zero3):
    run_dir, _ = lora_zero3
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    blob = open(files[0], "rb").read()
    for key in (b"loss", b"grad_norm", b"tokens_per_s", b"eval/loss", b"micro_batch_size", b"tuning:lora"):
        assert key in blob, key


def test_packing_and_chat_data_were_used(lora_zero3):
    run_dir, _ = lora_zero3
    report = json.loads((run_dir / "data_report.json").read_text())
    train = report["splits"]["train"]
    assert train["packed_sequences"] == train["examples"] < train["rows"] / 1.5  # ~2 chats per sequence


# ---------------------------------------------------------------- QLoRA on FSDP2
def test_qlora_fsdp_export_loads_quantized_and_reproduces_logits(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "strategy=fsdp", "tuning=qlora", "train.max_steps=4", "train.lr=1e-2")
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert all(0 < r["loss"] < 10 for r in rows)  # no silent 0 / NaN (uint8 storage trap)
    out = check_export(run_dir / "export")
    assert out["lora_b_abs_sum"] > 0 and out["max_diff"] <= 1e-4 * out["scale"]


# ---------------------------------------------------------------- every strategy
@pytest.mark.parametrize("strategy", ["zero1", "zero3_offload"])
def test_other_strategies_train_checkpoint_and_resume(tmp_path, strategy):
    run_dir = tmp_path / "run"
    common = [f"strategy={strategy}", "train.eval_generate=false", "train.export=none"]
    train(run_dir, *common, "train.max_steps=3")
    train(run_dir, *common, "train.max_steps=5")
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_5"


def test_plain_process_bf16_epochs_and_warmup(tmp_path):
    """One plain process (no launcher), bf16 autocast, train.epochs, linear warmup schedule."""
    run_dir = tmp_path / "run"
    train(
        run_dir,
        "train.precision=bf16",
        "train.max_steps=0",
        "train.epochs=0.5",
        "train.micro_batch_size=8",
        "train.lr_scheduler=linear",
        "train.warmup_steps=3",
        "train.eval_generate=false",
        plain=True,
    )
    rows = [r for r in metrics(run_dir) if "lr" in r]
    train_examples = json.loads((run_dir / "data_report.json").read_text())["splits"]["train"]["examples"]
    assert len(rows) == -(-(train_examples // 8) // 2)  # half an epoch at global batch 8, rounded up
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == 0.0 and lrs[3] == max(lrs) and lrs[-1] < lrs[3]
    assert rows[-1]["loss"] < rows[0]["loss"]
