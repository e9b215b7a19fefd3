"""Typed configuration: one dataclass per config group, attribute docstrings are the reference.

Group options with their own keys (tuning, method, strategy) register their own dataclass in
their registry; `name` picks it. Unknown keys are rejected by `distft.config.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from distft.ranges import num


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Config-group option that produced this block (for tags and reports)."""
    name_or_path: str | None = None
    """Hub id or local Hugging Face directory. None builds the tiny random-init model below."""
    hidden_size: int = num(128, ge=1)
    """Tiny model: width."""
    num_layers: int = num(3, ge=1)
    """Tiny model: decoder layers."""
    num_heads: int = num(4, ge=1)
    """Tiny model: attention heads."""
    num_kv_heads: int = num(4, ge=1)
    """Tiny model: key/value heads (grouped-query attention when smaller than num_heads)."""
    intermediate_size: int = num(384, ge=1)
    """Tiny model: MLP width."""
    max_position_embeddings: int = num(256, ge=1)
    """Tiny model: longest sequence."""
    init_seed: int = num(1234, ge=0)
    """Tiny model: seed of the random init (the same on every rank and every run)."""
    pretrained: bool = False
    """Tiny model: start from the shipped base pre-trained on general string tasks
    (distft/models/tiny_pretrained.safetensors, model=tiny_pretrained) instead of a random init;
    the shape keys must keep the shipped shape. Ignored when name_or_path is set."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository. Off unless you trust the repository."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: sdpa, eager, flash_attention_2 or a hub kernel such as
    kernels-community/flash-attn (GPU only, when installed; refused on CPU)."""
    kernels: Literal["none", "liger"] = "none"
    """Fused training kernels: liger applies Liger's RMSNorm, SwiGLU, RoPE and fused linear
    cross-entropy to the model's family (GPU only, `pip install liger-kernel`; refused on CPU)."""
    freeze_vision: bool = True
    """Vision-language models: keep the vision tower frozen (full tuning; adapter tunings train it
    in full beside the adapters when false)."""
    freeze_projector: bool = False
    """Vision-language models: keep the projector between vision tower and language model frozen."""


@dataclass
class DataConfig:
    name: str = "default"
    """Config-group option that produced this block."""
    path: list[str] = field(default_factory=list)
    """JSONL/JSON/CSV/TSV/Parquet files, directories of them, saved `datasets` directories or hub
    dataset ids. Empty: the method's embedded data."""
    weights: list[float] = num(factory=list, ge=0)
    """Share of each data.path source in the train split (same length as path; sources are
    down-sampled or repeated to reach it, val/test keep their natural mix). Empty: every row once."""
    replay_path: list[str] = field(default_factory=list)
    """Continual learning: old data (same forms as path) replayed in the train split only."""
    replay_fraction: float = num(0.0, ge=0, lt=1)
    """Share of the train split made of rows sampled from replay_path, e.g. 0.2 (distft/continual.py)."""
    format: str = "auto"
    """auto (detect per row), prompt_completion, alpaca, messages, sharegpt, preference,
    classification or prompt."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename columns before schema detection: {canonical: column}, e.g. {prompt: question}."""
    bad_lines: Literal["skip", "error"] = "skip"
    """Malformed JSONL lines: skip (listed with file:line in the data report) or error."""
    splits: list[float] = num(factory=lambda: [8.0, 1.0, 1.0], ge=0)
    """train/val/test ratios (normalized); deterministic by train.seed."""
    max_length: int = num(64, ge=2)
    """Tokens per example; longer examples are truncated (or dropped, see overlong) and counted."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Rows longer than max_length: truncate (counted as truncated) or drop (counted as too_long)."""
    normalize_unicode: bool = True
    """Unicode NFKC normalization of all text fields."""
    normalize_whitespace: bool = True
    """Trim, collapse runs of spaces inside lines, drop trailing spaces and extra blank lines (the
    prompt's end and the completion's start are kept), so whitespace variants are duplicates."""
    min_chars: int = num(0, ge=0)
    """Drop rows with fewer characters (prompt + answer); 0 keeps all non-empty rows."""
    max_chars: int = num(0, ge=1, off=0, off_means="for no limit")
    """Drop rows with more characters (prompt + answer); 0: no limit."""
    drop_patterns: list[str] = field(default_factory=list)
    """Regular expressions; rows whose prompt or answer matches one are dropped (reported)."""
    dedup: bool = True
    """Remove exact duplicates (same canonical content after normalization); the first is kept."""
    near_dedup: bool = True
    """Remove near duplicates (MinHash LSH); only rows whose answers and numbers also match."""
    near_dedup_threshold: float = num(0.85, ge=0, le=1)
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
    imbalance_warn_ratio: float = num(3.0, ge=1)
    """Warn when the most common label has more than this many times the rows of the rarest."""
    packing: bool = False
    """Pack several examples into one sequence of max_length; attention never crosses examples."""
    num_examples: int = num(6000, ge=1)
    """Embedded default data: how many examples to generate."""
    max_eval_generations: int = num(200, ge=0)
    """Held-out examples used for exact-match generation eval (0 turns it off)."""
    max_eval_examples: int = num(0, ge=0)
    """Val examples used for eval loss (the first N of the seeded val split), as
    max_eval_generations caps generation; 0: all. Not part of the data cache key."""
    cache_dir: str = ""
    """Where prepared (tokenized, Arrow) data is cached, keyed by the sources' contents, the data
    and method settings, the tokenizer and the seed, so every run, resume and sweep trial with the
    same key reuses it. Empty: $XDG_CACHE_HOME/distft/data (~/.cache/distft/data). On several
    nodes, give a directory they all see."""
    num_proc: int | str = num("auto", ge=1, also=("auto",))
    """Worker processes for cleaning and encoding the data (the result does not depend on it); auto:
    the CPUs the preparing process may use, at most 8 (the other ranks wait meanwhile)."""
    group_by_length: bool = False
    """Without packing: put examples of similar length in the same micro-batches (less padding);
    the global batches still do not depend on the world size."""
    streaming: bool = False
    """Read, clean and tokenize the train rows while training (JSONL/Parquet files larger than memory
    or disk; method=sft, needs train.max_steps): each rank reads only its share, the global batches
    do not depend on the world size, and a resume continues at the stored shard positions. Dedup runs
    within blocks, the split hashes each prompt; see distft/data/stream.py."""
    stream_buffer: int = num(16384, ge=1)
    """data.streaming: rows cleaned, deduplicated and shuffled together, over all the lanes of the
    global batch (each lane reads blocks of stream_buffer / global batch rows); a rank holds about
    stream_buffer / ranks examples."""


