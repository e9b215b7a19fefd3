"""Typed config of `distft-rlaif`: conf/rlaif.yaml (+ the `model` and `judge` groups)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from distft.config.load import build, strip_launcher_args
from distft.config.schema import ModelConfig
from distft.errors import ConfigError
from distft.paths import conf_dir
from distft.rlaif import secrets

JUDGE_TYPES = ("python", "hf", "openai")


@dataclass
class JudgeConfig:
    name: str = "python"
    """Config-group option that produced this block."""
    type: str = "python"
    """python (a function), hf (a local causal LM's verdict log-probs) or openai (a chat endpoint)."""
    function: str = "distft.rlaif.judges:default_task_judge"
    """python: 'package.module:callable' called as fn(prompt, completions, row); returns a list of
    scores, or a dict with 'scores' or 'best'/'worst' (0-based) and optionally 'reason'."""
    model: str | None = None
    """hf: local directory or hub id of the judge: a causal LM asked to choose (verdict
    log-probs), or a reward model (a method=reward export) that scores each completion; null:
    the sampling model. openai: the model name sent to the endpoint."""
    template: str = (
        "Question: {prompt}\nAnswer A: {a}\nAnswer B: {b}\nWhich answer is correct and better, A or B?\n"
        "Verdict:"
    )
    """hf: judge prompt with {prompt}, {a} and {b}; the verdicts' log-probs follow it."""
    verdicts: list[str] = field(default_factory=lambda: [" A", " B"])
    """hf: the two verdict strings (A better, B better), compared by their log-probabilities."""
    use_chat_template: bool = False
    """hf: wrap the judge prompt as a user message with the judge tokenizer's chat template."""
    url: str = "http://127.0.0.1:8000/v1"
    """openai: base URL of an OpenAI-compatible API (POST {url}/chat/completions)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """openai: name of the environment variable holding the API key (never the key itself);
    null for endpoints without authentication."""
    system: str = (
        "You are a strict judge. Given a prompt and numbered candidate responses, pick the best and "
        'the worst. Reply with JSON only: {"best": <number>, "worst": <number>, "reason": "<one sentence>"}.'
    )
    """openai: system message."""
    temperature: float = 0.0
    """openai: sampling temperature of the judge."""
    max_tokens: int = 256
    """openai: longest verdict."""
    timeout_s: float = 60.0
    """openai: per-request timeout."""
    retries: int = 3
    """openai: attempts per request on connection errors, timeouts, 429 and 5xx."""
    backoff_s: float = 1.0
    """openai: wait before the first retry, doubled after each."""
    concurrency: int = 4
    """openai / python: requests in flight at once per rank."""


@dataclass
class RlaifConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model that samples completions (a policy export, a hub model, or the tiny default)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """Who picks chosen and rejected."""
    output: str = "rlaif.jsonl"
    """JSONL written: prompt/chosen/rejected/reason rows (a report <output>.report.json beside it)."""
    prompts: list[str] = field(default_factory=list)
    """JSONL/JSON files or directories with 'prompt' (text or chat messages) or 'messages' rows;
    empty: prompts of the embedded default task."""
    num_prompts: int = 200
    """Use at most this many prompts (0: all)."""
    num_samples: int = 4
    """Completions sampled per prompt (>= 2)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    max_new_tokens: int = 16
    """Longest completion."""
    batch_size: int = 8
    """Prompts per generate call."""
    seed: int = 0
    """Sampling seed (each rank adds its rank)."""
    max_failed_fraction: float = 0.1
    """Prompts that may be skipped (judge failure or tie, fewer than 2 distinct completions) before
    the command fails."""
    max_consecutive_failures: int = 5
    """Judge failures in a row that stop the command at once (e.g. an endpoint that is down)."""
    work_dir: str | None = None
    """Where the tiny default model is built and per-rank parts are written (default: beside output)."""


# distft-rlaif --help: its groups and most used keys (distft.config.cli.help_text).
HELP = {
    "config_name": "rlaif",
    "groups": ("model", "judge"),
    "keys": ("output", "prompts", "num_prompts", "num_samples", "judge.type", "judge.model"),
    "blocks": {"": RlaifConfig, "judge": JudgeConfig},
}


def load_rlaif_config(overrides: list[str]) -> RlaifConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            composed = compose("rlaif", overrides=strip_launcher_args(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"rlaif config: {str(e).strip().splitlines()[0]}") from None
    raw = OmegaConf.to_container(composed, resolve=True)
    assert isinstance(raw, dict)
    raw.pop("hydra", None)
    model = build(ModelConfig, raw.pop("model", {}) or {}, "model")
    judge = build(JudgeConfig, raw.pop("judge", {}) or {}, "judge")
    cfg = build(RlaifConfig, raw, "rlaif")
    cfg.model, cfg.judge = model, judge
    validate(cfg)
    return cfg


def validate(cfg: RlaifConfig) -> None:
    j = cfg.judge
    if j.type not in JUDGE_TYPES:
        raise ConfigError(f"judge.type={j.type!r}; valid: {', '.join(JUDGE_TYPES)}")
    if cfg.num_samples < 2:
        raise ConfigError(f"num_samples={cfg.num_samples}: need at least 2 completions per prompt to compare")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1 or j.concurrency < 1 or j.retries < 1:
        raise ConfigError("batch_size, max_new_tokens, judge.concurrency and judge.retries must be >= 1")
    if not 0 <= cfg.max_failed_fraction <= 1:
        raise ConfigError(f"max_failed_fraction={cfg.max_failed_fraction} must be in [0, 1]")
    if j.type == "hf" and len(j.verdicts) != 2:
        raise ConfigError(f"judge.verdicts={j.verdicts}: give exactly two verdict strings (A, B)")
    if j.type == "hf" and not all(k in j.template for k in ("{prompt}", "{a}", "{b}")):
        raise ConfigError("judge.template must contain {prompt}, {a} and {b}")
    if j.type == "openai":
        if not j.url.startswith(("http://", "https://")):
            raise ConfigError(
                f"judge.url={j.url!r}: give an http(s) base URL such as https://api.openai.com/v1"
            )
        if not j.model:
            raise ConfigError("judge.model: name the model the endpoint should use (e.g. gpt-4o-mini)")
        if j.api_key_env and secrets.looks_like_a_key(j.api_key_env):
            secrets.register(j.api_key_env)
            raise ConfigError(
                f"judge.api_key_env={secrets.MASK}: give the NAME of the environment variable that holds the "
                "key, not the key itself (it is not shown here); e.g. export OPENAI_API_KEY=... and set "
                "judge.api_key_env=OPENAI_API_KEY"
            )
        if j.api_key_env:
            secrets.register(os.environ.get(j.api_key_env))
        if j.api_key_env and not os.environ.get(j.api_key_env):
            raise ConfigError(
                f"judge.api_key_env={j.api_key_env}: that environment variable is not set; export it, "
                "or set judge.api_key_env=null for an endpoint without authentication"
            )
