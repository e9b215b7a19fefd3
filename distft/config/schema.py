"""Typed configuration: one dataclass per config group, attribute docstrings are the reference.

Group options with their own keys (tuning, method, strategy) register their own dataclass in
their registry; `name` picks it. Unknown keys are rejected by `distft.config.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Config-group option that produced this block (for tags and reports)."""
    name_or_path: str | None = None
    """Hub id or local Hugging Face directory. None builds the tiny random-init model below."""
    hidden_size: int = 128
    """Tiny model: width."""
    num_layers: int = 3
    """Tiny model: decoder layers."""
    num_heads: int = 4
    """Tiny model: attention heads."""
    num_kv_heads: int = 4
    """Tiny model: key/value heads (grouped-query attention when smaller than num_heads)."""
    intermediate_size: int = 384
    """Tiny model: MLP width."""
    max_position_embeddings: int = 256
    """Tiny model: longest sequence."""
    init_seed: int = 1234
    """Tiny model: seed of the random init (the same on every rank and every run)."""
    pretrained: bool = False
    """Tiny model: start from the shipped base pre-trained on general string tasks
    (distft/models/tiny_pretrained.safetensors, model=tiny_pretrained) instead of a random init;
    the shape keys must keep the shipped shape. Ignored when name_or_path is set."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository. Off unless you trust the repository."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: sdpa, eager or flash_attention_2 (GPU, when installed)."""


@dataclass
class DataConfig:
    name: str = "default"
    """Config-group option that produced this block."""
    path: list[str] = field(default_factory=list)
    """JSONL/JSON/CSV/TSV/Parquet files, directories of them, saved `datasets` directories or hub
    dataset ids. Empty: the method's embedded data."""
    weights: list[float] = field(default_factory=list)
    """Share of each data.path source in the train split (same length as path; sources are
    down-sampled or repeated to reach it, val/test keep their natural mix). Empty: every row once."""
    replay_path: list[str] = field(default_factory=list)
    """Continual learning: old data (same forms as path) replayed in the train split only."""
    replay_fraction: float = 0.0
    """Share of the train split made of rows sampled from replay_path, e.g. 0.2 (distft/continual.py)."""
    format: str = "auto"
    """auto (detect per row), prompt_completion, alpaca, messages, sharegpt, preference,
    classification or prompt."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename columns before schema detection: {canonical: column}, e.g. {prompt: question}."""
    bad_lines: str = "skip"
    """Malformed JSONL lines: skip (listed with file:line in the data report) or error."""
    splits: list[float] = field(default_factory=lambda: [8.0, 1.0, 1.0])
    """train/val/test ratios (normalized); deterministic by train.seed."""
    max_length: int = 64
    """Tokens per example; longer examples are truncated (or dropped, see overlong) and counted."""
    overlong: str = "truncate"
    """Rows longer than max_length: truncate (counted as truncated) or drop (counted as too_long)."""
    normalize_unicode: bool = True
    """Unicode NFKC normalization of all text fields."""
    normalize_whitespace: bool = True
    """Trim, collapse runs of spaces inside lines, drop trailing spaces and extra blank lines (the
    prompt's end and the completion's start are kept), so whitespace variants are duplicates."""
    min_chars: int = 0
    """Drop rows with fewer characters (prompt + answer); 0 keeps all non-empty rows."""
    max_chars: int = 0
    """Drop rows with more characters (prompt + answer); 0: no limit."""
    drop_patterns: list[str] = field(default_factory=list)
    """Regular expressions; rows whose prompt or answer matches one are dropped (reported)."""
    dedup: bool = True
    """Remove exact duplicates (same canonical content after normalization); the first is kept."""
    near_dedup: bool = True
    """Remove near duplicates (MinHash LSH); only rows whose answers and numbers also match."""
    near_dedup_threshold: float = 0.85
    """Estimated Jaccard similarity of the prompts' character 5-grams at or above which rows with
    matching answers count as near duplicates."""
    pii_mask: bool = False
    """Mask personal data as [EMAIL] [PHONE] [IP] [CARD]; counts go to the data report."""
    pii_kinds: list[str] = field(default_factory=lambda: ["email", "phone", "ip", "card"])
    """Which personal data to mask."""
    pii_phone_region: str = "US"
    """Region for phone numbers written without a country code (libphonenumber)."""
    stratify: bool = True
    """Stratify the split by label for classification data."""
    imbalance_warn_ratio: float = 3.0
    """Warn when the most common label has more than this many times the rows of the rarest."""
    packing: bool = False
    """Pack several examples into one sequence of max_length; attention never crosses examples."""
    num_examples: int = 6000
    """Embedded default data: how many examples to generate."""
    max_eval_generations: int = 200
    """Held-out examples used for exact-match generation eval (0 turns it off)."""


