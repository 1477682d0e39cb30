"""Weight functions: per-token guidance reward r̂ -> TGDPO's token weights (f_w on chosen, f_l on rejected).

With ``s = +1`` on chosen and ``-1`` on rejected tokens, ``alpha`` the guidance strength and ``c`` the
``--token-weight-bound``:

==================  ==========================================================================================
``linear``          ``f = 1 + alpha·s·r̂`` — TGDPO as published (the default).
``clipped``         ``f = 1 + clip(alpha·s·r̂, -c, c)``: the linear weight held within ``[1 - c, 1 + c]``.
``tanh``            ``f = 1 + c·tanh(alpha·s·r̂ / c)``: linear near 0 (slope alpha), smoothly bounded by ``1 ± c``.
``exp``             ``f = exp(alpha·s·r̂)``: linear to first order, never negative.
``normalised``      the linear weights divided by their mean over the response's tokens, so every response's
                    weights average 1 (a response whose linear weights do not average above 0 keeps 1 on
                    every token): TGDPO's redistribution within a response without its change of scale.
``shuffled``        control: the linear weights permuted within each response (chosen and rejected
                    separately), by a fixed hash of ``(--seed, pair index, side, token ordinal)``: the same
                    weights and the same per-response sums, the token credit destroyed.
``constant-rejected``  control: ``f_w = 1`` and ``f_l = --rejected-weight`` on every token: DPO with the
                    rejected side scaled by a constant (set it to TGDPO's mean ``f_l`` to test whether the
                    up-weighting alone explains TGDPO; the pipeline does: ``pipeline/controls.py``).
==================  ==========================================================================================

``--weight-clamp-min/max`` clamp the output of every function but ``constant-rejected`` (before the
normalisation or the shuffle). The weights are constants: nothing here carries a gradient, and every
function returns 0 off the response tokens.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch

from megatron_tgdpo.guidance.layout import ResponseLayout

__all__ = ["TokenWeights", "WEIGHT_FUNCTIONS", "WeightFunction", "WeightSettings", "make_weight_function",
           "register_weight_function", "shuffle_within_responses", "weight_settings_of"]

WeightClamp = tuple[Optional[float], Optional[float]]


@dataclass(frozen=True)
class WeightSettings:
    """What the weight functions read (from the ``preference`` section's flags)."""

    alpha: float
    weight_clamp: Optional[WeightClamp] = None
    bound: float = 0.5
    rejected_weight: Optional[float] = None
    seed: int = 0


@dataclass(frozen=True)
class TokenWeights:
    """``weights`` (0 off the response) and ``clamped``: the response tokens the clamp changed."""

    weights: torch.Tensor
    clamped: torch.Tensor


def _masked(tensor: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    return torch.where(response, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def _clamp(raw: torch.Tensor, response: torch.Tensor, clamp: Optional[WeightClamp]) -> TokenWeights:
    weights = raw
    if clamp is not None and clamp != (None, None):
        weights = raw.clamp(min=clamp[0], max=clamp[1])
    return TokenWeights(weights=_masked(weights, response), clamped=(weights != raw) & response)


class WeightFunction(ABC):
    """Maps the per-token guidance reward (this rank's ``[R, T]``, 0 off the response) to weights."""

    name: ClassVar[str]
    #: False for a function that ignores r̂ (then no guidance source is needed)
    uses_reward: ClassVar[bool] = True
    #: whether --weight-clamp-min/max apply
    clampable: ClassVar[bool] = True

    def __init__(self, settings: WeightSettings):
        self.settings = settings

    def is_identity(self) -> bool:
        """True when every weight is 1 whatever r̂ (the loss is then DPO's, and is run as DPO)."""
        return self.uses_reward and self.settings.alpha == 0

    @classmethod
    def problems(cls, settings: WeightSettings) -> list[str]:
        """Settings this function cannot work with, one line each naming the flag."""
        return []

    @abstractmethod
    def __call__(self, reward: torch.Tensor, layout: ResponseLayout) -> TokenWeights:
        ...


class Linear(WeightFunction):
    name = "linear"

    def raw(self, reward: torch.Tensor, layout: ResponseLayout) -> torch.Tensor:
        return 1.0 + self.settings.alpha * layout.sign * reward

    def __call__(self, reward: torch.Tensor, layout: ResponseLayout) -> TokenWeights:
        with torch.no_grad():
            return _clamp(self.raw(reward, layout), layout.response, self.settings.weight_clamp)


class Clipped(Linear):
    name = "clipped"

    def raw(self, reward: torch.Tensor, layout: ResponseLayout) -> torch.Tensor:
        bound = self.settings.bound
        return 1.0 + (self.settings.alpha * layout.sign * reward).clamp(min=-bound, max=bound)


class Tanh(Linear):
    name = "tanh"

    def raw(self, reward: torch.Tensor, layout: ResponseLayout) -> torch.Tensor:
        bound = self.settings.bound
        return 1.0 + bound * torch.tanh(self.settings.alpha * layout.sign * reward / bound)


class Exp(Linear):
    name = "exp"

    def raw(self, reward: torch.Tensor, layout: ResponseLayout) -> torch.Tensor:
        return torch.exp(self.settings.alpha * layout.sign * reward)


class Normalised(Linear):
    name = "normalised"

    def __call__(self, reward: torch.Tensor, layout: ResponseLayout) -> TokenWeights:
        with torch.no_grad():
            linear = super().__call__(reward, layout)
            weights = layout.full(linear.weights)
            response = layout.full_response()
            ids = layout.full_sequence_ids()
            keep = response.reshape(-1)
            groups = ids.reshape(-1)[keep]
            values = weights.reshape(-1)[keep]
            count = layout.batch.num_sequences
            sums = values.new_zeros(count).index_add(0, groups, values)
            tokens = values.new_zeros(count).index_add(0, groups, torch.ones_like(values))
            mean = sums / tokens.clamp(min=1.0)
            scale = mean[groups]
            normalised = torch.where(scale > 0, values / scale.clamp(min=torch.finfo(values.dtype).tiny),
                                     torch.ones_like(values))
            out = torch.zeros_like(weights).reshape(-1)
            out[keep] = normalised
            return TokenWeights(weights=layout.local(out.reshape(weights.shape)), clamped=linear.clamped)


def _hash(*parts: torch.Tensor) -> torch.Tensor:
    """A fixed integer hash of int64 tensors into [0, 2**31): deterministic on every device (not
    cryptographic; it only has to scatter). Every product stays below 2**62, so nothing overflows."""
    h = torch.zeros_like(parts[0]) + 0x2545F491
    for part in parts:
        h = h ^ (part & 0x7FFFFFFF)
        for multiplier in (1103515245, 1664525, 22695477):
            h = (h * multiplier + 12345) & 0x7FFFFFFF
            h = h ^ (h >> 15)
    return h


def shuffle_within_responses(values: torch.Tensor, layout: ResponseLayout, *, seed: int,
                             full: bool = False) -> torch.Tensor:
    """``values`` (per-token, this rank's slice unless ``full``) permuted among the positions of each
    response; 0 elsewhere. The permutation of a response depends only on ``seed``, its pair's dataset
    index, its side and its length, never on the batch it arrives in or the parallel layout."""
    with torch.no_grad():
        whole = values if full else layout.full(values)
        response = layout.full_response().reshape(-1)
        positions = response.nonzero().squeeze(1)  # row-major: in order within every sequence
        groups = layout.full_sequence_ids().reshape(-1)[positions]
        natural = torch.argsort(groups, stable=True)  # grouped by sequence, each in token order
        positions, groups = positions[natural], groups[natural]
        _, counts = torch.unique_consecutive(groups, return_counts=True)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        ordinal = torch.arange(groups.numel(), device=groups.device) - starts
        samples, side = layout.sequence_samples()
        seed_t = torch.full_like(groups, int(seed) & 0x7FFFFFFF)
        key = _hash(seed_t, samples[groups], side[groups], ordinal)
        order = torch.argsort(groups * 2**31 + key, stable=True)  # random order, still grouped by sequence
        flat = whole.reshape(-1)
        out = torch.zeros_like(flat)
        out[positions] = flat[positions[order]]
        out = out.reshape(whole.shape)
        return out if full else layout.local(out)


class Shuffled(Linear):
    name = "shuffled"

    def __call__(self, reward: torch.Tensor, layout: ResponseLayout) -> TokenWeights:
        linear = super().__call__(reward, layout)
        seed = self.settings.seed
        weights = shuffle_within_responses(linear.weights, layout, seed=seed)
        clamped = shuffle_within_responses(linear.clamped.to(torch.float32), layout, seed=seed) > 0
        return TokenWeights(weights=weights, clamped=clamped)


class ConstantRejected(WeightFunction):
    name = "constant-rejected"
    uses_reward = False
    clampable = False

    @classmethod
    def problems(cls, settings: WeightSettings) -> list[str]:
        if settings.rejected_weight is None:
            return ["--token-weight constant-rejected needs --rejected-weight (e.g. TGDPO's mean rejected-token "
                    "weight, its weights/rejected_mean)"]
        return []

    def __call__(self, reward: torch.Tensor, layout: ResponseLayout) -> TokenWeights:
        with torch.no_grad():
            constant = float(self.settings.rejected_weight)
            raw = torch.where(layout.sign > 0, torch.ones_like(reward), torch.full_like(reward, constant))
            return TokenWeights(weights=_masked(raw, layout.response),
                                clamped=torch.zeros_like(layout.response))


#: name -> class; :func:`register_weight_function` adds more
WEIGHT_FUNCTIONS: dict[str, Callable[[WeightSettings], WeightFunction]] = {
    cls.name: cls for cls in (Linear, Clipped, Tanh, Exp, Normalised, Shuffled, ConstantRejected)
}


def register_weight_function(name: str, factory: Callable[[WeightSettings], WeightFunction]) -> None:
    """Make ``--token-weight NAME`` build ``factory(settings)``; a name already taken is refused."""
    if name in WEIGHT_FUNCTIONS:
        raise ValueError(f"a weight function named {name!r} is already registered")
    WEIGHT_FUNCTIONS[name] = factory


def weight_settings_of(section, *, seed: int) -> WeightSettings:
    """The settings of a ``preference`` configuration section (``config.PreferenceConfig``)."""
    return WeightSettings(alpha=section.alpha, weight_clamp=section.weight_clamp(), bound=section.token_weight_bound,
                          rejected_weight=section.rejected_weight, seed=seed)


def make_weight_function(name: str, settings: WeightSettings) -> WeightFunction:
    if name not in WEIGHT_FUNCTIONS:
        raise ValueError(f"unknown token weight {name!r}; choose one of {', '.join(WEIGHT_FUNCTIONS)}")
    return WEIGHT_FUNCTIONS[name](settings)
