"""The names of TGDPO's controls, cross-fitted and reward-model guidance as pipeline methods (what they do: ``controls.py``),
apart so that the configuration can check them without importing the stages."""
from __future__ import annotations

__all__ = ["CONTROL_METHODS", "LABELS", "control_problems"]

CONTROL_METHODS = ("tgdpo-shuffled", "tgdpo-constant", "tgdpo-crossfit", "tgdpo-rm")
LABELS = {"tgdpo-shuffled": "TGDPO shuffled (control)", "tgdpo-constant": "DPO + constant f_l (control)",
          "tgdpo-crossfit": "TGDPO cross-fitted", "tgdpo-rm": "TGDPO guided by a reward model"}


def control_problems(methods: tuple[str, ...]) -> list[str]:
    """What a method list lacks for its controls, one line each."""
    out = []
    for method in ("tgdpo-shuffled", "tgdpo-constant"):
        if method in methods and "tgdpo" not in methods:
            out.append(f"{method} needs tgdpo: it is a control of the main TGDPO run")
    if "tgdpo-crossfit" in methods and "dpo" not in methods:
        out.append("tgdpo-crossfit needs dpo: it is compared with the DPO run")
    return out
