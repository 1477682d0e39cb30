"""The replicate tables' statistics against float64 references: Student's t quantile in closed form
(1 and 2 degrees of freedom), published table values, the normal limit; and against scipy.stats where
it is installed."""
from __future__ import annotations

import math
import random
import statistics

import pytest

from megatron_tgdpo.pipeline.statistics import (bootstrap_interval, compare, mean, paired_differences, sample_sd,
                                                t_interval, t_quantile, win_tie_loss)

VALUES = [0.012, -0.004, 0.031, 0.02, 0.0, 0.017, -0.011, 0.026]


@pytest.mark.parametrize("p", [0.5, 0.6, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_closed_forms(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10, abs=1e-12)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10, abs=1e-12)
    assert t_quantile(p, 1e7) == pytest.approx(statistics.NormalDist().inv_cdf(p), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("p,df,table", [(0.975, 3, 3.1824463), (0.975, 4, 2.7764451), (0.975, 7, 2.3646243),
                                        (0.975, 12, 2.1788128), (0.975, 30, 2.0422725), (0.995, 3, 5.8409093),
                                        (0.9, 7, 1.4149239)])
def test_t_quantile_matches_published_tables(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=6e-8)


@pytest.mark.parametrize("n", [2, 3])
def test_t_interval_is_mean_plus_minus_t_times_standard_error(n):
    values = VALUES[:n]
    m = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))
    q = {2: math.tan(math.pi * 0.475), 3: 0.95 / math.sqrt(2 * 0.975 * 0.025)}[n]  # closed forms, df 1 and 2
    assert sample_sd(values) == pytest.approx(statistics.stdev(values), rel=1e-12) == sd
    assert t_interval(values) == pytest.approx((m - q * sd / math.sqrt(n), m + q * sd / math.sqrt(n)), rel=1e-10)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_t_interval_and_sd_match_scipy(n):
    stats = pytest.importorskip("scipy.stats")
    values = VALUES[:n]
    assert sample_sd(values) == pytest.approx(statistics.stdev(values), rel=1e-12)
    expected = stats.t.interval(0.95, n - 1, loc=statistics.fmean(values), scale=stats.sem(values))
    assert t_interval(values) == pytest.approx(expected, rel=1e-9)
    # the paired t-test's verdict is the interval's
    p = stats.ttest_1samp(values, 0.0).pvalue
    assert compare(values).significant == (p < 0.05)


def test_bootstrap_interval_is_the_percentile_interval_of_resampled_means():
    lo, hi = bootstrap_interval(VALUES, resamples=4000, seed=3)
    rng = random.Random(3)
    means = sorted(math.fsum(rng.choice(VALUES) for _ in VALUES) / len(VALUES) for _ in range(4000))
    assert (lo, hi) == (means[99], means[3899])  # 2.5 % and 97.5 % order statistics of 4000
    assert lo < mean(VALUES) < hi


def test_paired_differences_win_tie_loss_and_small_samples():
    assert paired_differences({1: 0.5, 2: 0.7, 3: 0.1}, {2: 0.6, 1: 0.5}) == [0.0, pytest.approx(0.1)]
    assert win_tie_loss([0.1, 0.0, -0.2, 0.3]) == (2, 1, 1)
    one = compare([0.05])
    assert one.significant is None and math.isnan(one.sd) and "(n=1)" in one.describe()
    both = compare([0.1, 0.12, 0.11, 0.13])
    assert both.significant is True and both.describe().endswith("4/0/0 *")


