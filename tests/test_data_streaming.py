"""Streamed data (issue 15 point 4): shards read per rank, global batches that do not depend on
the number of ranks, exact resume from the lanes' stored positions, the hashed split, and a real
2-rank streaming run stopped and resumed (on 1 rank) with the losses of the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from distft.config.load import load_config
from distft.data import pipeline, stream_shards
from distft.data.default_tasks import sft_rows
from distft.data.schemas import prompt_and_answer
from distft.data.stream import split_of
from distft.data.stream_sampler import StreamSampler
from distft.errors import ConfigError
from distft.methods import METHODS
from distft.models.tiny import build_tokenizer
from tests.util import train, train_losses


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")
    return path


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    rows = sft_rows(220, seed=3)
    rows[100:100] = [dict(r) for r in rows[90:100]]  # exact duplicates (dropped within a block)
    return [_write(root / "a.jsonl", rows[:150]), _write(root / "b.jsonl", rows[150:])]


def _data(tmp_path, tok, files, *overrides):
    paths = ",".join(str(f) for f in files)
    cfg, _ = load_config(
        [
            f"data.path=[{paths}]",
            "data.streaming=true",
            "train.max_steps=5",
            "data.stream_buffer=128",
            *overrides,
        ]
    )
    return cfg, pipeline.prepare_cached(
        cfg, METHODS["sft"](cfg, tok), tok, tmp_path / "run", True, quiet=True
    )


def _batches(data, world, accum, steps, start=0, saved=None, batch=8, snaps=()):
    """The global batches of steps [start, steps) built from `world` ranks' shares (one sampler per
    rank, as on real ranks), and the lanes' states (what trainer_state.json keeps) after the steps
    in `snaps`."""
    samplers = [StreamSampler(data.stream, batch, start, saved) for _ in range(world)]
    out, states = [], {}
    for step in range(start, steps):
        gb = []
        for rank, s in enumerate(samplers):
            for micro in s.rank_examples(step, rank, world, accum):
                gb += [tuple(x["input_ids"]) for x in micro]
        out.append(gb)
        if step + 1 in snaps:  # without a process group each sampler gathers only its own lanes
            lanes = {j: lane.state for s in samplers for lane in s.lanes for j in [lane.j]}
            states[step + 1] = json.loads(json.dumps({"lanes": [lanes[j] for j in range(batch)]}))
    return out, states, samplers


@pytest.mark.quick
def test_global_batches_do_not_depend_on_ranks_and_resume_exactly(tmp_path, tok, files, monkeypatch):
    monkeypatch.setattr(stream_shards, "SHARD_BYTES", 1000)  # several byte-range shards per file
    cfg, data = _data(tmp_path, tok, files)
    steps = 60  # ~180 train rows / 8 lanes: more than two epochs of every lane
    one, _, samplers = _batches(data, 1, 1, steps)
    assert samplers[0].epoch(steps) >= 2  # the lanes wrapped into later epochs
    assert len(samplers[0].stream.shards) % 8 == 0 and len(samplers[0].stream.shards) > 8
    two, states, _ = _batches(data, 2, 1, steps, snaps=(7, 31))
    assert two == one
    assert _batches(data, 4, 2, steps)[0] == one  # 4 ranks × 2 micro-batches of 1
    assert len({ex for gb in one[:10] for ex in gb}) > 60  # shuffled, not one row repeated

    # Resume from the lanes' stored state continues the same batches, on another number of ranks too.
    for stop, world in ((7, 1), (31, 4)):
        resumed = _batches(data, world, 1, steps, start=stop, saved=states[stop])[0]
        assert resumed == one[stop:], stop

    # The split hashes prompts: no val/test prompt is ever trained on; every kept train row is.
    held = {prompt_and_answer(r)[0] for r in [*data.val_rows, *data.test_rows]}
    assert held and all(split_of(r, cfg.train.seed, cfg.data.splits) != "train" for r in data.val_rows)
    seen = {tok.decode(ids) for gb in one for ids in gb}
    assert not any(p in s for s in seen for p in held)
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    train_rows = {
        r["prompt"] + r["completion"] for r in rows if split_of(r, cfg.train.seed, [8, 1, 1]) == "train"
    }
    assert {t.replace(tok.eos_token, "") for t in seen} == train_rows


@pytest.mark.quick
def test_shards_read_every_row_once_jsonl_and_parquet(tmp_path, files, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = [json.loads(line) for line in files[0].read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(want), tmp_path / "a.parquet", row_group_size=37)
    for size in (1, 500, 10**9):  # a byte range per line or less, a few lines, the whole file
        monkeypatch.setattr(stream_shards, "SHARD_BYTES", size)
        monkeypatch.setattr(stream_shards, "SHARD_ROWS", max(1, size // 40))
        for spec in (files[0], tmp_path / "a.parquet"):
            shards = stream_shards.plan([str(spec)], 0, lanes=3)
            reader = stream_shards.BlockReader(None, "error")
            got = []
            for shard in shards:
                pos = stream_shards.begin(shard)
                while pos < shard.end:
                    rows, end = reader.read(shard, pos, 7, [])
                    got += [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
                    if end == pos:
                        break
                    pos = end
            assert got == want, (spec, size)


@pytest.mark.quick
def test_streaming_refusals():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(["data.streaming=true"])
    with pytest.raises(ConfigError, match="method=sft"):
        load_config(["data.streaming=true", "method=dpo", "train.max_steps=3"])
    with pytest.raises(ConfigError, match="data.weights"):
        load_config(["data.streaming=true", "train.max_steps=3", "data.path=[a,b]", "data.weights=[1,2]"])


COMMON = [
    "strategy=ddp",
    "train.lr_scheduler=constant",
    "train.lr=1e-3",
    "train.eval_generate=false",
    "data.max_eval_generations=0",
    "data.max_eval_examples=16",
    "eval.test=false",
    "train.export=none",
    "model.num_layers=2",
    "data.streaming=true",
    "data.stream_buffer=64",
    "train.max_steps=6",
    "train.save_every=2",
    "train.keep_last=10",
]


@pytest.mark.slow
def test_streaming_run_resumed_on_one_rank_matches(tmp_path, files):
    paths = f"data.path=[{files[0]},{files[1]}]"
    full = tmp_path / "full"
    train(full, *COMMON, paths, "train.micro_batch_size=4")  # 2 ranks × 4
    state = json.loads((full / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert len(state["data_stream"]["lanes"]) == 8 and all(state["data_stream"]["lanes"])
    report = json.loads((full / "data_report.json").read_text())
    assert report["streaming"]["rows_scanned"] > 0 and report["splits"]["val"]["rows"] == 16
    # Resumed from step 2 into a new run dir, on 1 rank with the same global batch (1 × 8).
    resumed = tmp_path / "resumed"
    start = full / "checkpoints" / "step_2"
    train(resumed, *COMMON, paths, "train.micro_batch_size=8", f"resume={start}", plain=True)
    a, b = train_losses(full), train_losses(resumed)
    assert sorted(b) == [3, 4, 5, 6]
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in b)
    assert worst <= 1e-4, (a, b)
