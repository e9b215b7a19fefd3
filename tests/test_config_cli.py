"""Every console script answers --help / -h and `--cfg job` (issue 13 point 1), and the documented
column-mapping syntax works (issue 13 point 5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distft.config.load import load_config
from tests.util import REPO, env

pytestmark = pytest.mark.quick


def _mains():
    from distft import data_cli, train
    from distft.plan import cli as plan
    from distft.rlaif import main as rlaif
    from launch import main as launch

    return {
        "distft-train": train.main,
        "distft-launch": launch.main,
        "distft-data": data_cli.main,
        "distft-plan": plan.main,
        "distft-rlaif": rlaif.main,
    }


@pytest.mark.parametrize("prog", ["distft-train", "distft-launch", "distft-data", "distft-plan"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_training_scripts_answer_help(prog, flag, capsys):
    # before: `config error: LexerNoViableAltException: --help`, exit 2
    assert _mains()[prog](["tuning=lora", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog} [-h] [--cfg job]")
    assert "Config groups" in out and "tuning     adapter dora full* ia3 lora prefix qlora" in out
    assert "strategy   auto ddp*" in out and "cluster    local* slurm" in out
    assert "train.lr=0.003" in out and "Peak learning rate" in out and "data.path=[]" in out
    assert "docs/reference/config.md" in out


def test_rlaif_help_lists_its_own_groups(capsys):
    assert _mains()["distft-rlaif"](["--help"]) == 0
    out = capsys.readouterr().out
    assert "judge      hf openai python*" in out and "num_samples=4" in out


def test_argparse_scripts_show_the_overrides_too(capsys):
    from distft.report import cli as report
    from distft.verify import cli as verify

    with pytest.raises(SystemExit) as e:
        verify.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--steps STEPS" in out and "Config groups" in out and "docs/reference/config.md" in out
    assert report.main(["--help"]) == 0  # was: usage on stderr, exit 2
    assert "usage: distft-report <run dir>" in capsys.readouterr().out


def test_cfg_job_prints_the_composed_config_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    rc = _mains()["distft-launch"](["--cfg", "job", "tuning=lora", "train.lr=1e-4", f"output_dir={run}"])
    assert rc == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["tuning"]["name"] == "lora" and cfg["train"]["lr"] == 1e-4 and cfg["output_dir"] == str(run)
    assert not run.exists()
    assert _mains()["distft-data"](["--cfg=job", "data.max_length=32"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["max_length"] == 32
    assert _mains()["distft-plan"](["--cfg", "hydra"]) == 2
    assert "--cfg hydra: valid: job, all" in capsys.readouterr().err


def test_unknown_flag_is_one_line_naming_it(capsys):
    assert _mains()["distft-launch"](["--frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "distft-launch: error: cannot read '--frobnicate' as an override (flags: -h/--help, --cfg job): "
        "write key=value or group=option; quote a value with spaces or special characters as key='a b'"
    )


def test_installed_console_script_answers_help():
    script = Path(sys.executable).parent / "distft-launch"
    proc = subprocess.run(
        [str(script), "--help"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: distft-launch") and "Most used keys" in proc.stdout
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ issue 13 point 5: data.columns


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.columns={prompt: question, completion: answer}"],  # the data guide's form
        ["data.columns.prompt=question", "data.columns.completion=answer"],
        ["+data.columns.prompt=question", "+data.columns.completion=answer"],
    ],
)
def test_documented_column_mapping_forms_work(overrides):
    cfg, _ = load_config(overrides)
    assert cfg.data.columns == {"prompt": "question", "completion": "answer"}


def test_column_mapping_must_name_strings():
    from distft.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(["data.columns={prompt: [a, b]}"])
    assert "data.columns" in str(e.value) and "\n" not in str(e.value)


def test_the_command_the_data_error_suggests_works():
    """The mapping the data error message suggests, pasted as an override, maps the columns."""
    import re

    from distft.data.schemas import to_canonical
    from distft.errors import DataError

    rows = [{"question": "abc", "answer": "cba", "_source": "mine.jsonl:1"}]
    with pytest.raises(DataError) as e:
        to_canonical(rows, "auto", {}, None, "sft")
    suggested = re.search(r"data\.columns=\{[^}]*\}", str(e.value)).group(0)
    cfg, _ = load_config([suggested])
    mapped, _, _ = to_canonical(rows, "auto", cfg.data.columns, None, "sft")
    assert mapped[0]["prompt"] == "abc" and mapped[0]["completion"] == "cba"
