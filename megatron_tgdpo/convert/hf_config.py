"""Hugging Face Llama ``config.json`` <-> :class:`LlamaArch`.

Only what the megatron model reproduces exactly is accepted; anything else is a :class:`ConversionError`
that names the config key, because a silently ignored key is how a converted model "outputs garbage".

Both spellings of the RoPE settings are read: transformers 4.x writes ``rope_theta`` + ``rope_scaling``,
transformers 5.x writes ``rope_parameters`` (with ``rope_theta`` and ``rope_type`` inside). We write the 4.x
spelling, which both major versions read.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.models.llama import LlamaArch

# megatron-core's Llama-3.x RoPE scaling hard-codes these (RotaryEmbedding._apply_scaling); only the
# factor is configurable, so a checkpoint with other values cannot be reproduced.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def read_hf_config(path: str | Path) -> dict:
    """``config.json`` of a Hugging Face model directory (or the file itself) as a dict."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{file}: no such file; a Hugging Face model directory needs config.json") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{file}: unreadable config ({exc})") from exc


def _require(config: dict, key: str) -> Any:
    if config.get(key) is None:
        raise ConversionError(f"config.json lacks {key!r}; it is required for a Llama model")
    return config[key]


def _rope(config: dict) -> tuple[float, Optional[float]]:
    """(rope_theta, llama3 scaling factor or None) from either transformers spelling."""
    params = config.get("rope_parameters") or {}
    legacy = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        theta = 10000.0  # LlamaConfig's default (Llama 1/2 configs often omit it)
    top = config.get("rope_theta")
    if top is not None and "rope_theta" in params and float(params["rope_theta"]) != float(top):
        raise ConversionError(
            f"config.json has rope_theta {config['rope_theta']} and rope_parameters.rope_theta {params['rope_theta']}; "
            "they must agree"
        )
    theta = float(theta)
    if not theta.is_integer():
        # build_stage passes int(rope_theta) to megatron-core: a fractional base would be truncated.
        raise ConversionError(f"rope_theta {theta} is not an integer; megatron-core takes an integer rotary base")
    scaling = legacy or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConversionError(
            f"rope type {rope_type!r} is not supported; only 'default' and 'llama3' (Llama 3.1/3.2) RoPE "
            "are reproduced by megatron-core"
        )
    factor = scaling.get("factor")
    if factor is None or float(factor) <= 0:
        raise ConversionError("llama3 rope scaling needs a positive 'factor'")
    for key, fixed in LLAMA3_FIXED.items():
        value = scaling.get(key)
        if value is None or not math.isclose(float(value), fixed):
            raise ConversionError(
                f"llama3 rope scaling {key}={value!r} is not supported: megatron-core hard-codes {key}={fixed:g} "
                "(low/high frequency factors 1/4, original context 8192)"
            )
    return theta, float(factor)


def hf_config_to_arch(config: dict) -> LlamaArch:
    """The :class:`LlamaArch` of a Hugging Face ``LlamaForCausalLM`` config; raises
    :class:`ConversionError` for anything megatron would not reproduce."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise ConversionError(
            f"model_type {model_type!r} is not supported: only Llama-family checkpoints "
            "(model_type 'llama', LlamaForCausalLM) convert"
        )
    archs = config.get("architectures") or list(SUPPORTED_ARCHITECTURES)
    if list(archs) != list(SUPPORTED_ARCHITECTURES):
        raise ConversionError(f"architectures {archs} is not supported: only {list(SUPPORTED_ARCHITECTURES)} converts")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {config['hidden_act']!r} is not supported; Llama uses 'silu' (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ConversionError(f"{key}=true is not supported: the megatron Llama model has no linear biases")
    if config.get("quantization_config"):
        raise ConversionError(
            "quantized checkpoints (quantization_config) are not supported; convert the bf16/fp16 weights"
        )

    hidden, heads = int(_require(config, "hidden_size")), int(_require(config, "num_attention_heads"))
    if hidden % heads:
        raise ConversionError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise ConversionError(
            f"head_dim {head_dim} != hidden_size / num_attention_heads = {hidden // heads}: not supported "
            "(the megatron Llama model derives the head size from hidden size and heads)"
        )
    groups = int(config.get("num_key_value_heads") or heads)  # absent in Llama 1/2-7B: plain multi-head
    if heads % groups:
        raise ConversionError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {groups}")
    theta, factor = _rope(config)
    return LlamaArch(
        num_layers=int(_require(config, "num_hidden_layers")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=int(_require(config, "intermediate_size")),
        vocab_size=int(_require(config, "vocab_size")),
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
        rope_theta=theta,
        rope_scaling_factor=factor,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def arch_to_hf_config(arch: LlamaArch, *, dtype: str = "bfloat16") -> dict:
    """A ``LlamaForCausalLM`` config for ``arch`` (transformers 4.x spelling, which 5.x also reads).

    Token ids (bos/eos/pad) are not part of the architecture: pass the original config.json to keep them.
    """
    rope_scaling = None
    if arch.rope_scaling_factor is not None:
        rope_scaling = {"rope_type": "llama3", "factor": float(arch.rope_scaling_factor), **LLAMA3_FIXED}
    return {
        "architectures": list(SUPPORTED_ARCHITECTURES),
        "model_type": "llama",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "rope_theta": float(arch.rope_theta),
        "rope_scaling": rope_scaling,
        "rms_norm_eps": arch.norm_eps,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def arch_to_dict(arch: LlamaArch) -> dict:
    return dataclasses.asdict(arch)


def arch_from_dict(data: dict) -> LlamaArch:
    fields = {f.name for f in dataclasses.fields(LlamaArch)}
    unknown = set(data) - fields
    if unknown:
        raise ConversionError(f"unknown architecture fields {sorted(unknown)}; written by a newer megatron_tgdpo?")
    return LlamaArch(**data)


def set_dtype(config: dict, dtype: str) -> dict:
    """``config`` with its dtype entry (``torch_dtype`` in 4.x, ``dtype`` in 5.x) set to ``dtype``."""
    out = dict(config)
    keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
    for key in keys:
        out[key] = dtype
    return out


def config_dtype(config: dict) -> Optional[str]:
    return config.get("torch_dtype") or config.get("dtype")
