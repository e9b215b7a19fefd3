"""distft-verify end to end: the real command on FSDP2 (+LoRA: adapter export) and ZeRO-2/3, its
table and verify.json; and that its comparisons do fail on runs that differ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distft.verify import checks
from tests.util import REPO, env


def _verify(work: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distft.verify.cli", "--work-dir", str(work), *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=3600)


def _table(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        for name in (
            "grad accum",
            "1 vs 2 ranks",
            "resume",
            "packing = no packing",
            "context parallel",
            "EOS trained",
            "export loadable",
        ):
            if line.startswith(name + " "):
                rows[name] = line[len(name) :].split()[0]
    return rows


@pytest.mark.slow
def test_verify_fsdp_lora_all_checks(tmp_path):
    proc = _verify(tmp_path, "strategy=fsdp", "tuning=lora")
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert _table(out) == {
        "grad accum": "PASS",
        "1 vs 2 ranks": "PASS",
        "resume": "PASS",
        "packing = no packing": "PASS",
        "context parallel": "PASS",
        "EOS trained": "PASS",
        "export loadable": "PASS",
    }, out
    results = {r["name"]: r for r in json.loads((tmp_path / "verify.json").read_text())}
    assert "adapter:" in results["export loadable"]["detail"]
    for name in ("grad accum", "1 vs 2 ranks", "resume", "context parallel"):
        assert float(results[name]["measured"].split()[0]) <= 1e-4
    # The shrunk runs kept the user's choices.
    cfg = (tmp_path / "reference" / "config.yaml").read_text()
    assert "name: fsdp" in cfg and "name: lora" in cfg and "num_layers: 2" in cfg


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_verify_deepspeed_equivalences(tmp_path, strategy):
    """ZeRO-2: grad accum, 1 vs 2 ranks, resume (tests/test_equivalence.py covers FSDP2 the same
    way, plus parameters); ZeRO-3: grad accum."""
    only = "grad_accum,world_size,resume" if strategy == "zero2" else "grad_accum"
    proc = _verify(tmp_path, "--only", only, f"strategy={strategy}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = _table(proc.stdout)
    assert table and set(table.values()) == {"PASS"} and len(table) == len(only.split(","))
    results = json.loads((tmp_path / "verify.json").read_text())
    for r in results:
        assert float(r["measured"].split()[0]) <= 1e-4, r
    rows = [json.loads(x) for x in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]  # the reference really trained


@pytest.mark.quick
def test_comparison_fails_on_different_losses(tmp_path):
    for name, losses in {"a": [2.0, 1.9, 1.8], "b": [2.0, 1.9, 1.85]}.items():
        (tmp_path / name).mkdir()
        rows = [json.dumps({"step": i + 1, "loss": v}) for i, v in enumerate(losses)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(rows))
    same = checks.compare_losses("x", tmp_path / "a", tmp_path / "a", range(1, 4), 1e-4, "")
    differ = checks.compare_losses("x", tmp_path / "b", tmp_path / "a", range(1, 4), 1e-4, "")
    assert same.passed and not differ.passed and differ.measured.startswith("2.78e-02")
    missing = checks.compare_losses("x", tmp_path / "nothing", tmp_path / "a", range(1, 4), 1e-4, "")
    assert missing.passed is False
