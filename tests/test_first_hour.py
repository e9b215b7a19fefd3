"""A user's first hour (issue 13): exports that survive a move, plain logs when stdout is a file,
quiet runs, the random-init warning for adapters. One real LoRA run on the tiny default checks them
all (a plain process, stdout/stderr captured, so not a terminal)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from distft.engine.export import base_reference
from tests.util import REPO, env, train

LOAD_MOVED = """
import json, torch
from transformers import AutoModelForCausalLM
exp = {exp!r}
meta = json.load(open(exp + "/distft_export.json"))
ids = torch.tensor(meta["probe_input_ids"])
pos = torch.arange(ids.shape[1]).expand_as(ids)
def logits(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits.flatten()[:512]
want = torch.tensor(meta["probe_logits"])
got, base = logits(exp), logits(exp + "/base")
print(json.dumps({{"max_diff": float((got - want).abs().max()), "scale": float(want.abs().max()),
                  "diff_from_base": float((base - want).abs().max())}}))
"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """tuning=lora on the tiny default, progress on, stdout/stderr not a terminal."""
    run_dir = tmp_path_factory.mktemp("first_hour") / "run"
    cmd = [
        sys.executable,
        "-m",
        "distft.train",
        f"output_dir={run_dir}",
        "tuning=lora",
        "data.num_examples=400",
        "data.max_eval_generations=8",
        "train.max_new_tokens=6",
        "train.max_steps=12",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return run_dir, proc


@pytest.mark.slow
def test_adapter_export_survives_a_move(lora_run, tmp_path):
    run_dir, _ = lora_run
    assert (run_dir / "export" / "base" / "model.safetensors").is_file()
    assert (run_dir / "export" / "model.safetensors").is_file()  # the base embedded at the root
    moved = tmp_path / "elsewhere" / "my_adapter"
    shutil.copytree(run_dir / "export", moved)
    shutil.rmtree(run_dir / "export")  # the original location is gone
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(LOAD_MOVED.format(exp=str(moved)))],
            cwd=tmp_path,  # neither the repo nor the export
            env=env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["max_diff"] <= 1e-4 * out["scale"], out  # the trained model's logits
        assert out["diff_from_base"] > 1e-3, out  # ... which are not the base's: the adapter is applied
        from distft.tools import adapters

        merged = adapters.merge(moved, tmp_path / "merged")  # distft-export finds the moved base too
        assert (merged / "model.safetensors").is_file()
    finally:
        shutil.copytree(moved, run_dir / "export")


@pytest.mark.quick
def test_adapter_base_reference(tmp_path, monkeypatch):
    """A hub id stays a hub id; a local base outside the export is named by its absolute path."""
    assert base_reference("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    assert base_reference("mine") == str(tmp_path / "mine")
    assert base_reference("./mine") == str(tmp_path / "mine")


class _DeviceBound(torch.nn.Module):
    """A model whose weights sit on a device other than the probe batch's (a 4-bit base loads on
    the GPU; here: the meta device): it refuses inputs that are not on its own device."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(2, device="meta"))

    def forward(self, input_ids, position_ids, use_cache):
        assert input_ids.device == self.w.device and position_ids.device == self.w.device
        return SimpleNamespace(logits=torch.ones(*input_ids.shape, 3))


@pytest.mark.quick
def test_export_check_runs_the_probe_on_the_model_device():
    from distft.config.load import load_config
    from distft.engine import export

    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "position_ids": torch.zeros(2, 4, dtype=torch.long),
    }
    cfg = load_config([])[0]
    diff = export._verify(_DeviceBound(), None, batch, torch.ones(24), cfg)
    assert diff == 0.0


