"""The pipeline on SmolLM2 (``replicate --model smollm2``) at a smoke size: every stage runs on the real
model (on-policy samples rendered with its ChatML template, verifier-scored pairs, DPO, TGDPO guided by
that DPO model, held-out evaluation of base / DPO / TGDPO), and a rerun resumes with every stage skipped.
"""
from __future__ import annotations

import json

from megatron_tgdpo.pipeline import run_replication
from megatron_tgdpo.pipeline.config import TrainSettings, preset


def test_smollm2_pipeline_runs_every_stage_then_resumes(tmp_path, smollm2):
    cfg = preset("smollm2", base=str(smollm2.hf_dir), pref_prompts=3, heldout_prompts=2, num_samples=3,
                 temperature=1.0, max_new_tokens=6, seq_length=96,
                 preference=TrainSettings(1, 1e-5, 1e-6, global_batch_size=2, micro_batch_size=2))
    work = tmp_path / "work"
    lines: list[str] = []
    report, summary = run_replication(cfg, work, log=lines.append)

    stages = set(summary["timings"])
    assert stages == {"data.prompts", "seed1.samples", "seed1.pairs", "seed1.dpo", "seed1.tgdpo-a0.5",
                      "seed1.eval.base", "seed1.eval.dpo", "seed1.eval.tgdpo-a0.5"}  # no SFT stage
    assert not any(t["skipped"] for t in summary["timings"].values())

    # Prompts went through the model's own template: ChatML turns, the assistant's opened last.
    manifest = json.loads((work / "seed1" / "pairs.manifest.json").read_text())
    assert manifest["chat_template"]["name"] != "plain"
    samples = [json.loads(line) for line in (work / "seed1" / "samples" / "pref.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(r["samples"]) == 3 for r in samples)
    for pair in map(json.loads, (work / "seed1" / "pairs.jsonl").read_text().splitlines()):
        assert pair["chosen_score"] > pair["rejected_score"]

    per_seed = summary["per_seed"][1]
    assert list(per_seed) == ["base", "dpo", "tgdpo-a0.5"]
    for metrics in per_seed.values():
        assert 0.0 <= metrics["greedy_score"] <= 1.0 and metrics["prompts"] == 2
    # TGDPO was guided by this seed's DPO model
    jobs = json.loads((work / "logs" / "seed1.dpo+.jobs.json").read_text())
    tgdpo = next(flags for flags in jobs if "tgdpo" in flags)
    assert tgdpo[tgdpo.index("--guidance-load") + 1] == str(work / "seed1" / "dpo")
    assert tgdpo[tgdpo.index("--ref-load") + 1] == str(smollm2.hf_dir)
    assert "base" in report and "TGDPO (alpha 0.5)" in report

    again: list[str] = []
    report_again, summary_again = run_replication(cfg, work, log=again.append)
    assert all(t["skipped"] for t in summary_again["timings"].values()), again
    assert report_again == report

