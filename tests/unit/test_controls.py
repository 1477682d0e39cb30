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


def _stage_specs(work, methods, monkeypatch) -> dict:
    """Every stage one seed of the smoke preset builds with ``methods``: name -> (fingerprint, spec), nothing run."""
    from megatron_tgdpo.pipeline import run as pipeline_run
    from megatron_tgdpo.pipeline.stages import StageRunner, fingerprint

    built = {}

    def record(self, stages, run):
        built.update({stage.name: (fingerprint(stage.spec), stage.spec) for stage in stages})
        return {stage.name: fingerprint(stage.spec) for stage in stages}

    monkeypatch.setattr(StageRunner, "run_together", record)
    monkeypatch.setattr(pipeline_run.Replication, "metrics", lambda self, seed: {})
    main = work / "seed1" / "logs" / "tgdpo-a0.5" / "metrics.jsonl"  # what the constant control reads
    main.parent.mkdir(parents=True, exist_ok=True)
    main.write_text(json.dumps({"iteration": 1, "weights/rejected_mean": 1.1}) + "\n")
    replication = pipeline_run.Replication(preset("smoke", methods=methods), work, log=lambda line: None)
    replication.shared_data()
    replication.run_seed(1)
    return built


def test_adding_tgdpo_rm_adds_its_stages_and_changes_no_other(tmp_path, monkeypatch):
    before = ("sft", "dpo", "tgdpo", "simpo", "ipo", "tgdpo-shuffled", "tgdpo-constant", "tgdpo-crossfit")
    old = _stage_specs(tmp_path / "work", before, monkeypatch)
    new = _stage_specs(tmp_path / "work", before + ("tgdpo-rm",), monkeypatch)
    assert {name: fp for name, (fp, _) in new.items() if name in old} == {name: fp for name, (fp, _) in old.items()}
    assert set(new) - set(old) == {"seed1.rm", "seed1.tgdpo-rm", "seed1.eval.tgdpo-rm"}
    rm, guided, main = (new[f"seed1.{m}"][1] for m in ("rm", "tgdpo-rm", "tgdpo-a0.5"))
    assert rm["flags"][rm["flags"].index("--loss-type") + 1] == "rm"
    assert rm["flags"][rm["flags"].index("--data-path") + 1] == main["flags"][main["flags"].index("--data-path") + 1]
    flags = guided["flags"]
    assert flags[flags.index("--guidance-source") + 1] == "reward-model"
    assert flags[flags.index("--guidance-load") + 1] == "<work>/seed1/rm" and flags.count("--guidance-load") == 1
    for flag in ("--alpha", "--beta", "--lr", "--train-iters", "--seed", "--ref-load"):  # the main TGDPO's settings
        assert flags[flags.index(flag) + 1] == main["flags"][main["flags"].index(flag) + 1], flag
    assert set(guided["inputs"]) == {"seed1.sft", "seed1.pairs", "seed1.rm"}
    only = _stage_specs(tmp_path / "alone", ("sft", "dpo", "tgdpo-rm"), monkeypatch)  # needs no TGDPO run
    assert {"seed1.rm", "seed1.tgdpo-rm"} <= set(only)