@pytest.mark.slow
def test_slow_export_on_rank0_does_not_trip_the_collective_timeout(tmp_path):
    """Rank 0 checks the export for longer than cluster.timeout_s while rank 1 waits: it waits on
    a store key, not in a collective (a barrier would time out after 10 s)."""
    run_dir = tmp_path / "run"
    train(
        run_dir,
        "cluster.timeout_s=10",
        "train.max_steps=2",
        "train.eval_every=0",
        "train.eval_generate=false",
        "eval.test=false",
        extra_env={"DISTFT_FAULT_EXPORT_SLEEP": "16"},
    )
    assert (run_dir / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_progress_is_plain_lines_without_a_terminal(lora_run):
    _, proc = lora_run
    assert "\r" not in proc.stderr  # no carriage-return bar in a log file
    lines = [x for x in proc.stderr.splitlines() if x.startswith("distft: step ")]
    assert lines[0].startswith("distft: step 1/12 (8%) loss=") and lines[-1].startswith("distft: step 12/12")
    assert 3 <= len(lines) <= 12, lines
    for line in lines:
        assert re.fullmatch(
            r"distft: step \d+/12 \(\d+%\) loss=\d+\.\d{4} lr=\S+ tok_s=\d+ elapsed=\S+ eta=\S+", line
        ), line


@pytest.mark.quick
def test_plain_progress_lines_every_tenth_or_interval():
    from distft.engine.progress import PlainProgress, progress_bar

    out = io.StringIO()
    bar = progress_bar(100, 0, out)
    assert isinstance(bar, PlainProgress)
    for i in range(100):
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}", tok_s="100")
        bar.update(1)
    steps = [int(x.split()[2].split("/")[0]) for x in out.getvalue().splitlines()]
    assert steps == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    timed = PlainProgress(100, 50, io.StringIO(), interval_s=0.0)  # resumed at 50; a line per step
    for _ in range(50):
        timed.update(1)
    assert len(timed.stream.getvalue().splitlines()) == 50
    assert "eta=0:00:00" in timed.stream.getvalue().splitlines()[-1]


NOISE = [
    "pip install kernels",  # bitsandbytes, at import on every rank
    "FutureWarning",  # transformers' own deprecations
    "DeprecationWarning",
    "torch.distributed is disabled, unavailable or uninitialized",
    "Loading weights:",  # transformers' per-load bars
    "Setting accelerator to CPU",  # DeepSpeed, imported by transformers, on a machine without GPUs
]
NOISY = """
import warnings
from distft.runtime import quiet
quiet.install()
import bitsandbytes, deepspeed, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=1, num_key_value_heads=1)
LlamaForCausalLM(cfg).is_gradient_checkpointing  # a transformers FutureWarning
import tempfile, torch.distributed.checkpoint as dcp
dcp.save({"x": torch.zeros(1)}, checkpoint_id=tempfile.mkdtemp())  # torch: "... a single process"
warnings.warn("distft: your data has 3 rows")  # about the run: always shown
"""


def test_known_noise_is_filtered_and_the_switch_shows_it():
    def output(**extra):
        proc = subprocess.run(
            [sys.executable, "-c", NOISY], cwd=REPO, env=env(**extra), capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stderr + proc.stdout  # DeepSpeed logs to stdout

    quiet, loud = output(), output(DISTFT_VERBOSE="1")
    assert "distft: your data has 3 rows" in quiet and "distft: your data has 3 rows" in loud
    for noise in ["FutureWarning", "torch.distributed is disabled"]:
        assert noise in loud and noise not in quiet, noise
    if "pip install kernels" in loud:  # printed only on CPUs with AVX512-bf16
        assert "pip install kernels" not in quiet
    if "Setting accelerator to CPU" in loud:  # printed only where DeepSpeed finds no GPU
        assert "Setting accelerator to CPU" not in quiet


@pytest.mark.slow
def test_a_run_prints_none_of_the_known_noise(lora_run):
    _, proc = lora_run
    for noise in NOISE:
        assert noise not in proc.stderr and noise not in proc.stdout, noise


@pytest.mark.slow
def test_adapter_on_the_random_init_default_says_so(lora_run):
    _, proc = lora_run
    (line,) = [x for x in proc.stderr.splitlines() if "random-init" in x]
    assert line.startswith("distft: warning: tuning=lora trains an adapter on the tiny default model")


@pytest.mark.quick
def test_random_base_warning_only_for_adapters_on_the_tiny_default():
    from distft.config.load import load_config
    from distft.models.tiny import random_base_warning

    assert random_base_warning(load_config(["tuning=lora"])[0], adapter=True)
    assert random_base_warning(load_config([])[0], adapter=False) is None  # full tuning: the default job
    hub = load_config(["tuning=lora", "model=hf", "model.name_or_path=org/pretrained"])[0]
    assert random_base_warning(hub, adapter=True) is None
