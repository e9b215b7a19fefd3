"""Docs that cannot drift (issue 8).

- docs/reference/config.md and docs/recipes.md equal what `python -m distft.docs_ref` generates;
- every recipe in conf/experiment/ composes and trains 2 steps shrunk to the tiny model on CPU
  (same keys; only model and cluster overridden, plus the test's size knobs);
- every command in a ```bash block of docs/ and README.md is executed here on tiny settings
  (EXECUTED), or is marked `# needs: <gpu|network|slurm|multi-node>` or
  `# tested-by: <test file>` (README's commands, which carry no markers, are listed in
  README_COVERED), and the marking is checked;
- `make docs` (mkdocs --strict) builds; `distft --version` prints the version and the run dir
  records it;
- the run report page renders in headless Chromium with its plots loaded and no console errors
  (screenshot in the test's tmp dir, artifacts/report.png).

The commands, the recipes and the report check share one driver process (module fixture), so the
whole file costs one Python start for the runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.util import REPO, env

DOCS = REPO / "docs"
MARKER = re.compile(r"#\s*(needs|tested-by):\s*(.+?)\s*$")
NEEDS = {"gpu", "network", "slurm", "multi-node"}
# distft-launch starts torchrun: run as its own process (clean environment) on a free port.
LAUNCH = "shell: distft-launch cluster.nproc_per_node=2 cluster.master_port={port} train.max_steps=2"
FAST = "train.progress=false data.num_examples=400 data.max_eval_generations=4 train.max_new_tokens=4"
# Eval loss on 16 val rows: a 2-step run checks that the recipe trains, not how well.
RECIPE_SIZE = (
    "train.progress=false data.max_eval_examples=16 data.max_eval_generations=4 train.max_new_tokens=4"
)
# The recipes' own batch shapes with packing need a few thousand short rows to fill one step
# (data.num_examples=4000). Without packing a few hundred rows fill 2 steps; the DPO recipe precomputes
# the reference's log-probs over its whole train split, so 4000 rows would cost minutes for nothing.
RECIPE_ROWS = {"qwen25_7b_dpo_8gpu": 200}
# Only model and cluster keys change (and max_steps); the tiny model is made tinier still, because
# the recipes' own batch shapes (16 × 2048 tokens per step) stay.
SHRINK = (
    "model=tiny model.name_or_path=null model.max_position_embeddings=4096 model.hidden_size=32 "
    "model.num_heads=2 model.num_kv_heads=2 model.intermediate_size=64 model.num_layers=1 "
    "cluster=local cluster.nodes=1 cluster.nproc_per_node=1 cluster.gpus_per_node=0 train.max_steps=2"
)
# Methods another issue may still be adding: their recipes are skipped (with the reason) while
# the method is not registered.
RECIPE_METHODS = {"qwen25_7b_dpo_8gpu": "dpo", "qwen25_1p5b_grpo_reward_funcs": "grpo"}

# Documented command → what runs here ({tmp}: the test's dir; outputs/ paths are moved under it).
# Several commands may share one variant; each variant runs once, in this order.
EXECUTED: dict[str, str] = {
    "distft --version": "shell: distft --version",
    "make docs": "shell: mkdocs build --strict --site-dir {tmp}/site",
    "make train": f"{LAUNCH} {FAST} output_dir={{tmp}}/launch",
    "distft-launch cluster.nproc_per_node=2 train.max_steps=20 output_dir=outputs/quick2": (
        f"{LAUNCH} {FAST} output_dir={{tmp}}/launch"
    ),
    "python -m distft.train [overrides]": f"distft-train train.max_steps=4 {FAST} output_dir={{tmp}}/quick",
    "python -m distft.train train.max_steps=20 output_dir=outputs/quick": (
        f"distft-train train.max_steps=4 {FAST} output_dir={{tmp}}/quick"
    ),
    "distft-report outputs/quick": "distft-report {tmp}/quick",
    "distft-launch launch.dry_run=true": "distft-launch launch.dry_run=true",
    "distft-launch cluster=slurm launch.dry_run=true": "distft-launch cluster=slurm launch.dry_run=true",
    "distft-launch cluster=slurm cluster.nodes=2 cluster.gpus_per_node=8 launch.dry_run=true": (
        "distft-launch cluster=slurm cluster.nodes=2 cluster.gpus_per_node=8 launch.dry_run=true"
    ),
    "distft-data data.path=docs/examples/sft.jsonl output_dir=outputs/my-data": (
        "distft-data data.path=docs/examples/sft.jsonl output_dir={tmp}/my-data"
    ),
    "python -m distft.train data.path=docs/examples/sft.jsonl train.max_steps=10 "
    "output_dir=outputs/my-data": (
        f"distft-train data.path=docs/examples/sft.jsonl train.max_steps=2 {FAST} output_dir={{tmp}}/my-data"
    ),
    "distft-launch tuning=lora tuning.r=8 strategy=fsdp train.max_steps=20 output_dir=outputs/lora": (
        f"distft-train tuning=lora tuning.r=8 strategy=fsdp train.max_steps=2 {FAST} output_dir={{tmp}}/lora"
    ),
    "distft-plan experiment=llama31_8b_full_zero3_8gpu model.name_or_path=docs/model_configs/llama-3.1-8b": (
        "distft-plan experiment=llama31_8b_full_zero3_8gpu model.name_or_path=docs/model_configs/llama-3.1-8b"
    ),
    "distft-launch strategy=auto train.micro_batch_size=auto train.memory_gib=4 train.max_steps=10 "
    "output_dir=outputs/auto": (
        f"distft-train strategy=auto train.micro_batch_size=auto train.memory_gib=4 train.max_steps=2 {FAST} "
        "output_dir={tmp}/auto"
    ),
    "python -m distft.train method=dpo data.path=docs/examples/preference.jsonl train.max_steps=4 "
    "output_dir=outputs/dpo": (
        f"distft-train method=dpo data.path=docs/examples/preference.jsonl train.max_steps=2 {FAST} "
        "output_dir={tmp}/dpo"
    ),
    "python -m distft.train method=grpo train.max_steps=2 method.sft_warmup_steps=2 "
    "output_dir=outputs/grpo": (
        f"distft-train method=grpo train.max_steps=2 method.sft_warmup_steps=2 {FAST} output_dir={{tmp}}/grpo"
    ),
    "python -m distft.train train.max_steps=4 train.save_every=2 output_dir=outputs/resume": (
        f"distft-train train.max_steps=4 train.save_every=2 {FAST} output_dir={{tmp}}/resume"
    ),
    "python -m distft.train train.max_steps=6 train.save_every=2 output_dir=outputs/resume": (
        f"distft-train train.max_steps=6 train.save_every=2 {FAST} output_dir={{tmp}}/resume"
    ),
    "distft-plan experiment=llama31_70b_lora_fsdp_2x8 model.name_or_path=docs/model_configs/llama-3.1-70b": (
        "distft-plan experiment=llama31_70b_lora_fsdp_2x8 model.name_or_path=docs/model_configs/llama-3.1-70b"
    ),
    "distft-launch experiment=llama31_70b_lora_fsdp_2x8 cluster.partition=gpu cluster.time=12:00:00 "
    "launch.dry_run=true": (
        "distft-launch experiment=llama31_70b_lora_fsdp_2x8 cluster.partition=gpu cluster.time=12:00:00 "
        "launch.dry_run=true output_dir={tmp}/gpu-cluster-dry-run"
    ),
    "distft-verify --help": "distft-verify --help",
    "distft-export --help": "distft-export --help",
    "python -m distft.docs_ref": "distft-docs-ref --check",
}

# README.md belongs to the lead and its commands carry no markers: their coverage is listed here.
README_COVERED: dict[str, str] = {
    "make test": "tested-by: .ci/run",
    "torchrun --nproc_per_node 2 -m distft.train strategy=fsdp": "tested-by: tests/test_equivalence.py",
    "deepspeed --num_gpus 2 --module distft.train strategy=zero3": "tested-by: tests/test_launch.py",
    "distft-launch cluster.nproc_per_node=2 strategy=zero2": "tested-by: tests/test_launch.py",
    "distft-launch strategy=fsdp cluster.max_restarts=2": "tested-by: tests/test_launch.py",
    "distft-launch cluster.nodes=2 cluster.node_rank=0 cluster.master_addr=node0": (
        "tested-by: tests/test_multinode.py"
    ),
    "distft-launch cluster=slurm cluster.nodes=2 cluster.gpus_per_node=8 cluster.network_interface=ib0 "
    "cluster.partition=gpu cluster.time=04:00:00 strategy=hsdp": "needs: slurm, gpu",
    "srun --ntasks-per-node=8 --gpus-per-task=1 python -m distft.train": "needs: slurm, gpu",
    "sbatch slurm/train.sbatch strategy=zero3 train.max_steps=1000": "tested-by: tests/test_slurm.py",
    "distft-launch -m tuning=lora train.lr=1e-4,3e-4 tuning.r=8,16": "tested-by: tests/test_launch.py",
    "distft-launch -m hydra/launcher=submitit_slurm train.lr=1e-4,3e-4": "tested-by: tests/test_slurm.py",
    "torchrun --nproc_per_node 2 -m distft.train strategy=fsdp strategy.cp=2": (
        "tested-by: tests/test_context_parallel.py"
    ),
    "distft-verify strategy=fsdp --only cp": "tested-by: tests/test_verify.py",
    "distft-launch -m hydra/sweeper=optuna hydra.sweeper.n_trials=20 'train.lr=interval(1e-5,1e-3)'": (
        "tested-by: tests/test_launch.py"
    ),
    "python -m distft.train model=hf model.name_or_path=meta-llama/Llama-3.1-8B data.max_length=16384 "
    "train.loss_chunks=16 train.gradient_checkpointing=true train.activation_offload=true strategy=fsdp": (
        "needs: gpu, network"
    ),
}


def doc_commands() -> list[tuple[str, str, str | None]]:
    """(file, command, marker) for every command line in a ```bash block (continuations joined)."""
    out = []
    files = sorted(DOCS.rglob("*.md")) + [REPO / "README.md"]
    for path in files:
        in_bash, pending = False, ""
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_bash = line.strip() == "```bash" and not in_bash
                continue
            if not in_bash:
                continue
            line = pending + line.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1].rstrip() + " "
                continue
            m = MARKER.search(line)
            marker = f"{m.group(1)}: {m.group(2)}" if m else None
            command = re.split(r"\s+#", line, maxsplit=1)[0].strip()
            if command and not command.startswith("#"):
                out.append((str(path.relative_to(REPO)), command, marker))
    return out