@dataclass
class TrainConfig:
    max_steps: int = num(0, ge=1, off=0, off_means="to train by train.epochs")
    """Optimizer steps. 0: use epochs."""
    epochs: float = num(6.0, gt=0, off=0, off_means="to train by train.max_steps")
    """Passes over the train split, used when max_steps is 0."""
    micro_batch_size: int | str = num(16, ge=1, also=("auto",))
    """Sequences per rank per forward pass, or auto: the largest that fits train.memory_gib by the
    planner's estimate, confirmed by a trial step (see distft-plan)."""
    memory_gib: float | None = num(None, gt=0)
    """Memory one rank may use, for the auto choices (strategy=auto, micro_batch_size=auto).
    None: the GPU's memory, or host RAM divided by the ranks per node."""
    grad_accum: int = num(1, ge=1)
    """Micro-batches per optimizer step; the global batch is micro × accum × world size."""
    lr: float = num(3e-3, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    """transformers scheduler name: constant, constant_with_warmup, linear or cosine."""
    warmup_steps: int = num(0, ge=0)
    """Linear warmup steps (overrides warmup_ratio when > 0)."""
    warmup_ratio: float = num(0.05, ge=0, lt=1)
    """Warmup as a fraction of the total steps."""
    weight_decay: float = num(0.0, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    adam_betas: list[float] = num(factory=lambda: [0.9, 0.95], ge=0, lt=1)
    """AdamW betas."""
    max_grad_norm: float = num(1.0, gt=0, off=0, off_means="to turn clipping off")
    """Gradient clipping by global norm (0 disables)."""
    seed: int = num(42, ge=0)
    """Seeds data order, dropout and sampling."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32, bf16 (mixed, fp32 master weights) or fp16 (mixed with loss scaling)."""
    tf32: bool = True
    """CUDA: fp32 matmuls and convolutions run on TF32 tensor cores (fp32 storage and accumulation,
    10-bit mantissa inputs; ~7x the fp32 rate on H100). false: full IEEE fp32. No effect on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    loss_chunks: int = num(0, ge=1, off=0, off_means="to compute the logits of the whole sequence at once")
    """Compute the output projection and the token loss in this many chunks along the sequence,
    each recomputed in backward, so full-vocabulary logits of the whole sequence never exist at
    once (SFT, DPO, KTO and reference log-probs). 0: off."""
    activation_offload: bool = False
    """Move the activations saved for backward to host memory (pinned on GPU) during forward and
    back when backward needs them; with gradient_checkpointing only the checkpoints move. No
    memory change on CPU, where host memory is the device memory."""
    compile: bool = False
    """torch.compile each decoder block (the whole model if it has none) before sharding: faster
    steps after a one-off compile at the start (CPU: inductor's C++ backend; GPU: Triton)."""
    save_every: int = num(0, ge=0)
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = num(2, ge=1)
    """Checkpoints kept; older ones are pruned."""
    eval_every: int = num(0, ge=0)
    """Validation loss every N steps (0: only at the end)."""
    log_every: int = num(1, ge=1)
    """Metrics row every N steps."""
    export: Literal["last", "best", "none"] = "last"
    """What export/ (Hugging Face format) holds at the end: last (final weights), best (the
    checkpoint with the best eval.monitor value; needs train.eval_every) or none."""
    eval_generate: bool = True
    """Exact-match generation eval on the held-out split before and after training."""
    max_new_tokens: int = num(16, ge=1)
    """Generation length for generation eval."""
    progress: bool = True
    """Progress bar on rank 0."""
    max_bad_steps: int = num(5, ge=0)
    """A step with a NaN/Inf loss or gradient norm is skipped (counted as skipped_steps); after
    this many in a row training stops naming the step, its sample ids and the last good
    checkpoint (0: never stop). fp16 overflows the loss scaler handles (skipped while its scale
    settles) are counted as skipped but not towards this limit."""
    async_save: bool = False
    """DDP/FSDP: write checkpoints in the background (DCP async save on its own gloo group) while
    training continues; checkpoints/latest moves once the write completed. DeepSpeed saves
    synchronously."""


@dataclass
class ClusterConfig:
    name: str = "local"
    """local (this machine) or slurm."""
    nodes: int = num(1, ge=1)
    """Nodes in the job."""
    nproc_per_node: int = num(2, ge=0)
    """Ranks per node. The YAML default is one per GPU on GPU nodes (gpus_per_node), 2 on CPU nodes;
    0: one per visible GPU."""
    gpus_per_node: int = num(0, ge=0)
    """GPUs per node (0 on CPU nodes: ranks use gloo)."""
    max_restarts: int = num(0, ge=0)
    """Elastic restarts of the whole group after a failed rank."""
    master_port: int = num(29500, ge=1, le=65535)
    """Rendezvous port on the first node."""
    master_addr: str = "127.0.0.1"
    """Rendezvous host (the first node) for cluster=local multi-node; SLURM uses its first node."""
    node_rank: int = num(0, ge=0)
    """This launcher's node (cluster=local multi-node: one distft-launch per node)."""
    rdzv_timeout_s: int = num(300, ge=1)
    """Seconds a node waits for the rendezvous (all nodes joined) before failing with host:port."""
    timeout_s: int = num(300, ge=1)
    """Collective timeout of the process group (a hung collective fails after this)."""
    hang_dump_s: int = num(120, ge=0)
    """Dump every rank's Python stacks to <run dir>/stacks/ when no step finishes this long, and
    name ranks on the same host that are stopped (SIGSTOP); keep it below timeout_s (0: off)."""
    stop_grace_s: int = num(120, ge=0)
    """After a stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR1: Ctrl-C, scancel, SLURM's pre-timeout
    warning), seconds ranks get to agree, checkpoint and exit 75 before they are killed."""
    network_interface: str | None = None
    """Network interface for NCCL and gloo between nodes (exported as NCCL_SOCKET_IFNAME and
    GLOO_SOCKET_IFNAME), e.g. ib0 or eth0; None: the libraries pick one."""
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
    cpus_per_task: int = num(0, ge=0)
    """CPUs for each node's launcher task, i.e. for all ranks of a node (0: cpus_per_gpu per GPU
    on GPU nodes, 2 on CPU nodes)."""
    cpus_per_gpu: int = num(8, ge=1)
    """CPUs per GPU when cpus_per_task is 0 on GPU nodes (data loading, tokenization, NCCL)."""
    mem: str | None = "auto"
    """--mem per node: auto (0, the whole node's memory, on GPU nodes; 8G on CPU nodes), a size
    such as 200G, or None (the cluster's default)."""
    job_name: str = "distft"
    """--job-name."""
    signal_before_s: int = num(120, ge=0)
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
    container_runtime: Literal["pyxis", "apptainer"] = "pyxis"
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
    mode: Literal["auto", "min", "max"] = "auto"
    """min, max, or auto (min for loss/ppl, max otherwise)."""
    patience: int = num(0, ge=0)
    """Stop after this many evaluations without improvement (0: no early stopping)."""
    min_delta: float = num(0.0, ge=0)
    """Smallest change of the monitored metric that counts as an improvement."""


class OptionConfig(Protocol):
    """What every tuning/method/strategy option's own dataclass has (each registry entry's `config`,
    built and type-checked by distft.config.typed.build from the option's YAML)."""

    name: str


@dataclass
class RootConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    cluster: ClusterConfig
    logger: LoggerConfig
    tuning: OptionConfig
    """The tuning option's own dataclass (see distft.tuning)."""
    method: OptionConfig
    """The method option's own dataclass (see distft.methods)."""
    strategy: OptionConfig
    """The strategy option's own dataclass (see distft.strategies)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation metrics, test eval and early stopping."""
    output_dir: str | None = None
    """Run directory. None: outputs/<date>/<time>."""
    resume: str = "auto"
    """auto (continue from output_dir's latest checkpoint if any), never, or a checkpoint path."""
    resume_unverified: bool = False
    """Resume from a checkpoint that has no manifest.json (no sha256 check of its files). Only for a
    checkpoint you wrote yourself: the manifest detects corruption, not tampering."""
    launch: dict[str, Any] = field(default_factory=dict)
    """Launcher-only keys (dry_run, ...); ignored by the ranks."""
