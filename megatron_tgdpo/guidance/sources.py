"""Guidance sources: where TGDPO's per-token reward r̂ comes from (``--guidance-source``).

================  ============================================================================================
``dpo-model``     ``r̂ = beta·(log pi_guide - log pi_ref)`` per response token: the guidance model
                  (``--guidance-load``, or the guidance log-probs of ``--logprob-cache``) against the
                  reference, TGDPO as published (the default).
``score-file``    per-token scores read from ``--guidance-scores`` (JSONL, see :mod:`.score_file`), used as
                  r̂ as they are.
``reward-model``  a Bradley–Terry reward model's value differences ``V(x, y≤t) − V(x, y<t)`` (registered by
                  ``megatron_tgdpo.algorithms.reward_guidance``, where the reward model lives).
================  ============================================================================================

A source is asked once per micro-batch, on the last pipeline stage, for r̂ on this rank's tokens
(``[R, T]``, 0 off the response). Another source is one :func:`register_guidance_source` call away: its
``setup`` builds its own frozen model, its ``begin_step`` runs once per step before the policy's forward
(run that model there), ``roles`` names the frozen causal-LM log-probs the trainer should score for it
(``"guidance"``: the ``--guidance-load`` model), and ``forward_passes`` the forward passes per token its
own model adds (for the logged FLOPs).
"""
from __future__ import annotations

from abc import ABC
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.guidance.layout import ResponseLayout

__all__ = ["DpoModelSource", "GUIDANCE_SOURCES", "GuidanceSource", "ScoreFileSource", "make_guidance_source",
           "register_guidance_source", "source_problems"]


class GuidanceSource(ABC):
    """Per-token guidance reward for the response tokens of each micro-batch."""

    name: ClassVar[str]
    #: frozen causal-LM roles the trainer scores every step and passes in ``logps`` ("guidance")
    roles: ClassVar[tuple[str, ...]] = ()
    #: forward passes per token of a model the source runs itself (not one of ``roles``)
    forward_passes: ClassVar[float] = 0.0

    def __init__(self, section: Any):
        self.section = section

    @classmethod
    def problems(cls, section: Any) -> list[str]:
        """What the ``preference`` section lacks for this source, one line each naming the flag."""
        return []

    def setup(self, *, cfg: Any, arch: Any) -> None:
        """Called once when the trainer builds its models (a source with its own model builds it here)."""

    def begin_step(self, batches: Sequence[Batch]) -> None:
        """Called once per step with the step's full micro-batches, before any of them is trained."""

    def token_rewards(self, *, index: int, layout: ResponseLayout, logps: Mapping[str, torch.Tensor],
                      beta: float) -> torch.Tensor:
        """r̂ on this rank's tokens of micro-batch ``index`` (0 off the response); ``logps`` holds this
        rank's frozen log-probs by role ("reference" and those of ``roles``)."""
        raise NotImplementedError


class DpoModelSource(GuidanceSource):
    name = "dpo-model"
    roles = ("guidance",)

    @classmethod
    def problems(cls, section: Any) -> list[str]:
        if section.guidance_load is None and section.logprob_cache is None:
            return ["--loss-type tgdpo needs --guidance-load (a DPO-trained checkpoint) or --logprob-cache; "
                    "or use --loss-type dpo"]
        return []

    def token_rewards(self, *, index: int, layout: ResponseLayout, logps: Mapping[str, torch.Tensor],
                      beta: float) -> torch.Tensor:
        with torch.no_grad():
            response = layout.response
            zero = torch.zeros((), dtype=logps["guidance"].dtype, device=response.device)
            guide = torch.where(response, logps["guidance"].detach(), zero)
            ref = torch.where(response, logps["reference"].detach(), zero)
            return beta * (guide - ref)


class ScoreFileSource(GuidanceSource):
    name = "score-file"

    def __init__(self, section: Any):
        from megatron_tgdpo.guidance.score_file import read_score_file

        super().__init__(section)
        self.path = section.guidance_scores
        self.scores = read_score_file(self.path)

    @classmethod
    def problems(cls, section: Any) -> list[str]:
        if section.guidance_scores is None:
            return ["--guidance-source score-file needs --guidance-scores FILE (JSONL of per-token scores)"]
        return []

    def token_rewards(self, *, index: int, layout: ResponseLayout, logps: Mapping[str, torch.Tensor],
                      beta: float) -> torch.Tensor:
        from megatron_tgdpo.guidance.score_file import scores_tensor

        dtype = next(iter(logps.values())).dtype if logps else torch.float32
        full = scores_tensor(self.scores, layout, path=self.path, dtype=dtype)
        return layout.local(full)


#: name -> factory(preference section) -> source; :func:`register_guidance_source` adds more
GUIDANCE_SOURCES: dict[str, Callable[[Any], GuidanceSource]] = {
    cls.name: cls for cls in (DpoModelSource, ScoreFileSource)
}


def register_guidance_source(name: str, factory: Callable[[Any], GuidanceSource]) -> None:
    """Make ``--guidance-source NAME`` build ``factory(preference_section)``; a taken name is refused."""
    if name in GUIDANCE_SOURCES:
        raise ValueError(f"a guidance source named {name!r} is already registered")
    GUIDANCE_SOURCES[name] = factory


def source_problems(name: str, section: Any) -> list[str]:
    if name not in GUIDANCE_SOURCES:
        return [f"--guidance-source {name!r}: choose one of {', '.join(GUIDANCE_SOURCES)}"]
    check = getattr(GUIDANCE_SOURCES[name], "problems", None)
    return check(section) if check is not None else []


def make_guidance_source(name: str, section: Any) -> GuidanceSource:
    if name not in GUIDANCE_SOURCES:
        raise ValueError(f"unknown guidance source {name!r}; choose one of {', '.join(GUIDANCE_SOURCES)}")
    return GUIDANCE_SOURCES[name](section)