def check_marker(marker: str) -> str | None:
    """None when the marker is valid, else the reason."""
    kind, value = marker.split(":", 1)
    value = value.strip()
    if kind == "needs":
        bad = {v.strip() for v in value.split(",")} - NEEDS
        return f"unknown needs {sorted(bad)} (valid: {sorted(NEEDS)})" if bad else None
    if not (REPO / value).exists():
        return f"tested-by names {value}, which does not exist"
    return None


@pytest.mark.quick
def test_every_doc_command_is_executed_or_marked():
    problems = []
    seen = set()
    for path, command, marker in doc_commands():
        seen.add(command)
        if marker is None and path == "README.md":
            marker = README_COVERED.get(command)
        if marker is None:
            if command not in EXECUTED:
                problems.append(f"{path}: `{command}` is neither executed by tests/test_docs.py nor marked")
            continue
        reason = check_marker(marker)
        if reason:
            problems.append(f"{path}: `{command}`: {reason}")
    stale = [c for c in EXECUTED if c not in seen]
    problems += [f"EXECUTED lists `{c}`, which no doc shows any more" for c in stale]
    assert not problems, "\n".join(problems)


@pytest.mark.quick
def test_marker_check_can_fail():
    assert check_marker("needs: gpu, network") is None
    assert check_marker("needs: quantum") is not None
    assert check_marker("tested-by: tests/test_no_such_file.py") is not None


