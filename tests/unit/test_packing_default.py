"""Packed rows and shared prompts by default: the trainer, its YAML, PPO (rows only) and the pipeline presets; the
virtual-stage plan (one row length per step, a multiple of PP micro-batches) against hand counts; and
bench_step's single-stage positions against a hand count."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_tgdpo.config import ConfigError, parse_args
from megatron_tgdpo.data.collate import PreferenceCollator
from megatron_tgdpo.data.packing import PackedPreferenceCollator, plan_packing


def test_trainer_packs_by_default_and_no_pack_sequences_keeps_rows(tmp_path):
    assert parse_args(["--train-iters", "1"]).pack_sequences is True
    assert parse_args(["--train-iters", "1", "--no-pack-sequences"]).pack_sequences is False
    yaml = tmp_path / "run.yaml"
    yaml.write_text("train_iters: 1\npack_sequences: false\n")
    assert parse_args(["--config", str(yaml)]).pack_sequences is False


def test_prompts_are_shared_by_default_where_the_attention_is_verified(monkeypatch):
    from megatron_tgdpo import compat
    from megatron_tgdpo.config import shares_prompt, validate

    base = ["--train-iters", "1"]
    shape = dict(world_size=1, num_heads=4, num_query_groups=4, num_layers=2)
    monkeypatch.setattr(compat, "te_available", lambda: False)  # the local attention
    assert parse_args(base).share_prompt is None  # unset: shares_prompt decides
    assert shares_prompt(parse_args(base)) is True
    assert shares_prompt(parse_args(base + ["--no-share-prompt"])) is False
    assert shares_prompt(parse_args(base + ["--context-parallel-size", "2"])) is True
    # SFT rows are single sequences: nothing to share, asked for or not (the packer and the start-up line
    # both read this one rule).
    assert shares_prompt(parse_args(base + ["--loss-type", "sft"])) is False
    assert shares_prompt(parse_args(base + ["--loss-type", "sft", "--share-prompt"])) is False
    # Padded rows share nothing, and the default is no reason to refuse them; asking for both is refused.
    assert shares_prompt(parse_args(base + ["--no-pack-sequences"])) is False
    assert not [p for p in validate(parse_args(base + ["--no-pack-sequences"]), **shape) if "share-prompt" in p]
    assert [p for p in validate(parse_args(base + ["--no-pack-sequences", "--share-prompt"]), **shape)
            if "share-prompt" in p] == ["--share-prompt needs --pack-sequences (the prompt is shared inside a packed row)"]
    monkeypatch.setattr(compat, "te_available", lambda: True)  # TransformerEngine: only when asked for
    assert shares_prompt(parse_args(base)) is False
    assert shares_prompt(parse_args(base + ["--share-prompt"])) is True
    assert not [p for p in validate(parse_args(base + ["--context-parallel-size", "2"]), **{**shape, "world_size": 2})
                if "share-prompt" in p]


def test_ppo_trains_rows_and_refuses_the_flag_by_name(tmp_path):
    from megatron_tgdpo.ppo.cli import parse

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"{i}+1=", "task": "addition",
                                           "answer": str(i + 1)}) + "\n" for i in range(4)))
    argv = ["--prompts", str(prompts), "--reward", "sparse", "--train-iters", "1"]
    assert parse(argv)[1].pack_sequences is False
    for flag in ("--pack-sequences", "--no-pack-sequences"):
        with pytest.raises(ConfigError, match="--pack-sequences does not apply to PPO"):
            parse(argv + [flag])


def test_pipeline_presets_name_their_layout():
    from megatron_tgdpo.pipeline.config import PipelineConfig, preset
    from megatron_tgdpo.pipeline.training import sft_flags

    assert PipelineConfig().pack_sequences and preset("demo").pack_sequences and preset("smoke").pack_sequences
    assert not preset("full").pack_sequences  # docs/results.md was measured with padded rows
    where = dict(seed=1, data=Path("d"), save=Path("s"), log_dir=Path("l"))
    assert "--no-pack-sequences" in sft_flags(preset("full"), **where)
    assert "--pack-sequences" in sft_flags(preset("demo"), **where)
    # Shared prompts: the trainer's default unless a run names them (no flag: earlier runs' specs match).
    from megatron_tgdpo.replicate import build_parser, config_from_args

    assert preset("credit").share_prompt is None and not [f for f in sft_flags(preset("credit"), **where)
                                                          if "share-prompt" in f]
    for flag, expected in (("--no-share-prompt", False), ("--share-prompt", True)):
        cfg = config_from_args(build_parser().parse_args(["--preset", "credit", flag]))
        assert cfg.share_prompt is expected and flag in sft_flags(cfg, **where)
    padded = config_from_args(build_parser().parse_args(["--preset", "full", "--share-prompt"]))
    assert [p for p in padded.problems() if "share-prompt" in p] == [
        "--share-prompt needs packed rows (the prompt is shared inside a packed row): drop --no-pack-sequences or "
        "--share-prompt"]


# Pairs (prompt 2, chosen 4, rejected 4): two sequences of 6 tokens, 12 a pair (CP 1 pads to 2: none).
SEVEN = [(2, 4, 4)] * 7


def test_plan_without_groups_or_uniform_rows_is_first_fit_decreasing():
    plan = plan_packing(SEVEN, capacity=36, pad_to_multiple_of=4)
    assert plan.bins == ((0, 1, 2), (3, 4, 5), (6,))
    assert plan.row_length is None and plan.padding_bins == 0
    assert plan.computed_tokens == 36 + 36 + 12


def test_uniform_rows_in_groups_of_two_spread_the_pairs():
    # First-fit-decreasing: 36 + 36 + 12 in 3 bins; a 4th (empty) one for the group of 2, every row 36
    # long: 4 x 36 = 144. Spread over 4 bins (emptiest first, ties to the lower bin): pairs 0..3 one
    # each, then 4, 5, 6 into bins 0, 1, 2: loads 24, 24, 24, 12 -> rows of 24: 4 x 24 = 96. 96 wins.
    plan = plan_packing(SEVEN, capacity=36, pad_to_multiple_of=4, bin_multiple=2, uniform_rows=True)
    assert plan.bins == ((0, 4), (1, 5), (2, 6), (3,))
    assert (plan.row_length, plan.padding_bins, plan.computed_tokens, plan.real_tokens) == (24, 0, 96, 84)


def test_uniform_rows_keep_first_fit_when_spreading_does_not_help():
    # 6 pairs: FFD 2 full bins of 36 (a multiple of 2 already); spread over 2 bins: the same 36 each. Tie:
    # first-fit-decreasing is kept.
    plan = plan_packing(SEVEN[:6], capacity=36, pad_to_multiple_of=4, bin_multiple=2, uniform_rows=True)
    assert plan.bins == ((0, 1, 2), (3, 4, 5))
    assert (plan.row_length, plan.padding_bins, plan.computed_tokens) == (36, 0, 72)
    # 1 pair in groups of 2: one bin of 12 and an empty one, rows of 12 (not the 36 capacity).
    one = plan_packing(SEVEN[:1], capacity=36, pad_to_multiple_of=4, bin_multiple=2, uniform_rows=True)
    assert (one.bins, one.row_length, one.padding_bins, one.computed_tokens) == (((0,),), 12, 1, 24)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uniform_plan_builds_every_bin_at_its_row_length(seed):
    rng = np.random.default_rng(seed)
    lengths = np.stack([rng.integers(1, 20, 40), rng.integers(1, 30, 40), rng.integers(1, 30, 40)], axis=1)
    collator = PackedPreferenceCollator(pad_id=0, pad_to_multiple_of=8)
    plan = collator.plan(lengths, capacity=128, bin_multiple=4, uniform_rows=True)
    assert (plan.num_bins + plan.padding_bins) % 4 == 0
    assert sorted(i for b in plan.bins for i in b) == list(range(40))
    assert plan.row_length % 8 == 0 and plan.row_length <= 128
    fixed = PackedPreferenceCollator(pad_id=0, pad_to_multiple_of=8, fixed_length=plan.row_length)
    items = [{"prompt": np.arange(p) + 1, "chosen": np.arange(c) + 1, "rejected": np.arange(r) + 1, "index": i}
             for i, (p, c, r) in enumerate(lengths)]
    rows = [fixed([items[i] for i in b]) for b in plan.bins] + [fixed.padding_batch()] * plan.padding_bins
    assert {row.shape[1] for row in rows} == {plan.row_length}
    assert sum(row.num_tokens for row in rows) == plan.computed_tokens
    # never more than the fixed rows of 2 x micro-batch x seq-length (the capacity) in groups of 4
    assert plan.computed_tokens <= -(-plan_packing(lengths, capacity=128).num_bins // 4) * 4 * 128


def test_bench_step_single_stage_positions_by_hand():
    from suite import load_tool

    bs = load_tool("bench_step")
    lengths = np.array([[3, 5, 2], [4, 9, 1]])  # longest row: 4 + 9 = 13
    items = [{"prompt": np.arange(p) + 1, "chosen": np.arange(c) + 1, "rejected": np.arange(r) + 1, "index": i}
             for i, (p, c, r) in enumerate(lengths)]
    padded = PreferenceCollator(pad_id=0, pad_to_multiple_of=8, fixed_length=64)(items)
    from megatron_tgdpo.data.batch import Batch

    batch = Batch.from_rows(padded, num_pairs=2, real_tokens=31)
    assert batch.num_tokens == 4 * 64  # under PP: --seq-length
    assert bs.single_stage_positions(batch, lengths, multiple=8) == 4 * 16  # 4 rows of 13 -> 16
    # segments (each sequence to a multiple of 2 x CP = 2): 3+5=8, 3+2=5->6, 4+9=13->14, 4+1=5->6: 34
    packed = PackedPreferenceCollator(pad_id=0, fixed_length=64)(items)
    assert packed.num_tokens == 64
    assert bs.single_stage_positions(packed, lengths, multiple=8) == 40
    assert bs.single_stage_positions(packed, lengths, multiple=24) == 48
    # shared prompts: prompt segments 2 and 3 (not padded), responses 1+5=6, 1+2=3->4, 1+9=10, 1+1=2: 27
    shared = PackedPreferenceCollator(pad_id=0, fixed_length=64, share_prompt=True)(items)
    assert bs.single_stage_positions(shared, lengths, multiple=8) == 32
    assert bs.single_stage_positions(PackedPreferenceCollator(pad_id=0, fixed_length=64).padding_batch(), lengths,
                                      multiple=8) == 0


def test_virtual_stage_rows_of_the_70b_example_scaled_down_stay_under_1_05():
    # docs/performance.md's layout: PP 2 x VPP 2, micro-batch 1, --seq-length 128 (bins of 256), 128 pairs a
    # step, lengths x 1/16 of the UltraFeedback-like distribution. Rows of the full 256 with an empty
    # micro-batch for odd bin counts computed 1.04-1.06 positions per real token; choosing the row length
    # per step brings every step under 1.05 and never above the fixed rows.
    from suite import load_tool

    bs = load_tool("bench_step")
    lengths, _ = bs.fit_lengths(bs.draw_lengths(384, scale=0.0625, seed=1234), 128)
    for step in range(3):
        window = lengths[128 * step: 128 * (step + 1)]
        plan = plan_packing(window, capacity=256, pad_to_multiple_of=16, bin_multiple=2, uniform_rows=True)
        fixed = plan_packing(window, capacity=256, pad_to_multiple_of=16, fixed_length=256)
        assert plan.computed_tokens / plan.real_tokens <= 1.05
        assert plan.computed_tokens <= (fixed.num_bins + fixed.num_bins % 2) * 256
        assert (plan.num_bins + plan.padding_bins) % 2 == 0
