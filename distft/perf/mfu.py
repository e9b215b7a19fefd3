"""Model FLOPs utilization: FLOPs per token (6N + 12·L·H·Q·T, PaLM appendix B) over the device peak.

N counts the weights that do matmuls: every parameter except embedding lookups (an output head
tied to the embedding is a real matmul and counted once). With a frozen base (LoRA, QLoRA) the
backward skips the frozen weights' gradients, so a token costs 4N + 2·N_trainable instead of 6N.
Methods whose output head runs only on the scored positions (SFT's completion tokens, the
preference methods' completions: distft.methods.logprobs) count the head's 6·V·H per token
times the scored fraction of the tokens, the work actually done; T is the length of the example a
token attends inside, averaged over tokens (`attention_span`: packed rows count their examples).
GPU peaks are the vendors' dense figures for the matmul kind the run uses (fp32, tf32, bf16,
fp16: an fp32 run is not measured against the bf16 peak); a CPU's peak is measured once by a short
matmul calibration and cached on disk (per CPU model, thread count and dtype).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from distft.perf import precision

# Dense (no sparsity) peaks in FLOP/s per matmul kind, from the vendors' datasheets (sparse figures
# halved): fp32 = CUDA cores, tf32 = tensor cores on fp32 tensors (train.tf32), bf16/fp16 = tensor
# cores with fp32 accumulation. Longer names first: "H100 PCIe" must not match "H100".
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 NVL", dict(fp32=60e12, tf32=417.5e12, bf16=835e12, fp16=835e12)),
    ("H100 PCIe", dict(fp32=51e12, tf32=378e12, bf16=756e12, fp16=756e12)),
    ("H100", dict(fp32=67e12, tf32=494.7e12, bf16=989e12, fp16=989e12)),  # SXM
    ("H800 PCIe", dict(fp32=51e12, tf32=378e12, bf16=756e12, fp16=756e12)),
    ("H800", dict(fp32=67e12, tf32=494.7e12, bf16=989e12, fp16=989e12)),  # SXM: H100's compute
    ("H200 NVL", dict(fp32=60e12, tf32=417.5e12, bf16=835e12, fp16=835e12)),
    ("H200", dict(fp32=67e12, tf32=494.7e12, bf16=989e12, fp16=989e12)),
    ("B200", dict(fp32=75e12, tf32=1100e12, bf16=2250e12, fp16=2250e12)),  # HGX B200, per GPU
    ("A100", dict(fp32=19.5e12, tf32=156e12, bf16=312e12, fp16=312e12)),
    ("L40S", dict(fp32=91.6e12, tf32=183e12, bf16=362e12, fp16=362e12)),
    ("4090", dict(fp32=82.6e12, tf32=82.6e12, bf16=165.2e12, fp16=165.2e12)),
]
MATMUL_KINDS = ("fp32", "tf32", "bf16", "fp16")


def gpu_peak_flops(device_name: str, kind: str = "bf16") -> float | None:
    """The table's peak for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3') and a matmul kind
    (fp32, tf32, bf16, fp16), None if the device is unknown."""
    if kind not in MATMUL_KINDS:
        raise ValueError(f"matmul kind {kind!r}: one of {MATMUL_KINDS}")
    name = device_name.upper()
    for key, peaks in GPU_PEAKS:
        if key.upper() in name:
            return peaks[kind]
    return None


def matmul_kind(dtype: torch.dtype, tf32: bool) -> str:
    """What the tensor cores run for a compute dtype: fp32 matmuls run as TF32 when allowed."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return "tf32" if tf32 else "fp32"


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(N, N_trainable): parameters that take part in matmuls, embeddings excluded, the head counted
    even when tied to the embedding. Quantized 4-bit weights count by their logical shape."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen: set[int] = set()
    total = trainable = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen or id(p) in embeddings:
                continue
            seen.add(id(p))
            n = _logical_numel(module, p)
            total += n
            trainable += n if p.requires_grad else 0
    head = _output_head(model)
    if head is not None and id(head.weight) in embeddings:
        n = int(getattr(head.weight, "ds_numel", head.weight.numel()))
        total += n
        trainable += n if head.weight.requires_grad else 0
    return total, trainable


def head_params(model: torch.nn.Module) -> tuple[int, int]:
    """(numel, trainable numel) of the output head's weight, (0, 0) without a head."""
    head = _output_head(model)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return 0, 0
    n = _logical_numel(head, weight)
    return n, n if weight.requires_grad else 0