def _registered(method: str) -> bool:
    from distft.methods import METHODS

    return method in METHODS


def recipe_runs() -> list[tuple[str, str | None]]:
    """(recipe name, skip reason or None)."""
    out = []
    for path in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        method = RECIPE_METHODS.get(path.stem)
        reason = None
        if method and not _registered(method):
            reason = f"method={method} is not registered yet (distft/methods/__init__.py)"
        out.append((path.stem, reason))
    return out


DRIVER = r"""
import json, os, sys, time, traceback
from importlib import import_module
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
ENTRIES = {
    "distft-train": "distft.train:main", "distft-launch": "launch.main:main",
    "distft-data": "distft.data_cli:main", "distft-plan": "distft.plan.cli:main",
    "distft-report": "distft.report.cli:main", "distft-verify": "distft.verify.cli:main",
    "distft-export": "distft.tools.export_cli:main", "distft-docs-ref": "distft.docs_ref:main",
}
results = {}
for variant in json.load(open(sys.argv[1])):
    name, *args = variant.split()
    module, func = ENTRIES[name].split(":")
    t = time.time()
    print(f"=== {variant}", flush=True)
    try:
        rc = getattr(import_module(module), func)(args)
    except SystemExit as e:  # argparse --help
        rc = e.code or 0
    except BaseException:
        traceback.print_exc()
        rc = "exception"
    results[variant] = {"rc": rc, "seconds": round(time.time() - t, 1)}
    print(f"=== rc={rc} ({time.time() - t:.1f} s)", flush=True)
json.dump(results, open(sys.argv[1] + ".out", "w"), indent=1)
"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run every EXECUTED variant and every recipe once; returns (tmp, {variant: result})."""
    from tests.util import free_port

    tmp = tmp_path_factory.mktemp("docs")
    variants: list[str] = []
    port = str(free_port())
    for v in EXECUTED.values():
        v = v.replace("{tmp}", str(tmp)).replace("{port}", port)
        if v not in variants:
            variants.append(v)
    for name, reason in recipe_runs():
        if reason is None:
            variants.append(
                f"distft-train experiment={name} {SHRINK} {RECIPE_SIZE} "
                f"data.num_examples={RECIPE_ROWS.get(name, 4000)} output_dir={tmp}/recipe-{name}"
            )
    shell = [v for v in variants if v.startswith("shell: ")]
    python = [v for v in variants if not v.startswith("shell: ") and " experiment=" not in v]
    recipes = [v for v in variants if " experiment=" in v]
    results = {}
    for v in shell:
        cmd = v.removeprefix("shell: ").split()
        cmd[0] = str(Path(sys.executable).parent / cmd[0])
        proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
        results[v] = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-3000:]}
    # The doc commands share one driver process; each recipe gets its own (DeepSpeed keeps
    # process-group state across engines in one process).
    for i, batch in enumerate([python, *[[r] for r in recipes]]):
        plan = tmp / f"variants{i}.json"
        plan.write_text(json.dumps(batch))
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, str(plan), str(free_port())],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=1200,
        )
        with open(tmp / "driver.log", "a") as log:
            log.write(proc.stdout + proc.stderr)
        out = Path(str(plan) + ".out")
        assert out.is_file(), (
            f"driver died ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )  # noqa: E501
        results.update(json.loads(out.read_text()))
    return tmp, results


def _log_tail(tmp: Path, variant: str) -> str:
    log = (tmp / "driver.log").read_text()
    start = log.find(f"=== {variant}")
    return log[start : start + 6000] if start >= 0 else log[-4000:]


@pytest.mark.slow
def test_executed_doc_commands_succeed(executed):
    tmp, results = executed
    failed = {
        v: r for v, r in results.items() if r["rc"] != 0 and not v.startswith("distft-train experiment=")
    }
    assert not failed, "\n\n".join(
        f"{v}: rc={r['rc']}\n{r.get('stderr') or _log_tail(tmp, v)}" for v, r in failed.items()
    )


@pytest.mark.slow
@pytest.mark.parametrize("name,reason", recipe_runs())
def test_recipe_runs_shrunk_to_tiny(executed, name, reason):
    if reason:
        print(f"skipping recipe {name}: {reason}")
        pytest.skip(reason)
    tmp, results = executed
    variant = next(v for v in results if f"experiment={name} " in v)
    assert results[variant]["rc"] == 0, _log_tail(tmp, variant)
    run = tmp / f"recipe-{name}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = {r["step"] for r in rows if "loss" in r}
    assert max(steps) == 2
    # The recipe's own keys reached the run (only model and cluster were overridden).
    from omegaconf import OmegaConf

    recipe = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "experiment" / f"{name}.yaml"))
    ran = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    for block in ("tuning", "method", "strategy", "data", "train"):
        for key, value in (recipe.get(block) or {}).items():
            if (block, key) != ("train", "max_steps"):
                assert ran[block][key] == value, f"{block}.{key}"


