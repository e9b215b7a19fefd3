"""`distft-rlaif [overrides]`: prompts → N sampled completions each → judge → preference JSONL.

Prompts are sharded over ranks (`torchrun --nproc_per_node N -m distft.rlaif ...`); each rank
samples with its own model copy, judges, and writes a part file; rank 0 merges the parts in prompt
order into `output` and writes `<output>.report.json` (counts, skips by reason, per rank).
Skipped prompts (judge failure or tie, fewer than two distinct completions) are counted; past
`max_failed_fraction` of the prompts, or `max_consecutive_failures` judge failures in a row, the
command stops with a message naming the last failure.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from distft.errors import DataError, DistftError
from distft.rlaif import secrets
from distft.rlaif.judges import JudgeError, make_judge
from distft.runtime import dist


def load_prompts(cfg) -> list[dict]:
    """Rows with a text or chat 'prompt' (rows with 'messages' drop their trailing assistant turn)."""
    from distft.data.preference import default_prompts
    from distft.data.sources import read_all

    rows = read_all(cfg.prompts) if cfg.prompts else default_prompts(cfg.num_prompts or 200)
    out = []
    for row in rows:
        if "prompt" not in row and isinstance(row.get("messages"), list):
            msgs = row["messages"]
            while msgs and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]
            row = {**row, "prompt": msgs}
        if not row.get("prompt"):
            raise DataError(f"{row.get('_source', '?')}: no 'prompt' (text or chat messages) in this row")
        out.append(row)
    return out[: cfg.num_prompts] if cfg.num_prompts else out


def prompt_text(prompt, tokenizer) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def judge_text(prompt) -> str:
    """What the judge reads as the prompt: the text, or the conversation as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], cfg, device) -> list[list[str]]:
    """num_samples completions per prompt (text after the prompt, up to EOS)."""
    from distft.data.preference import prompt_ids

    tokenizer.padding_side = "left"
    ids = [prompt_ids(p, tokenizer) for p in prompts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=cfg.num_samples,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    n = cfg.num_samples
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def as_completion(prompt, text: str):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


class Failures:
    def __init__(self, cfg, total: int):
        self.cfg, self.total = cfg, total
        self.counts: Counter = Counter()
        self.in_a_row = 0
        self.last = ""

    def add(self, reason: str, detail: str, judge_failed: bool) -> None:
        self.counts[reason] += 1
        self.last = detail
        self.in_a_row = self.in_a_row + 1 if judge_failed else 0
        if judge_failed and self.in_a_row >= self.cfg.max_consecutive_failures:
            raise DistftError(
                f"the judge failed {self.in_a_row} times in a row (max_consecutive_failures); last: {detail}"
            )

    def ok(self) -> None:
        self.in_a_row = 0


def run_rank(cfg, info, work: Path) -> dict:
    from distft.models import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg, work, info)
    tokenizer = load_tokenizer(path, cfg)
    model = load_model(path, cfg, torch.float32, {}, None).to(info.device).eval()
    judge = make_judge(cfg, info, path)
    rows = load_prompts(cfg)
    mine = list(range(info.rank, len(rows), info.world_size))
    torch.manual_seed(cfg.seed + info.rank)
    failures = Failures(cfg, len(mine))
    written: list[dict] = []
    pool = ThreadPoolExecutor(cfg.judge.concurrency) if cfg.judge.type != "hf" else None
    for b in range(0, len(mine), cfg.batch_size):
        ids = mine[b : b + cfg.batch_size]
        batch_rows = [rows[i] for i in ids]
        samples = sample(
            model, tokenizer, [prompt_text(r["prompt"], tokenizer) for r in batch_rows], cfg, info.device
        )
        jobs = []
        for i, row, outs in zip(ids, batch_rows, samples):
            distinct = list(dict.fromkeys(o.strip() for o in outs if o.strip()))
            if len(distinct) < 2:
                failures.add("fewer than 2 distinct completions", f"prompt {i}", judge_failed=False)
                continue
            jobs.append((i, row, distinct))

        def judge_one(job):
            i, row, distinct = job
            try:
                return job, judge(judge_text(row["prompt"]), distinct, row), None
            except JudgeError as e:
                return job, None, str(e)

        results = pool.map(judge_one, jobs) if pool else map(judge_one, jobs)
        for (i, row, distinct), verdict, error in results:
            if error is not None:
                tie = error.startswith("tie")  # the judge could not decide: a skip, not a failure
                failures.add("tie" if tie else "judge failed", error, judge_failed=not tie)
                continue
            failures.ok()
            out = {
                "prompt": row["prompt"],
                "chosen": as_completion(row["prompt"], distinct[verdict.best]),
                "rejected": as_completion(row["prompt"], distinct[verdict.worst]),
                "reason": secrets.redact(verdict.reason),
                "judge": judge.name,
                "num_completions": len(distinct),
                "_index": i,
            }
            if verdict.scores:
                out["scores"] = verdict.scores
            written.append(out)
    if pool:
        pool.shutdown()
    part = work / f"rlaif_part{info.rank}.jsonl"
    with open(part, "w") as f:
        for r in written:
            f.write(json.dumps(r) + "\n")
    return {
        "rank": info.rank,
        "prompts": len(mine),
        "written": len(written),
        "skipped": dict(failures.counts),
    }


