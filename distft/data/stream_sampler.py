"""The global-batch sampler of a streamed train split (data.streaming=true).

Lane j of L (L = the global batch) gives example j of every global batch, so a rank reads only
its own lanes and the global batches are the same on any number of ranks. A lane's state is
{epoch, shard (index into the lane's shards of that epoch), pos (the current block's start), taken
(examples of that block already given), dry (shards in a row without an example)}: the checkpoint
stores every lane's state (trainer_state.json, key data_stream), and a resume re-reads one block
per lane and skips `taken` examples of it. Steps are read in order; a resume may change the
number of ranks but not the global batch.
"""

from __future__ import annotations

from distft.data.stream import Stream
from distft.errors import DataError
from distft.runtime import dist


class Lane:
    def __init__(self, stream: Stream, j: int, state: dict | None):
        self.stream, self.j = stream, j
        self.state = dict(state) if state else {"epoch": 0, "shard": 0, "pos": None, "taken": 0, "dry": 0}
        self._block: list[dict] | None = None
        self._end = 0
        self._shard_id = -1
        self._got = bool(state and state.get("taken"))

    def _load(self) -> None:
        s = self.state
        self._shard_id = self.stream.lane_shards(self.j, s["epoch"])[s["shard"]]
        if s["pos"] is None:
            s["pos"] = self.stream.begin(self._shard_id)
        block = self.stream.block(self._shard_id, s["pos"], s["epoch"])
        self._block, self._end = block.train, block.end

    def _advance(self) -> None:
        s, shard = self.state, self.stream.shards[self._shard_id]
        s["taken"] = 0
        self._block = None
        if self._end > s["pos"] and self._end < shard.end:
            s["pos"] = self._end  # the next block of this shard
            return
        s["dry"] = 0 if self._got else s["dry"] + 1
        self._got = False
        if s["dry"] > len(self.stream.shards):
            raise DataError(
                f"data.streaming: lane {self.j} of {self.stream.lanes} (one per example of the global batch) "
                f"read {s['dry']} shards in a row without a train example; the data is too small to stream "
                "with this global batch (lower train.micro_batch_size / grad_accum, or data.streaming=false)"
            )
        s["shard"], s["pos"] = s["shard"] + 1, None
        if s["shard"] == len(self.stream.shards) // self.stream.lanes:
            s["epoch"], s["shard"] = s["epoch"] + 1, 0

    def next(self) -> tuple[dict, str]:
        """The lane's next example and where it came from."""
        while True:
            if self._block is None:
                self._load()
            s = self.state
            if s["taken"] < len(self._block):
                ex = self._block[s["taken"]]
                where = f"lane {self.j} epoch {s['epoch']} shard {self._shard_id} @{s['pos']} #{s['taken']}"
                s["taken"] += 1
                self._got = True
                return ex, where
            self._advance()


class StreamSampler:
    """rank_examples(step, ...) for a stream; steps must come in order from the start step."""

    def __init__(self, open_stream, global_batch: int, start_step: int, saved: dict | None):
        self.stream: Stream = open_stream(global_batch)
        self.global_batch = global_batch
        lanes = self.stream.lanes
        if saved is not None and saved.get("lanes") and len(saved["lanes"]) != lanes:
            raise DataError(
                f"resume: the checkpoint's data stream has {len(saved['lanes'])} lanes (its global batch), "
                f"this run's global batch is {lanes}; a streamed run resumes with the same "
                "micro_batch_size × grad_accum × data-parallel ranks"
            )
        self.states: list[dict | None] = list(saved["lanes"]) if saved else [None] * lanes
        self.step = start_step
        self.lanes: list[Lane] = []
        self._last: tuple[int, list[list[dict]], list[str]] | None = None

    def epoch(self, step: int) -> float:
        """The epoch of this rank's first lane (streams have no exact epoch length)."""
        if not self.lanes:
            return 0.0
        s = self.lanes[0].state
        return s["epoch"] + s["shard"] / max(1, len(self.stream.shards) // self.stream.lanes)

    def rank_examples(self, step: int, rank: int, world: int, accum: int, train=None) -> list[list[dict]]:
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if step != self.step:
            raise RuntimeError(f"streamed data is read in order: step {step} asked, {self.step} expected")
        share = self.global_batch // world
        if not self.lanes:
            mine = range(rank * share, (rank + 1) * share)
            self.lanes = [Lane(self.stream, j, self.states[j]) for j in mine]
        got = [lane.next() for lane in self.lanes]
        micro = share // accum
        batches = [[ex for ex, _ in got[k * micro : (k + 1) * micro]] for k in range(accum)]
        self._last = (step, batches, [w for _, w in got])
        self.step += 1
        return batches

    def global_indices(self, step: int) -> list[str]:
        """Where this rank's examples of `step` came from (for the non-finite-step message)."""
        return self._last[2] if self._last is not None and self._last[0] == step else []

    def checkpoint_state(self) -> dict:
        """Every lane's state, gathered from all ranks (a collective), for trainer_state.json."""
        mine = {lane.j: dict(lane.state) for lane in self.lanes}
        for part in dist.all_gather_objects(mine):
            for j, state in part.items():
                self.states[int(j)] = state
        return {"data_stream": {"lanes": self.states, "shards": len(self.stream.shards)}}