@pytest.mark.slow
def test_version_printed_and_recorded(executed):
    from distft import __version__

    tmp, results = executed
    r = results["shell: distft --version"]
    assert r["rc"] == 0 and r["stdout"].strip() == f"distft {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    assert f"## [{__version__}]" in (REPO / "CHANGELOG.md").read_text()
    info = json.loads((tmp / "quick" / "run_info.json").read_text())
    assert info["starts"][-1]["distft"] == __version__


@pytest.mark.slow
def test_mkdocs_strict_build(executed):
    tmp, results = executed
    r = results[f"shell: mkdocs build --strict --site-dir {tmp}/site"]
    assert r["rc"] == 0, r["stderr"]
    assert (tmp / "site" / "reference" / "config" / "index.html").is_file()
    assert (tmp / "site" / "recipes" / "index.html").is_file()


@pytest.mark.slow
def test_generated_pages_up_to_date(executed):
    _, results = executed
    assert results["distft-docs-ref --check"]["rc"] == 0, (
        "docs/reference/config.md or docs/recipes.md is stale: run `python -m distft.docs_ref`"
    )


@pytest.mark.quick
def test_reference_lists_every_key():
    """Every field of every schema dataclass and registry option appears in the committed page."""
    import dataclasses

    from distft.config import schema
    from distft.methods import METHODS
    from distft.strategies import STRATEGIES
    from distft.tuning import TUNINGS

    page = (DOCS / "reference" / "config.md").read_text()
    blocks = {"model": schema.ModelConfig, "data": schema.DataConfig, "train": schema.TrainConfig}
    blocks |= {"eval": schema.EvalConfig, "logger": schema.LoggerConfig, "cluster": schema.SlurmClusterConfig}
    missing = [f"{b}.{f.name}" for b, c in blocks.items() for f in dataclasses.fields(c)]
    for group, reg in (("tuning", TUNINGS), ("method", METHODS), ("strategy", STRATEGIES)):
        for entry in reg.values():
            missing += [f"{group}.{f.name}" for f in dataclasses.fields(entry.config)]
    missing = [k for k in missing if f"| `{k}` |" not in page]
    assert not missing, f"keys missing from docs/reference/config.md: {missing}"


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


