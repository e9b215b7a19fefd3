"""Packing at scale (issue 15 point 5): bin packing on lengths only, its efficiency in the data
report and in metrics, and length-grouped batches when packing is off."""

from __future__ import annotations

import random

import pytest

from distft.config.load import load_config
from distft.data import pipeline
from distft.data.collate import pack, pack_bins, packing_efficiency
from distft.data.sampler import GlobalBatchSampler
from distft.data.sft_format import Tokenized
from distft.methods import METHODS
from distft.models.tiny import build_tokenizer

pytestmark = pytest.mark.quick


def test_bins_of_a_20_to_2000_token_mix_are_95_percent_full():
    rng = random.Random(0)
    lengths = [rng.randint(20, 2000) for _ in range(5000)]
    bins = pack_bins(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each example once
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    assert all(b == sorted(b) for b in bins)
    assert packing_efficiency(lengths, len(bins), 2048) >= 0.95
    # Greedy packing in data order (the old way) leaves about a third empty on the same mix.
    greedy, cur = 0, 0
    for n in lengths:
        if cur and cur + n > 2048:
            greedy, cur = greedy + 1, 0
        cur += n
    assert packing_efficiency(lengths, greedy + 1, 2048) < 0.8


def test_pack_keeps_example_order_inside_a_sequence():
    exs = [Tokenized([i] * n, [i] * n, False) for i, n in enumerate((5, 2, 4, 3))]
    packed = pack(exs, 7)
    assert [r["input_ids"] for r in packed] == [[0] * 5 + [1] * 2, [2] * 4 + [3] * 3]
    assert packed[1]["position_ids"] == [0, 1, 2, 3, 0, 1, 2]


def test_packing_efficiency_in_report_and_metrics(tmp_path):
    tok = build_tokenizer()
    cfg, _ = load_config([f"data.cache_dir={tmp_path}", "data.packing=true", "data.num_examples=600"])
    data = pipeline.prepare_cached(cfg, METHODS["sft"](cfg, tok), tok, tmp_path / "run", True, quiet=True)
    eff = data.report["packing"]["efficiency"]
    tokens = sum(len(ex["input_ids"]) for ex in data.train)
    assert eff == round(tokens / (len(data.train) * cfg.data.max_length), 4) and eff > 0.9
    assert data.metrics == {"packing/efficiency": eff}
    assert "packed sequences (non-padding)" in pipeline.data_report.table(data.report)


def test_length_grouped_batches_pad_less_and_ignore_world_size():
    rng = random.Random(1)
    lengths = [rng.randint(5, 500) for _ in range(4096)]
    plain = GlobalBatchSampler(4096, 32, seed=3)
    grouped = GlobalBatchSampler(4096, 32, seed=3, lengths=lengths)

    def padded(sampler, micro):
        total = 0
        for step in range(sampler.steps_per_epoch):
            ids = sampler.global_indices(step)
            for k in range(0, len(ids), micro):
                total += micro * max(lengths[i] for i in ids[k : k + micro])
        return total

    assert padded(grouped, 8) < 0.7 * padded(plain, 8)
    epoch = [i for s in range(grouped.steps_per_epoch) for i in grouped.global_indices(s)]
    assert sorted(epoch) == list(range(4096))  # every example once per epoch
    for world, accum in ((1, 4), (2, 2), (4, 1)):
        ranks = [grouped.rank_micro_batches(5, r, world, accum) for r in range(world)]
        assert [i for share in ranks for m in share for i in m] == grouped.global_indices(5)
    assert grouped.global_indices(0) != grouped.global_indices(grouped.steps_per_epoch)
