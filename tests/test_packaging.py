"""Installed as a package (not from a checkout), distft still finds conf/ and the slurm/ templates."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from tests.util import REPO, env

pytestmark = pytest.mark.quick


def test_wheel_ships_configs_and_templates_and_finds_them(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        cwd=REPO,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    # The project's own packaging builds without a warning (a license table, a data directory
    # missing from [tool.setuptools] packages: hundreds of lines on every install).
    output = build.stdout + build.stderr
    warnings = [line for line in output.splitlines() if "warning" in line.lower() or "absent from" in line]
    assert not warnings, "\n".join(warnings[:20])
    (wheel,) = tmp_path.glob("distft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in (
        "distft_conf/train.yaml",
        "distft_conf/model/tiny.yaml",
        "distft_conf/strategy/zero3.yaml",
        "distft_conf/model/tiny_pretrained.yaml",
        "distft/models/tiny_pretrained.safetensors",  # model=tiny_pretrained's shipped weights
    ):
        assert required in names, required
    assert any(n.startswith("distft_slurm/") and n.endswith(".sbatch") for n in names)
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    # From outside the checkout, with only the installed copy importable:
    code = "import distft.paths as p, json; print(json.dumps([str(p.conf_dir()), str(p.slurm_dir())]))"
    e = env(PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True, text=True, check=True
    ).stdout
    conf, slurm = eval(out)
    assert conf.startswith(str(target)) and (target / "distft_conf" / "train.yaml").is_file()
    assert slurm.startswith(str(target))
    # And it composes a config from there.
    code = "from distft.config.load import load_config; print(load_config(['tuning=lora'])[0].tuning.r)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "8"
