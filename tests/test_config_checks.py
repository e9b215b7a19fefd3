"""Values refused before anything starts (issue 12 points 5, 8, 10; issue 19 point 6): numbers out
of their declared range, strings that would break out of a SLURM script, run dirs that cannot be
written, YAML syntax errors, flash-attention packing with several rows per batch."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

from distft.config import schema
from distft.config.load import load_config
from distft.errors import ConfigError
from distft.paths import conf_dir
from distft.ranges import range_of
from launch.main import main as launch_main

pytestmark = pytest.mark.quick


def _refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    msg = str(e.value)
    assert "\n" not in msg, msg  # one line
    return msg


@pytest.mark.parametrize(
    "override,expected",
    [
        # issue 12 point 5: each ran (gradient ascent, a step_-5 checkpoint, a torch traceback)
        ("train.max_grad_norm=-1", "train.max_grad_norm must be > 0, or 0 to turn clipping off (got -1.0)"),
        ("train.max_steps=-5", "train.max_steps must be >= 1, or 0 to train by train.epochs (got -5)"),
        ("train.lr=-1e-4", "train.lr must be > 0 (got -0.0001)"),
        ("train.lr=0", "train.lr must be > 0 (got 0.0)"),
        ("train.warmup_ratio=1", "train.warmup_ratio must be in [0, 1) (got 1.0)"),
        ("train.grad_accum=0", "train.grad_accum must be >= 1 (got 0)"),
        ("train.micro_batch_size=-2", "train.micro_batch_size must be >= 1 or auto (got -2)"),
        ("train.adam_betas=[0.9,1.5]", "train.adam_betas must be in [0, 1) (got [0.9, 1.5])"),
        ("train.keep_last=0", "train.keep_last must be >= 1"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("cluster.master_port=70000", "cluster.master_port must be in [1, 65535] (got 70000)"),
        ("cluster.nodes=0", "cluster.nodes must be >= 1 (got 0)"),
        ("cluster.timeout_s=-1", "cluster.timeout_s must be >= 1"),
        ("data.max_length=0", "data.max_length must be >= 2"),
        ("data.replay_fraction=1.5", "data.replay_fraction must be in [0, 1)"),
        ("model.num_layers=0", "model.num_layers must be >= 1"),
        ("eval.patience=-1", "eval.patience must be >= 0"),
        # point 10: "both are 0" was wrong for epochs=-1
        ("train.epochs=-1", "train.epochs must be > 0, or 0 to train by train.max_steps (got -1.0)"),
    ],
)
def test_number_out_of_range_is_one_line_naming_the_key(override, expected):
    assert expected in _refused([override])


def test_zero_switches_off_where_declared():
    cfg, _ = load_config(["train.max_grad_norm=0", "train.max_steps=3", "train.epochs=0"])
    assert cfg.train.max_grad_norm == 0 and cfg.train.max_steps == 3
    cfg, _ = load_config(["train.micro_batch_size=auto"])
    assert cfg.train.micro_batch_size == "auto"


def test_option_ranges_are_checked_too():
    # fields of the tuning/method/strategy options carry their ranges like the plain blocks
    assert "strategy.bucket_cap_mb must be >= 1" in _refused(["strategy.bucket_cap_mb=0"])


def test_every_numeric_key_of_the_plain_blocks_declares_a_range():
    blocks = [schema.ModelConfig, schema.DataConfig, schema.TrainConfig, schema.SlurmClusterConfig]
    blocks += [schema.EvalConfig]
    missing = []
    for cls in blocks:
        for f in dataclasses.fields(cls):
            hint = str(f.type)
            numeric = ("int" in hint or "float" in hint) and "dict" not in hint
            if numeric and range_of(f) is None:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"numeric keys without a declared range: {missing}"


def test_node_rank_must_name_one_of_the_nodes():
    assert "node ranks are 0..1" in _refused(["cluster.nodes=2", "cluster.node_rank=2"])


# ------------------------------------------------------------------ point 10: one line, not a traceback


def test_model_hf_without_a_path_says_which_key():
    msg = _refused(["model=hf"])
    assert msg.startswith("model=hf needs model.name_or_path=")


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    assert "is a file; give a directory path" in _refused([f"output_dir={f}"])
    assert f"is under {f}, which is a file" in _refused([f"output_dir={f}/run"])


def test_output_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores mode bits: a read-only filesystem still refuses
            ro_fs = "/proc/sys" if os.statvfs("/proc/sys").f_flag & os.ST_RDONLY else None
            if ro_fs is None:
                pytest.skip("running as root without a read-only filesystem to try")
            ro = ro_fs
        assert "is not writable" in _refused([f"output_dir={ro}/run"])
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_experiment_yaml_syntax_error_names_file_and_line(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    bad = conf / "experiment" / "broken.yaml"
    bad.write_text("# @package _global_\ntrain:\n  lr: [1e-3\n  max_steps: 3\n")
    monkeypatch.setattr("distft.config.load.conf_dir", lambda: conf)
    msg = _refused(["experiment=broken"])
    assert msg.startswith(f"{bad}, line 4, column 12: YAML syntax error: expected ',' or ']'"), msg


# ------------------------------------------------------------------ issue 12 point 8: SLURM injection

INJECTED = "x\n#SBATCH --wrap=touch /tmp/distft-pwned"


@pytest.mark.parametrize(
    "override,key",
    [
        (f"cluster.job_name='{INJECTED}'", "cluster.job_name="),
        ("output_dir='/tmp/run\n#SBATCH --wrap=x'", "output_dir="),
        ("cluster.partition='gpu\r'", "cluster.partition="),
        (f"cluster.setup=['module load x', '{INJECTED}']", "cluster.setup[1]="),
        ("cluster.account='a\\x00b'", None),  # Hydra keeps the escape literally: format check refuses it
    ],
)
def test_slurm_dry_run_refuses_line_breaks_in_one_line(override, key, capsys, tmp_path):
    args = ["cluster=slurm", override, "launch.dry_run=true"]
    if not override.startswith("output_dir"):
        args.append(f"output_dir={tmp_path / 'r'}")
    assert launch_main(args) == 2
    out, err = capsys.readouterr()
    assert "#SBATCH" not in out  # nothing rendered
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distft-launch: error: "), err
    if key:
        assert key in lines[0] and "newline, carriage return or NUL" in lines[0]
    else:
        assert "cluster.account=" in lines[0] and "is not a SLURM account" in lines[0]


@pytest.mark.parametrize(
    "override,expected",
    [
        ("cluster.time=1h", "cluster.time='1h' is not a SLURM time: give minutes, MM:SS, HH:MM:SS"),
        ("cluster.time='01:00:00 --wrap=x'", "is not a SLURM time"),
        ("cluster.partition='gpu --wrap=x'", "cluster.partition='gpu --wrap=x' is not a SLURM partition"),
        ("cluster.account='acct;rm'", "is not a SLURM account"),
        ("cluster.job_name='my job'", "is not a SLURM job_name"),
        ("cluster.mem=lots", "is not a SLURM mem"),
        (
            "cluster.sbatch_extra=['--exclusive --wrap=x']",
            "cluster.sbatch_extra[0]='--exclusive --wrap=x': each",
        ),
        ("cluster.sbatch_extra=['-N 2']", "must be one sbatch option, --option or --option=value"),
    ],
)
def test_slurm_fields_in_slurm_formats(override, expected):
    assert expected in _refused(["cluster=slurm", override])


@pytest.mark.parametrize(
    "override",
    [
        "cluster.time=30",
        "cluster.time=2-00:00:00",
        "cluster.time=1-12",
        "cluster.time=UNLIMITED",
        "cluster.partition='gpu,gpu-long'",
        "cluster.account=proj_123",
        "cluster.job_name=sft-llama.v2",
        "cluster.mem=0",
        "cluster.sbatch_extra=[--exclusive,'--mail-type=END','mail-user=a@b.c']",
    ],
)
def test_valid_slurm_values_render(override, tmp_path, capsys):
    assert launch_main(["cluster=slurm", override, "launch.dry_run=true", f"output_dir={tmp_path}"]) == 0
    assert "#SBATCH --job-name=" in capsys.readouterr().out


# ------------------------------------------------------------------ issue 19 point 6: packing + flash-attn


def test_packing_with_flash_attention_needs_one_row_per_micro_batch():
    base = ["data.packing=true", "model.attn_implementation=flash_attention_2"]
    msg = _refused(base)
    assert "data.packing=true with model.attn_implementation=flash_attention_2 needs " in msg
    assert "train.micro_batch_size=1 (got 16)" in msg and "attend across their boundaries" in msg
    assert "train.micro_batch_size=1 (got 'auto')" in _refused([*base, "train.micro_batch_size=auto"])
    # one packed row per micro-batch passes this rule (the GPU-only check may still refuse on CPU)
    try:
        load_config([*base, "train.micro_batch_size=1"])
    except ConfigError as e:
        assert "attend across" not in str(e)
    load_config(["data.packing=true", "train.micro_batch_size=4"])  # sdpa: the mask keeps examples apart


def test_rank_entry_refuses_before_anything_starts(tmp_path):
    """A real process: one line on stderr, exit 2, no run dir (issue 12: max_grad_norm=-1 trained)."""
    from tests.util import train

    run = tmp_path / "run"
    proc = train(run, "train.max_grad_norm=-1", plain=True, check=False, timeout=120)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("distft: error:")]
    assert errors == [
        "distft: error: train.max_grad_norm must be > 0, or 0 to turn clipping off (got -1.0)"
    ], proc.stderr
    assert "Traceback" not in proc.stderr and not run.exists()


def test_unquoted_newline_as_typed_in_bash_is_one_line(capsys, tmp_path):
    # distft-launch cluster=slurm cluster.job_name=$'x\n#SBATCH --wrap=...' launch.dry_run=true
    args = ["cluster=slurm", f"cluster.job_name={INJECTED}", "launch.dry_run=true", f"output_dir={tmp_path}"]
    assert launch_main(args) == 2
    out, err = capsys.readouterr()
    assert "#SBATCH" not in out
    assert err.count("\n") == 1 and err.startswith(
        "distft-launch: error: cannot read 'cluster.job_name=x\\n#SBATCH"
    )
