"""The pipeline's controls and cross-fitting, without training: the constant control's weight is the
TGDPO run's mean rejected-token weight, and every pair's cross-fitted score comes from the guidance
model of the other half."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_tgdpo.guidance.score_file import read_score_file
from megatron_tgdpo.pipeline.config import preset
from megatron_tgdpo.pipeline.controls import constant_rejected_weight, control_problems, crossfit_scores
from megatron_tgdpo.pipeline.stages import PipelineError


def test_constant_weight_is_the_mean_of_the_logged_rejected_means(tmp_path):
    rows = [{"iteration": 1, "weights/rejected_mean": 1.25, "loss": 0.7}, {"iteration": 2, "loss": 0.6},
            {"iteration": 3, "weights/rejected_mean": 1.0}, {"iteration": 4, "weights/rejected_mean": 1.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert constant_rejected_weight(path) == pytest.approx((1.25 + 1.0 + 1.5) / 3)
    path.write_text(json.dumps({"iteration": 1, "loss": 0.7}) + "\n")
    with pytest.raises(PipelineError, match="no finite weights/rejected_mean"):
        constant_rejected_weight(path)


def _cache(path, *, ref, guide, lengths):
    path.mkdir()
    np.save(path / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(path / "reference.npy", np.asarray(ref, dtype=np.float32))
    np.save(path / "guidance.npy", np.asarray(guide, dtype=np.float32))


def test_each_pair_is_scored_by_the_other_halfs_guidance(tmp_path):
    lengths = [2, 1, 1, 3, 2, 2]  # 3 pairs: (chosen, rejected) token counts
    tokens = sum(lengths)
    ref = np.linspace(-2.0, -0.5, tokens)
    guide = {"A": ref + np.arange(tokens) * 0.25, "B": ref - np.arange(tokens) * 0.5}
    for half in "AB":
        _cache(tmp_path / half, ref=ref, guide=guide[half], lengths=lengths)
    out = tmp_path / "scores.jsonl"
    crossfit_scores(caches={h: tmp_path / h for h in "AB"}, halves=2, num_pairs=3, beta=0.5, output=out)
    scores = read_score_file(out)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for pair in range(3):
        other = "B" if pair % 2 == 0 else "A"  # pair 0 and 2 are in half A: guided by B's model
        for side in (0, 1):
            q = 2 * pair + side
            span = slice(offsets[q], offsets[q + 1])
            expected = 0.5 * (guide[other][span].astype(np.float32).astype(np.float64)
                              - ref[span].astype(np.float32).astype(np.float64))
            assert scores[pair][side] == pytest.approx(expected.tolist(), abs=1e-12)


def test_controls_need_the_runs_they_control():
    assert control_problems(("sft", "dpo", "tgdpo-shuffled")) == [
        "tgdpo-shuffled needs tgdpo: it is a control of the main TGDPO run"]
    assert preset("smoke", methods=("sft", "dpo", "tgdpo", "tgdpo-shuffled", "tgdpo-constant",
                                    "tgdpo-crossfit")).problems() == []
    assert any("unknown methods" in p for p in preset("smoke", methods=("sft", "dpo", "bogus")).problems())
