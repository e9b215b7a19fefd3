"""distft-rlaif: sample completions, judge them (Python function, local HF causal LM, an
OpenAI-compatible endpoint served here on 127.0.0.1), write preference JSONL ready for DPO."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from distft.data.preference import default_prompts, encode_pairs
from distft.rlaif.judges import default_task_judge, parse_reply
from distft.rlaif.main import main
from tests.util import REPO, env, free_port, metrics, train

SMALL = ["num_prompts=12", "num_samples=3", "max_new_tokens=5", "batch_size=6"]


def longest_judge(prompt: str, completions: list[str], row: dict) -> dict:
    """A test judge with no ties: prefers longer completions, then later characters."""
    scores = [len(c) + sum(map(ord, c)) * 1e-6 for c in completions]
    return {"scores": scores, "reason": "longest wins"}


def _run(tmp_path: Path, *overrides: str) -> tuple[int, list[dict], dict]:
    out = tmp_path / "pairs.jsonl"
    rc = main([f"output={out}", f"work_dir={tmp_path / 'work'}", *SMALL, *overrides])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    report_path = Path(str(out) + ".report.json")
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return rc, rows, report


def _tokenizer(tmp_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tmp_path / "work" / "base_model")


# ---------------------------------------------------------------------------- python judge
@pytest.mark.quick
def test_python_judge_writes_pairs_ready_for_dpo(tmp_path):
    rc, rows, report = _run(tmp_path, "judge.function=tests.test_rlaif:longest_judge")
    assert rc == 0
    assert report["prompts"] == 12 and report["written"] == len(rows) == 12 - report["skipped"]
    prompts = [p["prompt"] for p in default_prompts(12)]
    assert [r["prompt"] for r in rows] == [p for p in prompts if p in {r["prompt"] for r in rows}]
    for r in rows:
        assert r["chosen"] != r["rejected"] and r["reason"] == "longest wins"
        assert r["judge"] == "python:tests.test_rlaif:longest_judge"
        assert max(r["scores"]) == longest_judge("", [r["chosen"]], {})["scores"][0]
    examples, stats = encode_pairs(rows, _tokenizer(tmp_path), 64, 0.0)
    assert len(examples) == len(rows) and stats["skipped"] == 0
    # The file is training data for method=dpo as it is.
    run = tmp_path / "dpo"
    data = [f"data.path={tmp_path / 'pairs.jsonl'}", "train.micro_batch_size=4"]
    train(run, "method=dpo", *data, "train.max_steps=2", "train.eval_generate=false", plain=True)
    report = json.loads((run / "data_report.json").read_text())
    assert report["formats"] == {"preference": len(rows)}
    assert any("rewards/margins" in r for r in metrics(run))


@pytest.mark.quick
def test_default_task_judge_gives_partial_credit():
    out = default_task_judge("reverse abcd=", ["dcba", "dcab", "abcd", "dcbax"])
    assert out["scores"][0] == 1.0
    assert out["scores"][0] > out["scores"][3] > out["scores"][1] > out["scores"][2]
    assert "'dcba'" in out["reason"]


@pytest.mark.quick
def test_failing_python_judge_stops_after_consecutive_failures(tmp_path, capsys):
    rc, rows, _ = _run(tmp_path, "judge.function=tests.test_rlaif:broken_judge", "max_consecutive_failures=3")
    assert rc == 2 and rows == []
    err = capsys.readouterr().err
    assert "the judge failed 3 times in a row" in err and "ValueError: judge is broken" in err


def broken_judge(prompt, completions, row):
    raise ValueError("judge is broken")


# ---------------------------------------------------------------------------- OpenAI-compatible endpoint
class FakeJudgeServer:
    """A chat-completions endpoint on 127.0.0.1: answers 503 to its first request (to exercise
    retries), checks the bearer key, picks the longest candidate as best and the shortest as
    worst, and answers garbage for prompts listed in `garbage`."""

    def __init__(self, key: str, garbage: tuple[str, ...] = (), reason: str = "server: longest"):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(
                        {"path": self.path, "auth": self.headers.get("Authorization"), **body}
                    )
                    first = len(server.requests) == 1
                if first:
                    return self._send(503, {"error": "warming up"})
                given = self.headers.get("Authorization", "")
                if given != f"Bearer {key}":  # as some real endpoints do: the wrong key echoed back
                    return self._send(401, {"error": f"Incorrect API key provided: {given.split()[-1]}"})
                user = body["messages"][-1]["content"]
                cands = re.findall(r"\[(\d+)\]\n(.*?)(?=\n\n\[\d+\]\n|\n\nWhich of the)", user, re.S)
                if any(g in user for g in garbage):
                    content = "I cannot decide."
                else:
                    best = max(cands, key=lambda c: (len(c[1]), c[1]))[0]
                    worst = min(cands, key=lambda c: (len(c[1]), c[1]))[0]
                    verdict = {"best": int(best), "worst": int(worst), "reason": reason.format(key=given)}
                    content = f"Sure. {json.dumps(verdict)}"
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _openai(url: str, *extra: str) -> list[str]:
    return ["judge=openai", f"judge.url={url}", "judge.model=judge-1", "judge.api_key_env=DISTFT_TEST_KEY",
            "judge.backoff_s=0.01", "judge.concurrency=2", *extra]  # fmt: skip


@pytest.mark.quick
def test_openai_judge_against_a_local_server(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTFT_TEST_KEY", "sekret")
    server = FakeJudgeServer("sekret", garbage=(default_prompts(12)[4]["prompt"],))
    try:
        rc, rows, report = _run(tmp_path, *_openai(server.url), "max_failed_fraction=0.2")
    finally:
        server.close()
    assert rc == 0
    # One prompt got an unparseable verdict: a counted skip, within the limit.
    assert report["skipped_by_reason"].get("judge failed", 0) >= 1
    assert report["written"] == len(rows) == 12 - report["skipped"]
    for r in rows:
        assert r["reason"] == "server: longest" and r["judge"] == f"openai:judge-1@{server.url}"
        assert (len(r["chosen"]), r["chosen"]) > (len(r["rejected"]), r["rejected"])
    req = server.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["model"] == "judge-1"
    assert req["auth"] == "Bearer sekret" and req["temperature"] == 0.0
    assert len(server.requests) >= 13  # the 503 was retried


@pytest.mark.quick
def test_openai_judge_errors_are_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISTFT_TEST_KEY", raising=False)
    assert main([f"output={tmp_path / 'x.jsonl'}", *_openai("http://127.0.0.1:1/v1")]) == 2
    assert (
        "judge.api_key_env=DISTFT_TEST_KEY: that environment variable is not set" in capsys.readouterr().err
    )

    monkeypatch.setenv("DISTFT_TEST_KEY", "wrong")
    server = FakeJudgeServer("sekret")
    try:
        rc, _, _ = _run(tmp_path / "wrong_key", *_openai(server.url))
    finally:
        server.close()
    assert rc == 2
    assert "rejected the request (401" in capsys.readouterr().err

    # An endpoint that is down: retried, counted, then the command stops with the reason.
    down = f"http://127.0.0.1:{free_port()}/v1"
    rc, rows, _ = _run(tmp_path / "down", *_openai(down, "judge.retries=2", "max_consecutive_failures=2"))
    err = capsys.readouterr().err
    assert rc == 2 and rows == []
    assert (
        "the judge failed 2 times in a row" in err
        and f"{down}/chat/completions failed after 2 attempt(s)" in err
    )


@pytest.mark.quick
def test_parse_reply_tolerates_text_and_rejects_nonsense():
    v = parse_reply('The verdict: {"best": 1, "worst": 3, "reason": "clear"} done', 3)
    assert (v.best, v.worst, v.reason) == (0, 2, "clear")
    assert parse_reply('{"best": "2"}', 2).worst == 0  # two candidates: the other one is worst
    from distft.rlaif.judges import JudgeError

    for bad in ("no json", '{"best": 5, "worst": 1}', '{"best": 1, "worst": 1}', "[1, 2]"):
        with pytest.raises(JudgeError):
            parse_reply(bad, 3)


# ---------------------------------------------------------------------------- local HF judge
@pytest.mark.quick
def test_hf_judge_picks_by_verdict_logprobs_in_both_orders(tmp_path):
    from transformers import AutoModelForCausalLM

    rc, rows, _ = _run(tmp_path, "judge=hf", "num_samples=2", "num_prompts=4")
    assert rc == 0 and rows
    tok = _tokenizer(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "work" / "base_model").eval()
    from distft.rlaif.config import JudgeConfig

    template = JudgeConfig().template

    def p_a(prompt, a, b) -> float:
        """P(" A") against P(" B") after the judge prompt, from plain full-sequence log-softmax."""
        logps = []
        for verdict in (" A", " B"):
            head = tok(template.format(prompt=prompt, a=a, b=b))["input_ids"]
            tail = tok(verdict, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([head + tail])).logits[0]
            lp = torch.log_softmax(logits[:-1], -1)
            logps.append(sum(float(lp[len(head) - 1 + k, t]) for k, t in enumerate(tail)))
        return float(torch.softmax(torch.tensor(logps), 0)[0])

    for r in rows:
        c, rej = r["chosen"], r["rejected"]
        win = (p_a(r["prompt"], c, rej) + 1 - p_a(r["prompt"], rej, c)) / 2
        assert win > 0.5
        reported = [float(x) for x in re.findall(r"\d\.\d+", r["reason"])]
        assert any(abs(x - win) < 2e-3 for x in reported), (win, r["reason"])


@pytest.mark.quick
def test_hf_judge_with_a_reward_model_scores_each_completion(tmp_path):
    """judge=hf with a reward model (a one-output classifier, like a method=reward export): the
    chosen completion is the one it scores highest on prompt + completion + EOS."""
    from transformers import AutoModelForSequenceClassification

    from distft.config.load import load_config
    from distft.methods.reward import ScoreModel
    from distft.models.tiny import build_tiny

    base = build_tiny(tmp_path / "base", load_config([])[0].model)
    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    ScoreModel.from_pretrained(str(base)).save_pretrained(rm_dir)
    for f in base.glob("*token*"):
        (rm_dir / f.name).write_bytes(f.read_bytes())
    (rm_dir / "chat_template.jinja").write_bytes((base / "chat_template.jinja").read_bytes())
    rc, rows, _ = _run(tmp_path, "judge=hf", f"judge.model={rm_dir}", "num_prompts=4")
    assert rc == 0 and rows
    tok = _tokenizer(tmp_path)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    for r in rows:
        assert r["judge"] == f"reward-model:{rm_dir}"
        with torch.no_grad():
            c, rej = (float(rm(**tok(r["prompt"] + x + tok.eos_token, return_tensors="pt")).logits)
                      for x in (r["chosen"], r["rejected"]))  # fmt: skip
        assert c > rej and max(r["scores"]) == pytest.approx(c, abs=1e-4)


# ---------------------------------------------------------------------------- two ranks
@pytest.mark.slow
def test_two_ranks_shard_prompts_and_merge_in_order(tmp_path):
    out = tmp_path / "pairs.jsonl"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "distft.rlaif", f"output={out}", "judge.function=tests.test_rlaif:longest_judge",
        "num_prompts=10", "num_samples=3", "max_new_tokens=5", "batch_size=4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert [(r["rank"], r["prompts"]) for r in report["ranks"]] == [(0, 5), (1, 5)]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == report["written"] == 10 - report["skipped"] >= 8
    order = [p["prompt"] for p in default_prompts(10)]
    assert [order.index(r["prompt"]) for r in rows] == sorted(order.index(r["prompt"]) for r in rows)
    assert "wrote" in proc.stdout and not list(out.parent.glob("*.work/rlaif_part*"))


@pytest.mark.quick
def test_the_key_never_shows(tmp_path, monkeypatch, capsys):
    """A 401 body echoing the key, a judge reason quoting it, and the key pasted into
    judge.api_key_env: none of them prints or writes the key."""
    key = "sk-test-9f8e7d6c5b4a39281706"
    monkeypatch.setenv("DISTFT_TEST_KEY", key)
    server = FakeJudgeServer("another-key")
    try:
        rc, _, _ = _run(tmp_path / "wrong", *_openai(server.url))
    finally:
        server.close()
    err = capsys.readouterr().err
    assert rc == 2 and "rejected the request (401" in err and "Incorrect API key provided: [redacted]" in err
    assert key not in err

    server = FakeJudgeServer(key, reason="judged with {key}")
    try:
        rc, rows, _ = _run(tmp_path / "echo", *_openai(server.url), "max_failed_fraction=1")
    finally:
        server.close()
    out = capsys.readouterr()
    assert rc == 0 and rows and all(r["reason"] == "judged with Bearer [redacted]" for r in rows)
    assert key not in (tmp_path / "echo" / "pairs.jsonl").read_text() + out.out + out.err

    monkeypatch.delenv("DISTFT_TEST_KEY")
    args = [f"output={tmp_path / 'x.jsonl'}", *_openai(server.url)[:-3], f"judge.api_key_env={key}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "give the NAME of the environment variable" in err and key not in err