def merge(cfg, work: Path, reports: list[dict]) -> dict:
    rows = []
    for rep in reports:
        part = work / f"rlaif_part{rep['rank']}.jsonl"
        rows += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
        part.unlink()
    rows.sort(key=lambda r: r.pop("_index"))
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, out)
    skipped: Counter = Counter()
    for rep in reports:
        skipped.update(rep["skipped"])
    total = sum(rep["prompts"] for rep in reports)
    report = {
        "output": str(out.resolve()),
        "prompts": total,
        "written": len(rows),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped),
        "ranks": reports,
    }
    Path(str(out) + ".report.json").write_text(json.dumps(report, indent=2))
    if report["skipped"] > cfg.max_failed_fraction * max(total, 1):
        raise DistftError(
            f"{report['skipped']} of {total} prompts were skipped ({dict(skipped)}), more than "
            f"max_failed_fraction={cfg.max_failed_fraction}; the {len(rows)} pairs written are in {out}"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    from distft.rlaif.config import load_rlaif_config

    argv = sys.argv[1:] if argv is None else argv
    from distft.config.cli import early_exit
    from distft.rlaif.config import HELP

    if (rc := early_exit("distft-rlaif", __doc__, argv, **HELP)) is not None:  # --help, --cfg job
        return rc
    try:
        cfg = load_rlaif_config(argv)
        info = dist.init()
        work = Path(cfg.work_dir or Path(cfg.output).resolve().parent / (Path(cfg.output).name + ".work"))
        if info.is_main:
            work.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        try:
            report = run_rank(cfg, info, work)
            error = None
        except DistftError as e:
            report, error = None, str(e)
        gathered = dist.all_gather_objects((report, error))
        errors = [e for _, e in gathered if e]
        if errors:
            raise DistftError(errors[0])
        if info.is_main:
            summary = merge(cfg, work, [r for r, _ in gathered])
            print(
                f"distft-rlaif: wrote {summary['written']} pairs from {summary['prompts']} prompts to "
                f"{summary['output']} (skipped {summary['skipped']}: {summary['skipped_by_reason']})",
                flush=True,
            )
        dist.barrier()
        dist.shutdown()
    except DistftError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"distft-rlaif: error: {secrets.redact(str(e))}", file=sys.stderr, flush=True)
        return 2
    finally:
        dist.shutdown(linger_s=0)  # after an error: no waiting on ranks that may be stuck
    return 0


if __name__ == "__main__":
    sys.exit(main())
