"""tools/bench_vs_trl.py without TRL: the flags this project's runs get (parsed by the trainer's own
parser), the pairs both sides read (the prepared set in the sampler's order equals TRL's list) and the
report arithmetic. The tool itself runs TRL and is rerun by hand (docs/performance.md)."""
from __future__ import annotations

import json
import math

import pytest

from suite import load_tool


def _args(*argv: str):
    return load_tool("bench_vs_trl").parser().parse_args(list(argv))


@pytest.mark.parametrize("argv,flag", [
    (["--global-batch-size", "6", "--micro-batch-size", "4"], "--global-batch-size"),
    (["--pairs", "16"], "--pairs"),
    (["--num-query-groups", "3"], "--num-attention-heads"),
    (["--rounds", "0"], "--rounds"),
    (["--vocab-size", "32"], "--vocab-size"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, flag, capsys):
    bench = load_tool("bench_vs_trl")
    assert flag in bench.check(_args(*argv))
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and "\n" not in err


@pytest.mark.parametrize("variant,packed", [("padded", False), ("packed", True)])
def test_project_runs_get_the_compared_settings(variant, packed, tmp_path):
    from megatron_tgdpo.config import parse_args

    bench = load_tool("bench_vs_trl")
    args = _args("--beta", "0.2", "--lr", "3e-4", "--clip-grad", "0.5", "--adam-beta2", "0.99",
                 "--weight-decay", "0.01", "--micro-batch-size", "2", "--global-batch-size", "8")
    cfg = parse_args(bench.project_flags(variant, work=tmp_path, args=args, steps=5, run_dir=tmp_path / "run"))
    assert cfg.pack_sequences is packed
    assert (cfg.loss_type, cfg.beta, cfg.lr, cfg.min_lr, cfg.lr_decay_style, cfg.lr_warmup_fraction) == \
        ("dpo", 0.2, 3e-4, 0.0, "constant", 0.0)
    assert (cfg.clip_grad, cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay) == (0.5, 0.9, 0.99, 0.01)
    assert (cfg.micro_batch_size, cfg.global_batch_size, cfg.train_iters, cfg.seed) == (2, 8, 5, 1234)
    assert cfg.load == cfg.ref_load == str(tmp_path / "model") and not cfg.bf16


def test_both_sides_read_the_same_pairs_in_the_same_order(tmp_path):
    from megatron_tgdpo.data import PreferenceDataset, PreferenceSampler

    bench = load_tool("bench_vs_trl")
    args = _args("--pairs", "40", "--global-batch-size", "8", "--micro-batch-size", "4", "--seed", "7")
    (tmp_path / "data").mkdir()
    data = bench.write_pairs(tmp_path, args)
    ordered = json.loads((tmp_path / "pairs_in_order.json").read_text())
    dataset = PreferenceDataset(str(tmp_path / "data" / "pairs"))
    sampler = PreferenceSampler(len(dataset), micro_batch_size=4, data_parallel_rank=0, data_parallel_size=1,
                                seed=7)
    served = [dataset[i] for _ in range(10) for i in next(sampler)]
    assert len(ordered) == len(served) == 40
    for mine, theirs in zip(served, ordered):
        for key in ("prompt", "chosen", "rejected"):
            assert list(map(int, mine[key])) == theirs[f"{key}_ids"]
    assert [p["prompt_ids"] for p in ordered] != sorted(p["prompt_ids"] for p in ordered)  # shuffled
    per_pair = [2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in ordered]
    assert data["steps"] == 5 and data["real_tokens_per_step"] == [sum(per_pair[i:i + 8]) for i in range(0, 40, 8)]


def test_speed_is_steps_after_the_first_and_ratios_are_project_over_trl():
    bench = load_tool("bench_vs_trl")
    tokens = [100, 200, 300]

    def run(times, loss, rss):
        return {"step_time_s": times, "loss": loss, "logps_chosen": [-1.0], "logps_rejected": [-2.0],
                "grad_norm": [3.0], "peak_rss_bytes": rss, "process_cpu_s": 1.0}

    assert bench.real_tokens_per_s(run([9.0, 1.0, 4.0], [0.0], 0), tokens) == pytest.approx(500 / 5)
    runs = {bench.TRL: [run([1, 1, 1], [0.5, 0.4], 4 * 2**20), run([1, 2, 2], [0.5, 0.4], 6 * 2**20)],
            "packed": [run([1, 0.5, 0.5], [0.5, 0.41], 2 * 2**20), run([1, 1, 1], [0.5, 0.41], 2 * 2**20)]}
    summary = bench.summarize([bench.TRL, "packed"], runs, tokens)
    assert summary[bench.TRL]["real_tokens_per_s"]["median"] == pytest.approx((250 + 125) / 2)
    assert summary["packed"]["speed_ratio"] == pytest.approx(((500 + 250) / 2) / ((250 + 125) / 2))
    assert summary["packed"]["rss_ratio"] == pytest.approx(2 / 5)
    assert summary["packed"]["loss_diff"] == pytest.approx([0.0, 0.01])
    assert math.isfinite(summary["packed"]["loss_spread_over_rounds"])
    assert "packed" in bench.table(summary, [bench.TRL, "packed"])


def test_positions_per_real_token_and_the_bound_are_over_the_timed_steps():
    bench = load_tool("bench_vs_trl")
    tokens = [100, 200, 300]

    def run(positions):
        return {"step_time_s": [1.0, 1.0, 1.0], "loss": [0.5], "logps_chosen": [-1.0], "logps_rejected": [-2.0],
                "grad_norm": [3.0], "peak_rss_bytes": 2**20, "process_cpu_s": 1.0, "computed_positions": positions}

    # step 1 (untimed) differs wildly: it must not count
    runs = {bench.TRL: [run([999, 300, 450])], "packed": [run([1, 220, 280])]}
    summary = bench.summarize([bench.TRL, "packed"], runs, tokens)
    assert summary[bench.TRL]["positions_per_real_token"] == pytest.approx(750 / 500)
    assert summary["packed"]["positions_per_real_token"] == pytest.approx(500 / 500)
    assert summary["packed"]["position_bound"] == pytest.approx(1.5)
    assert summary[bench.TRL]["position_bound"] == pytest.approx(1.0)
    text = bench.table(summary, [bench.TRL, "packed"])
    assert "1.500" in text and "1.50" in text and "bound" in text
