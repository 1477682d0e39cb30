"""Scores of each model on the held-out prompts, from its samples files.

Per model: the greedy response's mean score and exact-match rate; with ``eval_samples`` > 0 the same
over k samples at the sampling temperature; and the head-to-head win rate against DPO, prompt by
prompt (greedy: the one response; sampled: the mean of the k scores; ties count half). All from the
task's verifier (``tasks/``): the same scorer that built the training pairs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from megatron_tgdpo.tasks.evaluate import head_to_head, summarize
from megatron_tgdpo.tasks.jsonl import write_jsonl_atomic
from megatron_tgdpo.tasks.samples import load_sample_records, score_records

__all__ = ["model_metrics", "score_file", "summary_of"]


def score_file(path: Path) -> dict[str, Any]:
    """Add the verifier's score to every sample of ``path`` (in place, atomically); returns its summary."""
    records = load_sample_records(path, require_verifier=True)
    score_records(records)
    write_jsonl_atomic(path, (item.record for item in records))
    return summarize(records).as_dict()


def summary_of(path: Path) -> dict[str, Any]:
    """The summary of an already scored samples file."""
    return summarize(load_sample_records(path, require_scores=True)).as_dict()


def _load(path: Optional[Path]):
    return None if path is None else load_sample_records(path, require_scores=True)


def model_metrics(greedy: Path, sampled: Optional[Path], *, dpo_greedy: Optional[Path],
                  dpo_sampled: Optional[Path]) -> dict[str, Any]:
    """Metrics of one model (see the module docstring); win rates are None without a DPO model."""
    g = _load(greedy)
    s = summarize(g)
    out: dict[str, Any] = {"greedy_score": s.mean_score, "greedy_exact": s.exact_match, "prompts": s.prompts}
    if sampled is not None:
        k = summarize(_load(sampled))
        out.update(sampled_score=k.mean_score, sampled_exact=k.exact_match, sampled_k=k.max_k)
    if dpo_greedy is not None:
        versus = head_to_head(g, _load(dpo_greedy), per_prompt="first")
        out.update(win_vs_dpo=versus.win_rate, wins_ties_losses_vs_dpo=[versus.wins, versus.ties, versus.losses])
    if dpo_greedy is not None and sampled is not None and dpo_sampled is not None:
        out["sampled_win_vs_dpo"] = head_to_head(_load(sampled), _load(dpo_sampled), per_prompt="mean").win_rate
    return out