def scored_fraction(examples: Sequence[dict], sample: int = 1024) -> float | None:
    """Scored positions per forwarded token of encoded examples (at most `sample` of them, evenly
    spaced): SFT rows (`input_ids`, `labels`; position t is scored when `labels[t + 1]` is) or
    prompt + completion rows (`prompt_ids` and each other `*_ids` list: DPO's chosen/rejected,
    KTO's completion and KL rows). None when the examples carry neither."""
    scored = tokens = 0
    for i in range(0, len(examples), max(1, len(examples) // sample)):
        ex = examples[i]
        if not isinstance(ex, dict):
            continue
        if "input_ids" in ex and "labels" in ex:
            scored += sum(1 for label in list(ex["labels"])[1:] if label != -100)
            tokens += len(ex["input_ids"])
        elif "prompt_ids" in ex:
            for key, ids in ex.items():
                if key.endswith("_ids") and key != "prompt_ids" and not isinstance(ids, (str, int)):
                    scored += len(ids)
                    tokens += len(ex["prompt_ids"]) + len(ids)
    return scored / tokens if tokens else None


def _logical_numel(module: torch.nn.Module, p: torch.nn.Parameter) -> int:
    if (
        p is getattr(module, "weight", None)
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    ):
        return int(module.in_features) * int(module.out_features)  # bitsandbytes packs 4-bit weights
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitioned at construction: data is empty


def _output_head(model: torch.nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if get else None
    except (AttributeError, NotImplementedError):
        return None


def flops_per_token(
    n_params: int, n_trainable: int, layers: int, heads: int, head_dim: int, seq_len: float
) -> float:
    """Training FLOPs per token: 2N forward + 2N input gradients + 2·N_trainable weight gradients
    (= 6N when everything trains) + 12·L·H·Q·T for attention scores (non-causal convention)."""
    return 4 * n_params + 2 * n_trainable + 12 * layers * heads * head_dim * seq_len


def attention_span(examples: Sequence[dict], default: float, sample: int = 4096) -> float:
    """The attention span T of a trained token: the length of its own example (packed rows, which
    restart their `position_ids` at each example, attend inside each example only), averaged over
    tokens: sum(l^2) / sum(l) over the examples (a plain mean over examples undercounts, long
    examples hold more of the tokens; a packed row's own length overcounts). At most `sample`
    encoded rows, evenly spaced; `default` when they carry no `input_ids` (e.g. paired preference
    rows)."""
    squares = tokens = 0
    for i in range(0, len(examples), max(1, len(examples) // sample)):
        ex = examples[i]
        if not isinstance(ex, dict) or "input_ids" not in ex:
            continue
        pos = ex.get("position_ids")
        n = len(ex["input_ids"])
        if pos is None or n == 0 or (pos[0] == 0 and pos[-1] == n - 1):  # one example (no torch call)
            lengths = [n]
        else:
            pos = torch.as_tensor(pos)
            starts = torch.nonzero(torch.diff(pos) != 1).flatten() + 1
            bounds = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), len(pos))])
            lengths = torch.diff(bounds).tolist()
        squares += sum(n * n for n in lengths)
        tokens += sum(lengths)
    return squares / tokens if tokens else float(default)


def model_shape(config) -> tuple[int, int, int]:
    """(layers, heads, head_dim) of a transformers config (a VLM's: its language model's)."""
    config = getattr(config, "text_config", None) or config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), heads, head_dim


# ---------------------------------------------------------------------------- device peak
def _cache_path() -> Path:
    root = os.environ.get("DISTFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distft"
    )
    return Path(root) / "cpu_peak_flops.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate_cpu(dtype: torch.dtype, threads: int, seconds: float = 0.3, size: int = 512) -> float:
    """Best FLOP/s of repeated square matmuls with `threads` threads: what a rank can reach here."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.mm(a, b)  # warm-up: kernel selection, page faults
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / max(time.perf_counter() - t0, 1e-9))
        return best
    finally:
        torch.set_num_threads(old)


def cpu_peak_flops(dtype: torch.dtype, threads: int | None = None) -> float:
    """Measured CPU peak for this CPU, thread count and dtype, read from the cache or measured now."""
    threads = threads or torch.get_num_threads()
    key = f"{_cpu_name()}|threads={threads}|{str(dtype).removeprefix('torch.')}"
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    peak = calibrate_cpu(dtype, threads)
    try:  # concurrent ranks may both measure; the atomic replace keeps the file whole
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        cache[key] = peak
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return peak


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for the matmuls a run in `dtype` does: on a GPU the table's figure
    for that kind (fp32 runs: the TF32 peak when TF32 is on, else the CUDA-core fp32 peak, never the
    bf16 one); on a CPU the measured rate."""
    if device.type == "cuda":
        return gpu_peak_flops(
            torch.cuda.get_device_name(device), matmul_kind(dtype, precision.tf32_enabled())
        )
    return cpu_peak_flops(dtype)


@dataclass
class MfuMeter:
    """Turns global tokens/s into MFU: FLOP/s over (per-device peak × world size)."""

    flops_per_token: float
    peak_flops: float | None
    world_size: int

    def mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak_flops:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak_flops * self.world_size)

    @classmethod
    def for_model(
        cls, model, seq_len: float, device, dtype: torch.dtype, world_size: int, head_fraction: float = 1.0
    ) -> MfuMeter:
        """`head_fraction`: the share of tokens the output head runs on (1: every token)."""
        n, n_trainable = matmul_params(model)
        head, head_trainable = head_params(model)
        n -= round(head * (1 - head_fraction))
        n_trainable -= round(head_trainable * (1 - head_fraction))
        config = getattr(model, "config", None)
        layers, heads, head_dim = model_shape(config) if config is not None else (0, 0, 0)
        fpt = flops_per_token(n, n_trainable, layers, heads, head_dim, seq_len)
        return cls(fpt, device_peak_flops(device, dtype), world_size)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank so far: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
