"""Load a Hugging Face directory (converted on the fly) or our converted format into model chunks.

Works at any TP/PP/VPP: each rank walks its own parameters (global layer numbers from
:func:`megatron_tgdpo.models.state_dict.local_full_names`) and reads only its shard:

* pipeline stages read only their layers' tensors (plus embedding / final norm / output layer where held);
* TP shards split on dim 0 (qkv, fc1, embedding, output layer) read only their rows, which are
  contiguous byte ranges of the safetensors files (``get_slice``); a qkv shard maps to the q/k/v rows of
  its query groups, an fc1 shard to its gate and up rows;
* shards split on dim 1 (linear_proj, linear_fc2) read their columns: a strided read that touches
  every row of the tensor, i.e. about its share of the bytes when rows span several pages;
* norms are replicated and read by every rank (a few KB).

Every data-parallel replica reads the same bytes (the page cache serves repeats on one node).
Memory beyond the model: one shard being copied.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from megatron_tgdpo.convert.converted import is_converted_directory, open_converted
from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.convert.hf_source import is_hf_directory, megatron_views_from_hf, open_hf
from megatron_tgdpo.convert.hf_config import LLAMA3_FIXED
from megatron_tgdpo.convert.layout import canonical_layer_name
from megatron_tgdpo.convert.views import TensorView, read_shard
from megatron_tgdpo.data.gguf_tokenizer import is_gguf_file
from megatron_tgdpo.models.llama import LlamaArch
from megatron_tgdpo.models.state_dict import unwrap


def open_for_loading(path: str | Path) -> tuple[LlamaArch, dict[str, TensorView]]:
    path = Path(path)
    if is_converted_directory(path):
        _, arch, views = open_converted(path)
        return arch, views
    if is_hf_directory(path) or is_gguf_file(path):
        _, arch, hf_views = open_hf(path)
        return arch, megatron_views_from_hf(arch, hf_views)
    raise ConversionError(f"{path}: neither a Hugging Face model directory, a GGUF file nor a converted checkpoint")


def checkpoint_arch(path: str | Path) -> LlamaArch:
    """The architecture of a Hugging Face or converted directory (to build the model before loading)."""
    return open_for_loading(path)[0]


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """Llama 3.1 RoPE frequency scaling (published reference formula), for the model check only."""
    low, high = LLAMA3_FIXED["low_freq_factor"], LLAMA3_FIXED["high_freq_factor"]
    old = LLAMA3_FIXED["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    return torch.where((wavelen >= old / high) & (wavelen <= old / low), mid, out)


def model_mismatches(arch: LlamaArch, module: torch.nn.Module) -> list[str]:
    """What differs between ``arch`` and the model chunk as built (empty when they agree)."""
    cfg = module.config
    got = {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups or cfg.num_attention_heads,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "head_dim": cfg.kv_channels,
        "vocab_size": getattr(module, "vocab_size", arch.vocab_size),
        "tie_word_embeddings": getattr(module, "share_embeddings_and_output_weights", arch.tie_word_embeddings),
        "rope_theta": getattr(module, "rotary_base", int(arch.rope_theta)),
        "rope_scaling": getattr(module, "rotary_scaling", arch.rope_scaling_factor is not None),
    }
    want = {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "rope_theta": int(arch.rope_theta),
        "rope_scaling": arch.rope_scaling_factor is not None,
    }
    out = [f"{k}: model {got[k]} vs checkpoint {want[k]}" for k in want if got[k] != want[k]]
    if not math.isclose(cfg.layernorm_epsilon, arch.norm_eps, rel_tol=1e-6):
        out.append(f"norm_eps: model {cfg.layernorm_epsilon} vs checkpoint {arch.norm_eps}")
    rotary = getattr(module, "rotary_pos_emb", None)
    if not out and rotary is not None and arch.rope_scaling_factor is not None and hasattr(rotary, "inv_freq"):
        hd = arch.head_dim
        base = 1.0 / (arch.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        expected = _llama3_inv_freq(base, arch.rope_scaling_factor)
        if not torch.allclose(rotary.inv_freq.float().cpu(), expected, rtol=1e-4, atol=0):
            out.append(f"rope_scaling_factor: the model's RoPE frequencies do not match factor "
                       f"{arch.rope_scaling_factor}")
    return out


def load_into_model(path: str | Path, chunks: list[torch.nn.Module]) -> LlamaArch:
    """Fill this rank's ``chunks`` from ``path`` (HF directory or converted format); returns its arch."""
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.models.state_dict import local_full_names

    arch, views = open_for_loading(path)
    modules = [unwrap(chunk) for chunk in chunks]
    for module in modules:
        diff = model_mismatches(arch, module)
        if diff:
            raise ConversionError(
                f"{path}: the model was built for a different architecture than the checkpoint: "
                + "; ".join(diff) + " (build it from convert.checkpoint_arch(path))"
            )
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for name, (param, dim, stride) in local_full_names(modules).items():
        key = canonical_layer_name(name)
        if key == "output_layer.weight" and arch.tie_word_embeddings:
            key = "embedding.word_embeddings.weight"  # the last pipeline stage's copy of the tied matrix
        if key not in views:
            raise ConversionError(f"{path}: has no tensor for model parameter {name}")
        shard = read_shard(views[key], dim=dim, stride=stride, rank=rank, size=size)
        if tuple(shard.shape) != tuple(param.shape):
            raise ConversionError(
                f"{path}: {key} shard is {tuple(shard.shape)} but the model parameter is {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(shard)
    return arch
