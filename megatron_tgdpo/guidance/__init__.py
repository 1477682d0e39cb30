"""Token guidance for TGDPO as plug-ins: a guidance source gives the per-token reward r̂ of every response
token, a weight function maps r̂ to the token weights (f_w on chosen, f_l on rejected tokens) that
``losses.preference_loss`` uses. Both are chosen by name (``--guidance-source``, ``--token-weight``; see
``docs/guidance.md``); the defaults, ``dpo-model`` and ``linear``, are TGDPO as published.

    source = make_guidance_source("dpo-model", section)            # sources.py
    weigh = make_weight_function("linear", WeightSettings(alpha=0.5))  # weights.py
    reward = source.token_rewards(index=i, layout=layout, logps={"reference": ref, "guidance": guide}, beta=0.1)
    weights = weigh(reward, layout)   # TokenWeights(weights, clamped): constants, no gradient

:class:`ResponseLayout` (``layout.py``) says where the responses of a micro-batch are, for either batch
layout and under context parallelism. New sources and functions register by name.
"""
from megatron_tgdpo.guidance.layout import ResponseLayout
from megatron_tgdpo.guidance.sources import (GUIDANCE_SOURCES, DpoModelSource, GuidanceSource, ScoreFileSource,
                                             make_guidance_source, register_guidance_source, source_problems)
from megatron_tgdpo.guidance.weights import (WEIGHT_FUNCTIONS, TokenWeights, WeightFunction, WeightSettings,
                                             make_weight_function, register_weight_function,
                                             shuffle_within_responses, weight_settings_of)

DEFAULT_SOURCE = "dpo-model"
DEFAULT_WEIGHT = "linear"

__all__ = ["DEFAULT_SOURCE", "DEFAULT_WEIGHT", "DpoModelSource", "GUIDANCE_SOURCES", "GuidanceSource",
           "ResponseLayout", "ScoreFileSource", "TokenWeights", "WEIGHT_FUNCTIONS", "WeightFunction",
           "WeightSettings", "make_guidance_source", "make_weight_function", "register_guidance_source",
           "register_weight_function", "shuffle_within_responses", "source_problems",
           "weight_settings_of"]