def test_comparison_table_pairs_each_model_with_dpo_by_seed():
    from megatron_tgdpo.pipeline.report import format_comparison_table, paired_comparisons

    per_seed = [{"dpo": {"greedy_score": 0.5}, "tgdpo-a0.5": {"greedy_score": 0.6}, "ipo": {"greedy_score": 0.4}},
                {"dpo": {"greedy_score": 0.7}, "tgdpo-a0.5": {"greedy_score": 0.82}, "ipo": {"greedy_score": 0.75}},
                {"dpo": {"greedy_score": 0.6}, "tgdpo-a0.5": {"greedy_score": 0.71}, "ipo": {"greedy_score": 0.6}}]
    found = paired_comparisons(per_seed, ["tgdpo-a0.5", "ipo"])
    tg = found["tgdpo-a0.5"]["greedy_score"]
    diffs = [0.1, 0.12, 0.11]
    assert tg.mean == pytest.approx(0.11) and tg.sd == pytest.approx(statistics.stdev(diffs))
    half = (0.95 / math.sqrt(2 * 0.975 * 0.025)) * statistics.stdev(diffs) / math.sqrt(3)  # t(0.975, df 2)
    assert (tg.t_low, tg.t_high) == (pytest.approx(0.11 - half), pytest.approx(0.11 + half))
    assert (tg.wins, tg.ties, tg.losses) == (3, 0, 0) and tg.significant
    ipo = found["ipo"]["greedy_score"]
    assert (ipo.wins, ipo.ties, ipo.losses) == (1, 1, 1) and ipo.significant is False
    text = format_comparison_table(per_seed, ["tgdpo-a0.5", "ipo"]).splitlines()
    assert text[2].startswith("TGDPO (alpha 0.5)") and text[2].rstrip().endswith("yes")
    assert text[3].startswith("IPO") and text[3].rstrip().endswith("no")
    assert text[-1] == "significant (t interval excludes 0): TGDPO (alpha 0.5) greedy score +0.110"


def test_rto_comparison_reports_sample_sd_and_paired_differences(tmp_path):
    import json
    from types import SimpleNamespace

    from megatron_tgdpo.ppo.compare import report

    seeds = {}
    for seed, (sparse, rto) in enumerate([(0.5, 0.6), (0.7, 0.75), (0.6, 0.68)], start=1):
        runs = {}
        for name, final in (("sparse_ppo", sparse), ("rto", rto)):
            (tmp_path / f"{name}{seed}" / "log").mkdir(parents=True)
            rows = [{"rollout_samples": n, "score": final * n / 8, "exact_match": 0.0} for n in (4, 8)]
            (tmp_path / f"{name}{seed}" / "log" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            runs[name] = str(tmp_path / f"{name}{seed}")
        seeds[seed] = {"sft": {"score": 0.2, "exact_match": 0.0}, "dpo": {"2": {"score": 0.5, "exact_match": 0.0}},
                       **runs}
    args = SimpleNamespace(samples_per_prompt=4, reward_model_prompts=1, dpo_prompts=[2], task="sort",
                           heldout_prompts=10, sparse_reward="verifier", kl_coef=0.01, dense_reward_clip=0.05,
                           ppo_loss_averaging="sequence", vary_sft=False)
    text = report(args, tmp_path, {"seeds": seeds})
    sd = statistics.stdev([0.5, 0.7, 0.6])  # sample SD, not the population's
    assert f"| sparse PPO (8 rollout samples) | 0.000 ± 0.000 | 0.600 ± {sd:.3f} |" in text
    rto_line = next(line for line in text.splitlines() if line.startswith("| RTO") and "[" in line)
    diffs = [0.1, 0.25, 0.18]  # RTO's final score minus DPO's, by seed
    half = (0.95 / math.sqrt(2 * 0.975 * 0.025)) * statistics.stdev(diffs) / math.sqrt(3)
    mean_ = statistics.fmean(diffs)
    assert rto_line.split("|")[3].strip() == f"{mean_:+.3f} [{mean_ - half:+.3f}, {mean_ + half:+.3f}] 3/0/0"
    # RTO against sparse PPO, paired by seed: 0.1, 0.05, 0.08
    versus_sparse = text[text.index("paired difference to sparse PPO"):]
    rto_vs_sparse = next(line for line in versus_sparse.splitlines() if line.startswith("| RTO"))
    diffs = [0.1, 0.05, 0.08]
    half = (0.95 / math.sqrt(2 * 0.975 * 0.025)) * statistics.stdev(diffs) / math.sqrt(3)
    mean_ = statistics.fmean(diffs)
    assert rto_vs_sparse.split("|")[3].strip() == f"{mean_:+.3f} [{mean_ - half:+.3f}, {mean_ + half:+.3f}] 3/0/0 *"
    # Both improved on SFT (0.2): the sample-efficiency sentence is there.
    assert "RTO's mean first reaches it at" in text
