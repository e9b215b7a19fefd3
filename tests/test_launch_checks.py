"""distft-launch finds path errors before torchrun starts, and a rank's `distft: error:` line is
the last thing the user sees when a rank fails after all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch.main import main as launch_main
from tests.util import FAST, REPO, env, free_port


@pytest.mark.quick
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("data.path=[{d}/nope/train.jsonl]", ["data.path", "nope/train.jsonl", "no such file"]),
        ("data.path=[{d}/empty]", ["data.path", "directory has no"]),
        ("model.name_or_path={d}/models/missing", ["model.name_or_path", "directory", "hub id"]),
        ("model.name_or_path={d}/empty", ["model.name_or_path", "no config.json"]),
    ],
)
def test_path_errors_stop_the_launcher_before_any_rank_starts(tmp_path, capsys, override, words):
    (tmp_path / "empty").mkdir()
    run_dir = tmp_path / "run"
    model = ["model=hf"] if override.startswith("model.") else []
    rc = launch_main([*model, override.format(d=tmp_path), f"output_dir={run_dir}", *FAST])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("distft-launch: error: ") and all(w in line for w in words), err
    assert not (run_dir / "preflight.json").exists() and "torchrun" not in err


@pytest.mark.slow
def test_a_ranks_error_line_is_the_last_thing_the_user_sees(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "a", "completion": "b"},\n')  # truncated JSON: found by the ranks
    proc = subprocess.run(
        [sys.executable, "-m", "launch.main", *FAST, f"data.path=[{bad}]", f"output_dir={tmp_path / 'run'}",
         f"cluster.master_port={free_port()}"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distft: error: ") and "bad.json" in last, proc.stderr[-3000:]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-5000:]