PROBE = (
    "<script>window.addEventListener('load', () => { for (const i of document.images) "
    "i.setAttribute('data-loaded', String(i.complete && i.naturalWidth > 0)); "
    "console.log('distft-probe images=' + document.images.length); });</script></body>"
)


def chromium_check(chromium: str, page: Path, profile: Path) -> tuple[list[str], list[str], str]:
    """Open `page` (a copy with a load probe) in headless Chromium: (each <img>'s load state,
    console errors, stderr). A fresh profile per run; the page comes from disk, no network."""
    probe = page.parent / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", PROBE))
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    home = dict(os.environ, HOME=str(profile.parent))
    proc = subprocess.run(
        [*cmd, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180, env=home
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert any("distft-probe images=" in line for line in console), proc.stderr[-3000:]
    errors = [line for line in console if re.search(r"error|uncaught", line, re.I)]
    return re.findall(r'data-loaded="(true|false)"', proc.stdout), errors, proc.stderr


@pytest.mark.slow
def test_report_page_in_headless_chromium(executed, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    tmp, _ = executed
    page = tmp / "quick" / "report" / "index.html"
    assert page.is_file()
    plots = re.findall(r"<img[^>]+src=['\"]([^'\"]+)['\"]", page.read_text())
    assert len(plots) >= 2, f"the report has too few plots: {plots}"
    loaded, errors, stderr = chromium_check(chromium, page, tmp_path / "profile1")
    assert len(loaded) == len(plots) and all(x == "true" for x in loaded), (plots, loaded)
    assert not errors, "\n".join(errors)
    # The same check on a broken copy (a missing plot and a script error) must flag both.
    broken = page.parent / "broken.html"
    broken.write_text(
        page.read_text()
        .replace(plots[0], "missing.png", 1)
        .replace("</body>", "<script>nope()</script></body>")
    )
    loaded, errors, _ = chromium_check(chromium, broken, tmp_path / "profile2")
    assert "false" in loaded and errors
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shot = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile3'}", "--window-size=1280,2000"]
    shot += [f"--screenshot={artifacts / 'report.png'}", page.as_uri()]
    proc = subprocess.run(
        shot, capture_output=True, text=True, timeout=180, env=dict(os.environ, HOME=str(tmp_path))
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (artifacts / "report.png").stat().st_size > 10_000
    print(f"screenshot: {artifacts / 'report.png'}")
