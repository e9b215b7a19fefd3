"""Run report: plots and index.html written at the end of a real run and by `distft-report`;
a report failure never fails training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.util import REPO, env, train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    train(run, "train.max_steps=6", "train.eval_every=3", "train.export=none")
    return run


@pytest.mark.slow
def test_report_written_at_the_end_of_a_run(run):
    report = run / "report"
    for stem in ("loss", "eval", "lr", "throughput", "mfu", "memory"):
        png = report / f"{stem}.png"
        assert png.read_bytes()[:8] == PNG, stem
    page = (report / "index.html").read_text()
    for stem in ("loss", "eval", "throughput", "mfu", "memory"):
        assert f"src='{stem}.png'" in page
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['eval/loss']:.4g}" in page  # final metrics
    assert "strategy:" in page and "micro_batch_size" in page  # the config


@pytest.mark.slow
def test_distft_report_command_rewrites_it(run):
    for p in (run / "report").iterdir():
        p.unlink()
    out = subprocess.run(
        [sys.executable, "-m", "distft.report.cli", str(run)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(run / "report" / "index.html")
    assert (run / "report" / "loss.png").read_bytes()[:8] == PNG


@pytest.mark.quick
def test_distft_report_refuses_a_dir_without_metrics(tmp_path):
    from distft.report.cli import main

    assert main([str(tmp_path)]) == 2


@pytest.mark.quick
def test_report_from_metrics_alone_skips_missing_series_and_torn_lines(tmp_path):
    from distft.report import write_report

    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "tokens_per_s": 100.0 + s} for s in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo'  # a crash mid-line
    (tmp_path / "metrics.jsonl").write_text(text)
    page = write_report(tmp_path).read_text()
    names = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert names == ["loss.png", "lr.png", "throughput.png"]  # no mfu / memory / eval series logged
    assert "(no config.yaml)" in page


@pytest.mark.quick
def test_a_failing_report_does_not_fail_training(tmp_path, capsys):
    from distft.engine.finish import write_report as _write_report

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "report").write_text("a file where the report directory should go")
    _write_report(tmp_path)  # must not raise
    assert "run report not written" in capsys.readouterr().out


@pytest.mark.quick
def test_eval_plot_has_legend_and_y_label_and_summary_keys_are_not_doubled(tmp_path):
    from distft.report import write_report
    from distft.report.plots import figures

    rows = [
        {"step": 0, "eval/exact_match": 0.0},
        {"step": 1, "loss": 2.0},
        {"step": 2, "eval/exact_match": 0.5},
    ]
    (eval_fig,) = [fig for stem, fig in figures(rows) if stem == "eval"]
    ax = eval_fig.axes[0]
    assert ax.get_ylabel() == "exact_match"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["exact_match"]
    rows.append({"step": 2, "eval/accuracy": 0.25})
    ax = [fig for stem, fig in figures(rows) if stem == "eval"][0].axes[0]
    assert ax.get_ylabel() == "score" and len(ax.get_legend().get_texts()) == 2
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"test": {"test/loss": 1.5, "test/exact_match": 0.5}, "after": {"exact_match": 0.5}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = write_report(tmp_path).read_text()
    assert "<th>test/loss</th>" in page and "<th>after/exact_match</th>" in page
    assert "test/test/" not in page


@pytest.mark.quick
def test_background_report_draws_every_plot_and_writes_the_page_and_fails_loudly(tmp_path):
    from distft.report import BackgroundReport

    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in (1, 2)]
    rows.append({"step": 2, "eval/loss": 0.9, "eval/exact_match": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = BackgroundReport(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"export": "written while the plots are drawn"}))
    page = report.finish().read_text()
    names = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert names == ["eval.png", "loss.png", "lr.png"]
    assert "written while the plots are drawn" in page  # the page reads summary.json at finish()
    assert all((tmp_path / "report" / n).read_bytes()[:8] == PNG for n in names)
    assert "src='eval.png'" in page and "<th>eval/exact_match</th>" in page

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.jsonl").write_text((tmp_path / "metrics.jsonl").read_text())
    (tmp_path / "broken" / "report").write_text("a file where the report directory should go")
    failing = BackgroundReport(tmp_path / "broken")
    with pytest.raises(OSError):
        failing.finish()
