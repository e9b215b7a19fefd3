"""cluster=slurm: render slurm/train.sbatch into the run dir from cluster.*, then sbatch it.

The template stays a working script by hand; rendering only replaces the lines it marks
(`# distft:<key>` at the end of a line, or a `# distft:<key>-begin` ... `-end` block).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from distft.errors import ConfigError
from distft.paths import slurm_dir

TEMPLATE = "train.sbatch"


CPU_NODE_CPUS = 2
CPU_NODE_MEM = "8G"


def resources(c) -> dict:
    """Per node: ranks, GPUs, CPUs and memory, with the GPU-node defaults filled in (the ranks
    per node come from torchrun's --nproc-per-node rule, the launcher's own)."""
    from launch.local import nproc_per_node

    gpu = c.gpus_per_node > 0
    cpus = c.cpus_per_task or (c.cpus_per_gpu * c.gpus_per_node if gpu else CPU_NODE_CPUS)
    mem = c.mem
    if mem == "auto":
        mem = "0" if gpu else CPU_NODE_MEM  # --mem=0: all of the node's memory
    ranks = nproc_per_node(c) if (gpu or c.nproc_per_node > 0) else None
    return {"ranks": ranks, "gpus": c.gpus_per_node, "cpus": cpus, "mem": mem}


def sbatch_lines(c, run_dir: Path) -> list[str]:
    r = resources(c)
    opts = [
        f"--job-name={c.job_name}",
        f"--nodes={c.nodes}",
        "--ntasks-per-node=1",  # one launcher (torchrun) per node; it starts the node's ranks
        f"--cpus-per-task={r['cpus']}",
        f"--time={c.time}",
        f"--output={run_dir}/slurm-%j.out",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--signal=B:USR1@{c.signal_before_s}",
    ]
    if c.requeue:
        opts.append("--requeue")
    if c.gpus_per_node > 0:
        opts.append(f"--gpus-per-node={c.gpus_per_node}")
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(c, key)
        if value not in (None, ""):
            opts.append(f"--{key}={value}")
    if r["mem"] not in (None, ""):
        opts.append(f"--mem={r['mem']}")
    opts += [x if x.startswith("-") else f"--{x}" for x in c.sbatch_extra]
    mem = {None: "the cluster's default", "": "the cluster's default", "0": "the whole node"}.get(
        r["mem"], r["mem"]
    )
    summary = (
        f"# distft: {c.nodes} node(s) x {r['ranks'] or 'one per GPU'} rank(s) per node; per node "
        f"{r['gpus']} GPU(s), {r['cpus']} CPUs, memory {mem}"
    )
    return [summary, *(f"#SBATCH {o}" for o in opts)]


def env_lines(c) -> list[str]:
    """Exports for every node: the network interface for NCCL and gloo between nodes."""
    if not c.network_interface:
        return []
    nic = shlex.quote(c.network_interface)
    return [f"export NCCL_SOCKET_IFNAME={nic}", f"export GLOO_SOCKET_IFNAME={nic}"]


def launch_words(c) -> tuple[list[str], list[str]]:
    """(srun options, the node launcher command) with the container options applied."""
    srun = list(c.srun_args)
    launch = [sys.executable, "-m", "launch.local"]
    if c.container_image:
        if c.container_runtime == "pyxis":
            srun.append(f"--container-image={c.container_image}")
            if c.container_mounts:
                srun.append(f"--container-mounts={','.join(c.container_mounts)}")
            srun.append("--container-workdir=" + str(Path.cwd()))
            launch[0] = "python"  # the image's interpreter
        elif c.container_runtime == "apptainer":
            binds = [f"--bind={m}" for m in c.container_mounts]
            gpu = ["--nv"] if c.gpus_per_node > 0 else []
            launch = ["apptainer", "exec", *gpu, *binds, c.container_image, "python", "-m", "launch.local"]
        else:
            raise ConfigError(f"cluster.container_runtime={c.container_runtime!r}; valid: pyxis, apptainer")
    return srun, launch


def _bash_array(words: list[str]) -> str:
    return "(" + " ".join(shlex.quote(w) for w in words) + ")"


def render(cfg, overrides: list[str], template: Path | None = None) -> str:
    c = cfg.cluster
    run_dir = Path(cfg.output_dir)
    text = (template or slurm_dir() / TEMPLATE).read_text()
    srun, launch = launch_words(c)
    blocks = {
        "sbatch": "\n".join(sbatch_lines(c, run_dir)),
        "setup": "\n".join(["# Environment setup (cluster.setup)", *env_lines(c), *c.setup]),
    }
    for key, body in blocks.items():
        pattern = re.compile(rf"^# distft:{key}-begin\n.*?^# distft:{key}-end$", re.M | re.S)
        text, n = pattern.subn(lambda _m, b=body, k=key: f"# distft:{k}-begin\n{b}\n# distft:{k}-end", text)
        assert n == 1, f"template lacks the {key} block"
    lines = {
        "python": f"PYTHON={shlex.quote(sys.executable)}",
        "overrides": f"OVERRIDES={_bash_array(overrides)}",
        "launch": f"LAUNCH={_bash_array(launch)}",
        "srun_args": f"SRUN_ARGS={_bash_array(srun)}",
        "requeue": f"REQUEUE={int(c.requeue)}",
    }
    for key, line in lines.items():
        text, n = re.subn(
            rf"^.*# distft:{key}$", lambda _m, ln=line, k=key: f"{ln}  # distft:{k}", text, flags=re.M
        )
        assert n == 1, f"template lacks the {key} line"
    return text


def run(cfg, overrides: list[str], dry_run: bool) -> int:
    run_dir = Path(cfg.output_dir)
    script = render(cfg, overrides)
    path = run_dir / "train.sbatch"
    cmd = ["sbatch", "--parsable", str(path)]
    if cfg.launch.get("wait"):
        cmd.insert(1, "--wait")
    if dry_run:
        print(script)
        print("distft-launch: would run:", shlex.join(cmd), flush=True)
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    if not cfg.cluster.submit:
        print(f"distft-launch: wrote {path}; submit it with: sbatch {path}", flush=True)
        return 0
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:
        print("distft-launch: error: sbatch not found: is this a SLURM login node?", file=sys.stderr)
        return 2
    assert proc.stdout is not None
    job_id = proc.stdout.readline().strip().split(";")[0]  # --parsable prints the id at submission
    if job_id:
        with open(run_dir / "slurm_jobs.txt", "a") as f:
            f.write(job_id + "\n")
        log = run_dir / f"slurm-{job_id}.out"
        print(
            f"distft-launch: submitted SLURM job {job_id}\n"
            f"  follow : tail -f {log}\n"
            f"  status : squeue -j {job_id}   (sacct -j {job_id} after it ends)\n"
            f"  cancel : scancel {job_id}\n"
            f"  run dir: {run_dir}",
            flush=True,
        )
    rest = proc.stdout.read()
    rc = proc.wait()
    if rest.strip():
        print(rest, end="")
    if rc != 0:
        print(f"distft-launch: sbatch exited with {rc}", file=sys.stderr)
    return rc
