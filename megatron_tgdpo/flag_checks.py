"""The allowed range of every numeric flag, in one table keyed by flag name, checked before any compute.

A value outside its range is refused with one line naming the flag, the value and the range: a NaN or
an infinity, a number no run can use (``--global-batch-size 1000000000000`` would spin for hours
building one step, ``--beta 1e308`` turns the first loss into NaN), a seed the random generators
cannot take. The bounds are deliberately generous: they only exclude values that cannot be meant.

Why each upper bound is where it is:

* sizes of the parallel layout (TP, PP, VPP, CP) up to 1024: more ranks than any model-parallel group;
* ``--global-batch-size`` up to 2**20 sequences per step, ``--micro-batch-size`` up to 2**16 rows,
  ``--seq-length`` up to 2**22 tokens: far beyond what a step of any model holds, small enough that
  a step's bookkeeping fits in memory;
* iteration counts and intervals up to 10**9 (decades of steps at one per second); ``--train-epochs``
  up to 10**6; ``--exit-duration-in-mins`` up to 10**7 (19 years);
* ``--seed`` in 0..2**32-1: what numpy's generator accepts, and far from torch's 64-bit limit once
  megatron adds its per-rank offsets;
* ``--lr``, ``--min-lr``, ``--critic-lr`` up to 1: Adam moves every weight by about the learning rate
  per step, so anything larger destroys any model on the first update;
* loss coefficients (``--beta``, ``--alpha``, margins, clamps, reward scales) up to 10**3 in magnitude:
  beyond that the loss saturates at its first step and float32 overflows soon after;
* probabilities and discounts (``--adam-beta1/2``, ``--gamma``, ``--lam``, fractions) in [0, 1].

The table is keyed by flag name so that it applies however the configuration is laid out: every field
of a configuration dataclass (nested sections included) is looked up by its flag,
``some_field -> --some-field``. ``tests/unit/test_flag_checks.py`` fails when a numeric field has no entry.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NoReturn, Optional

__all__ = [
    "BOUNDS",
    "Bound",
    "checked_parser",
    "config_problems",
    "flag_name",
    "flag_values",
    "problems",
    "without_repeats",
]


@dataclass(frozen=True)
class Bound:
    """The values a numeric flag accepts: finite, within ``[low, high]`` (``low_open`` / ``high_open``
    make that end exclusive), whole numbers only when ``integer``."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"{kind} in {left}{_number(self.low)}, {_number(self.high)}{right}"

    def problem(self, flag: str, value: Any) -> Optional[str]:
        """One line saying why ``value`` is not accepted for ``flag``, or None."""
        if value is None:
            return None  # unset optional flag
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{flag} {value!r}: expected {self.describe()}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{flag} {value}: not a finite number; expected {self.describe()}"
        if self.integer and isinstance(value, float) and not value.is_integer():
            return f"{flag} {value}: not a whole number; expected {self.describe()}"
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high:
            return f"{flag} {_number(value)}: out of range; expected {self.describe()}"
        return None


