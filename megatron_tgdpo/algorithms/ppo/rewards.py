"""Sequence scores (the sparse reward) and the per-token reward of a rollout.

Scores come from the prompt records' verifier task (``megatron_tgdpo.tasks``: a record with ``task``
and ``answer``, scored in [0, 1] by position) or from an external command (``--sparse-reward-command``:
one JSON object per response on stdin, one score per line on stdout). They are computed on the last
pipeline stage, where the losses live; the command runs once per data-parallel replica (tensor-parallel
rank 0) and its scores are broadcast to the other tensor-parallel ranks, so every rank that evaluates
the loss holds the same advantages.

The token reward itself is :func:`megatron_tgdpo.losses.ppo.token_rewards` (RTO's dense DPO reward,
the sparse score at the last token, the KL penalty).
"""
from __future__ import annotations

import json
import math
import shlex
import subprocess
from typing import Optional, Sequence

import torch

from megatron_tgdpo.tasks.registry import TASKS, get_task

__all__ = ["ScorerError", "SequenceScorer", "decode_response", "scores_on_last_stage"]


def decode_response(tokens: Sequence[int], finish: str, tokenizer) -> str:
    """The response text the verifier sees: without the stop token that ended it (as samples files)."""
    ids = list(tokens[:-1]) if finish == "eos" else list(tokens)
    return tokenizer.decode(ids)


class ScorerError(RuntimeError):
    """The external scorer failed or answered something unusable."""


class SequenceScorer:
    """``scores(records, texts)`` -> one float per response; ``exact(records, texts)`` -> task exact
    matches (None without a verifier task)."""

    def __init__(self, command: Optional[str] = None):
        self.command = command

    @staticmethod
    def has_verifier(record: dict) -> bool:
        return record.get("task") in TASKS and isinstance(record.get("answer"), str)

    def check(self, records: Sequence[dict], *, what: str) -> Optional[str]:
        """Why these prompt records cannot be scored (None when they can)."""
        if self.command is not None:
            return None
        bad = next((r for r in records if not self.has_verifier(r)), None)
        if bad is not None:
            return (f"{what}: prompt {bad.get('id')!r} has no verifier (a known \"task\" and an \"answer\"); make the "
                    "file with `python -m megatron_tgdpo.tasks make-prompts`, or score with --sparse-reward-command")
        return None

    def scores(self, records: Sequence[dict], texts: Sequence[str]) -> list[float]:
        if self.command is None:
            return [get_task(r["task"]).score(t, r["answer"]) for r, t in zip(records, texts)]
        return self._run_command(records, texts)

    def exact(self, records: Sequence[dict], texts: Sequence[str]) -> list[Optional[bool]]:
        return [get_task(r["task"]).exact_match(t, r["answer"]) if self.has_verifier(r) else None
                for r, t in zip(records, texts)]

    def _run_command(self, records: Sequence[dict], texts: Sequence[str]) -> list[float]:
        if not records:
            return []
        lines = "".join(json.dumps({**r, "response": t}, ensure_ascii=False) + "\n" for r, t in zip(records, texts))
        try:
            done = subprocess.run(self.command, shell=True, input=lines, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise ScorerError(f"--sparse-reward-command {shlex.quote(self.command)}: cannot run ({exc})") from None
        if done.returncode != 0:
            raise ScorerError(f"--sparse-reward-command exited {done.returncode}: {done.stderr.strip()[-500:]}")
        out = [line for line in done.stdout.splitlines() if line.strip()]
        if len(out) != len(records):
            raise ScorerError(f"--sparse-reward-command wrote {len(out)} scores for {len(records)} responses")
        scores = []
        for number, line in enumerate(out, start=1):
            try:
                value = json.loads(line)
                value = value["score"] if isinstance(value, dict) else value
                value = float(value)
            except (ValueError, KeyError, TypeError):
                raise ScorerError(f"--sparse-reward-command: output line {number} is not a score: {line[:80]!r}") from None
            if not math.isfinite(value):
                raise ScorerError(f"--sparse-reward-command: output line {number} is not finite: {line[:80]!r}")
            scores.append(value)
        return scores


def scores_on_last_stage(scorer: SequenceScorer, records: Sequence[dict], texts: Sequence[str], *,
                         device: torch.device) -> Optional[torch.Tensor]:
    """float64 ``[N]`` scores on the last pipeline stage (identical on its tensor-parallel ranks); None
    elsewhere. The external command runs on tensor-parallel rank 0 only."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    tp = ps.get_tensor_model_parallel_world_size()
    if scorer.command is None or tp == 1:
        return torch.tensor(scorer.scores(records, texts), dtype=torch.float64, device=device)
    failure = None
    values = torch.full((len(records),), float("nan"), dtype=torch.float64, device=device)
    if ps.get_tensor_model_parallel_rank() == 0:
        try:
            values = torch.tensor(scorer.scores(records, texts), dtype=torch.float64, device=device)
        except ScorerError as exc:  # the other ranks wait in the broadcast: send them NaNs, then raise
            failure = exc
    dist.broadcast(values, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    if failure is not None:
        raise failure
    if len(records) and torch.isnan(values).any():
        raise ScorerError("--sparse-reward-command failed on tensor-parallel rank 0 (its error is above)")
    return values