@dataclass
class TrainConfig:
    max_steps: int = 0
    """Optimizer steps. 0: use epochs."""
    epochs: float = 6.0
    """Passes over the train split, used when max_steps is 0."""
    micro_batch_size: int | str = 16
    """Sequences per rank per forward pass, or auto: the largest that fits train.memory_gib by the
    planner's estimate, confirmed by a trial step (see distft-plan)."""
    memory_gib: float | None = None
    """Memory one rank may use, for the auto choices (strategy=auto, micro_batch_size=auto).
    None: the GPU's memory, or host RAM divided by the ranks per node."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the global batch is micro × accum × world size."""
    lr: float = 3e-3
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name: constant, constant_with_warmup, linear or cosine."""
    warmup_steps: int = 0
    """Linear warmup steps (overrides warmup_ratio when > 0)."""
    warmup_ratio: float = 0.05
    """Warmup as a fraction of the total steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    seed: int = 42
    """Seeds data order, dropout and sampling."""
    precision: str = "fp32"
    """fp32, bf16 (mixed, fp32 master weights) or fp16 (mixed with loss scaling)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    compile: bool = False
    """torch.compile each decoder block (the whole model if it has none) before sharding: faster
    steps after a one-off compile at the start (CPU: inductor's C++ backend; GPU: Triton)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are pruned."""
    eval_every: int = 0
    """Validation loss every N steps (0: only at the end)."""
    log_every: int = 1
    """Metrics row every N steps."""
    export: str = "last"
    """What export/ (Hugging Face format) holds at the end: last (final weights), best (the
    checkpoint with the best eval.monitor value; needs train.eval_every) or none."""
    eval_generate: bool = True
    """Exact-match generation eval on the held-out split before and after training."""
    max_new_tokens: int = 16
    """Generation length for generation eval."""
    progress: bool = True
    """Progress bar on rank 0."""
    max_bad_steps: int = 5
    """A step with a NaN/Inf loss or gradient norm is skipped (counted as skipped_steps); after
    this many in a row training stops naming the step, its sample ids and the last good
    checkpoint (0: never stop)."""
    async_save: bool = False
    """DDP/FSDP: write checkpoints in the background (DCP async save on its own gloo group) while
    training continues; checkpoints/latest moves once the write completed. DeepSpeed saves
    synchronously."""


@dataclass
class ClusterConfig:
    name: str = "local"
    """local (this machine) or slurm."""
    nodes: int = 1
    """Nodes in the job."""
    nproc_per_node: int = 2
    """Ranks per node (defaults to the GPU count on GPU nodes)."""
    gpus_per_node: int = 0
    """GPUs per node (0 on CPU nodes: ranks use gloo)."""
    max_restarts: int = 0
    """Elastic restarts of the whole group after a failed rank."""
    master_port: int = 29500
    """Rendezvous port on the first node."""
    master_addr: str = "127.0.0.1"
    """Rendezvous host (the first node) for cluster=local multi-node; SLURM uses its first node."""
    node_rank: int = 0
    """This launcher's node (cluster=local multi-node: one distft-launch per node)."""
    rdzv_timeout_s: int = 300
    """Seconds a node waits for the rendezvous (all nodes joined) before failing with host:port."""
    timeout_s: int = 600
    """Collective timeout of the process group (a hung collective fails after this)."""
    hang_dump_s: int = 300
    """Dump every rank's Python stacks to <run dir>/stacks/ when no step finishes this long (0: off)."""
    stop_grace_s: int = 120
    """After a stop signal (SIGUSR1, e.g. SLURM's pre-timeout warning), seconds ranks get to checkpoint."""
    preflight: bool = True
    """Rank 0 reports world size, backends, devices and all-reduce bandwidth/latency before training."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Cluster-specific keys not covered by the cluster option's own fields."""


@dataclass
class SlurmClusterConfig(ClusterConfig):
    """cluster=slurm: the batch job's resources; rendered into the run dir's train.sbatch."""

    partition: str | None = None
    """--partition (None: the cluster's default)."""
    account: str | None = None
    """--account."""
    qos: str | None = None
    """--qos."""
    time: str = "01:00:00"
    """--time limit (the stop signal comes signal_before_s earlier)."""
    constraint: str | None = None
    """--constraint (node features)."""
    cpus_per_task: int = 2
    """CPUs for each node's launcher task, i.e. for all ranks of a node."""
    mem: str | None = "8G"
    """--mem per node (None: the cluster's default)."""
    job_name: str = "distft"
    """--job-name."""
    signal_before_s: int = 120
    """--signal=B:USR1@N: ranks checkpoint and the job requeues itself N s before the time limit."""
    requeue: bool = True
    """--requeue, and requeue on the warning signal (the job resumes with resume=auto)."""
    sbatch_extra: list[str] = field(default_factory=list)
    """Extra #SBATCH options, e.g. ['--mail-type=END', '--exclusive']."""
    srun_args: list[str] = field(default_factory=list)
    """Extra srun options."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before srun (module load ..., source venv/bin/activate, exports)."""
    container_image: str | None = None
    """Run ranks in a container: pyxis image (--container-image) or an apptainer .sif."""
    container_runtime: str = "pyxis"
    """pyxis (srun --container-image) or apptainer (apptainer exec)."""
    container_mounts: list[str] = field(default_factory=list)
    """src:dst mounts for the container (the repo and run dir must be visible inside)."""
    submit: bool = True
    """Submit with sbatch (false: only render the script into the run dir)."""


# cluster= option → its dataclass (unknown options use the plain one).
CLUSTERS: dict[str, type] = {"local": ClusterConfig, "slurm": SlurmClusterConfig}


@dataclass
class LoggerConfig:
    name: str = "none"
    """none, wandb or tensorboard (metrics.jsonl is always written)."""
    project: str = "distft"
    """W&B project."""
    group: str | None = None
    """W&B group (sweeps set it)."""
    run_name: str | None = None
    """W&B run name."""
    tags: list[str] = field(default_factory=list)
    """Extra W&B tags (model/tuning/method/strategy are added)."""


@dataclass
class EvalConfig:
    name: str = "default"
    """Config-group option that produced this block."""
    metrics: list[str] = field(default_factory=list)
    """Metrics on the val split at every eval and on the test split at the end. Generation
    (sft): exact_match, rouge1, rouge2, rougeL, bleu, chrf; classification: accuracy, precision,
    recall, f1. Empty: the method's default (exact_match for sft)."""
    test: bool = True
    """Final evaluation on the test split, written to eval.json and logged as test/*."""
    monitor: str = "eval/loss"
    """Metric for early stopping and the best checkpoint (eval/loss, eval/ppl or eval/<metric>)."""
    mode: str = "auto"
    """min, max, or auto (min for loss/ppl, max otherwise)."""
    patience: int = 0
    """Stop after this many evaluations without improvement (0: no early stopping)."""
    min_delta: float = 0.0
    """Smallest change of the monitored metric that counts as an improvement."""


@dataclass
class RootConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    cluster: ClusterConfig
    logger: LoggerConfig
    tuning: Any
    """The tuning option's own dataclass (see distft.tuning)."""
    method: Any
    """The method option's own dataclass (see distft.methods)."""
    strategy: Any
    """The strategy option's own dataclass (see distft.strategies)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation metrics, test eval and early stopping."""
    output_dir: str | None = None
    """Run directory. None: outputs/<date>/<time>."""
    resume: str = "auto"
    """auto (continue from output_dir's latest checkpoint if any), never, or a checkpoint path."""
    launch: dict[str, Any] = field(default_factory=dict)
    """Launcher-only keys (dry_run, ...); ignored by the ranks."""