def _number(value: float) -> str:
    """Integers as written (2**32 - 1 is clearer in full), floats in Python's shortest form."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e16):
        return str(int(value))
    return repr(float(value))


def _int(low: int, high: int) -> Bound:
    return Bound(low, high, integer=True)


_PARALLEL = _int(1, 1024)
_ITERATIONS = _int(1, 10**9)
_COEFFICIENT = Bound(-1e3, 1e3)
_UNIT = Bound(0.0, 1.0)
_LR = Bound(0.0, 1.0, low_open=True)

#: flag -> allowed values, for every numeric flag of the trainer (``python -m megatron_tgdpo.train``) and
#: of PPO (``python -m megatron_tgdpo.ppo``, which adds its own to the trainer's).
BOUNDS: dict[str, Bound] = {
    # --- layout and batch ---------------------------------------------------------------------
    "--tensor-model-parallel-size": _PARALLEL,
    "--pipeline-model-parallel-size": _PARALLEL,
    "--virtual-pipeline-model-parallel-size": _int(2, 1024),
    "--context-parallel-size": _PARALLEL,
    "--seq-length": _int(2, 2**22),
    "--micro-batch-size": _int(1, 2**16),
    "--global-batch-size": _int(1, 2**20),
    "--pad-to-multiple-of": _int(1, 2**16),
    "--logits-chunk-size": _int(1, 2**26),
    "--frozen-micro-batches-per-call": _int(0, 2**16),
    # --- loss ---------------------------------------------------------------------------------
    "--beta": Bound(0.0, 1e3, low_open=True),
    "--alpha": Bound(0.0, 1e3),
    "--label-smoothing": Bound(0.0, 0.5),
    "--weight-clamp-min": _COEFFICIENT,
    "--weight-clamp-max": _COEFFICIENT,
    "--simpo-gamma": _COEFFICIENT,
    "--token-weight-bound": Bound(0.0, 1e3, low_open=True),
    "--rejected-weight": _COEFFICIENT,
    "--rm-margin": _COEFFICIENT,
    "--guidance-scale": Bound(0.0, 1e3, low_open=True),
    # --- optimisation -------------------------------------------------------------------------
    "--lr": _LR,
    "--min-lr": _UNIT,
    "--lr-warmup-fraction": _UNIT,
    "--weight-decay": Bound(0.0, 10.0),
    "--adam-beta1": Bound(0.0, 1.0, high_open=True),
    "--adam-beta2": Bound(0.0, 1.0, high_open=True),
    "--clip-grad": Bound(0.0, 1e6),
    "--train-iters": _ITERATIONS,
    "--train-epochs": Bound(0.0, 1e6, low_open=True),
    "--seed": _int(0, 2**32 - 1),
    "--skip-nonfinite-steps": _int(0, 10**9),
    # --- checkpoints, logging, evaluation -----------------------------------------------------
    "--save-interval": _ITERATIONS,
    "--keep-last": _int(1, 10**6),
    "--exit-duration-in-mins": Bound(0.0, 1e7, low_open=True),
    "--log-interval": _ITERATIONS,
    "--eval-interval": _ITERATIONS,
    "--eval-iters": _int(0, 10**6),
    # --- PPO ----------------------------------------------------------------------------------
    "--dense-reward-scale": Bound(0.0, 1e3),
    "--sparse-reward-scale": Bound(0.0, 1e3),
    "--kl-coef": Bound(0.0, 1e2),
    "--dense-reward-clip": Bound(0.0, 1e3),
    "--learned-reward-mean": Bound(-1e6, 1e6),
    "--learned-reward-std": Bound(0.0, 1e6, low_open=True),
    "--learned-reward-clip": Bound(0.0, 1e6),
    "--gamma": _UNIT,
    "--lam": _UNIT,
    "--clip-range": Bound(0.0, 10.0, low_open=True),
    "--value-clip-range": Bound(0.0, 1e6),
    "--samples-per-prompt": _int(1, 4096),
    "--ppo-epochs": _int(1, 1000),
    "--ppo-mini-batches": _int(1, 2**20),
    "--max-new-tokens": _int(1, 2**17),
    "--temperature": Bound(0.0, 1e2, low_open=True),
    "--generation-batch-size": _int(1, 2**16),
    "--critic-lr": _LR,
    "--value-head-init-std": Bound(0.0, 10.0),
}


def flag_name(field_name: str) -> str:
    """``some_field`` -> ``--some-field``."""
    return "--" + field_name.replace("_", "-")


def flag_values(config: Any) -> Iterator[tuple[str, Any]]:
    """(flag, value) for every field of a configuration dataclass, sections (nested dataclasses) included;
    or for every item of a mapping/namespace of field names."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        items = ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
    elif isinstance(config, argparse.Namespace):
        items = vars(config).items()
    else:
        items = dict(config).items()
    for name, value in items:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from flag_values(value)
        else:
            yield flag_name(name), value


def problems(values: Mapping[str, Any], *, bounds: Mapping[str, Bound] = BOUNDS) -> list[str]:
    """One line per flag of ``values`` (flag -> value) outside its bound; flags without one are skipped."""
    found = []
    for flag, value in values.items():
        bound = bounds.get(flag)
        line = bound.problem(flag, value) if bound is not None else None
        if line:
            found.append(line)
    return found


def config_problems(config: Any, *, bounds: Mapping[str, Bound] = BOUNDS) -> list[str]:
    """:func:`problems` for every field of a configuration (dataclass, namespace or mapping of field names)."""
    return problems(dict(flag_values(config)), bounds=bounds)


def without_repeats(first: list[str], rest: list[str]) -> list[str]:
    """``first`` then the lines of ``rest`` about flags that ``first`` does not already name: where a
    command's own checks already explain a flag, a range line about it would only say it again."""
    named = {line.split(" ", 1)[0].rstrip(":") for line in first}
    return first + [line for line in rest if line.split(" ", 1)[0].rstrip(":") not in named]


def checked_parser(parser: argparse.ArgumentParser, *, bounds: Mapping[str, Bound] = BOUNDS) -> argparse.ArgumentParser:
    """``parser`` with each bounded flag's range in its help, and a bad flag (an unknown one, or a value
    of the wrong type) reported in one line with exit 2 instead of after the whole usage (dozens of
    lines for the trainer)."""
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of a parser's actions
        bound = next((bounds[s] for s in action.option_strings if s in bounds), None)
        if bound is not None and action.help not in (None, argparse.SUPPRESS) and "expected:" not in action.help:
            action.help = f"{action.help.strip()} (expected: {bound.describe()})".lstrip()

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: {message} (see --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser
