"""Llama-family presets -> megatron-core ``TransformerConfig``, and the per-stage ``GPTModel`` builder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_tgdpo import compat
from megatron_tgdpo.models.rope_positions import install_row_positions


@dataclass(frozen=True)
class LlamaArch:
    """What defines a Llama-family network (the part of a HF ``config.json`` we honour)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0
    # Llama 3.1/3.2 frequency scaling (factor; low/high freq factors 1/4, original context 8192).
    rope_scaling_factor: Optional[float] = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        h, f, v, n = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        kv = self.num_query_groups * self.head_dim
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return n * per_layer + emb + h


PRESETS: dict[str, LlamaArch] = {
    # Small enough for 2-core CPU tests; divisible layouts for TP<=4, PP<=4, virtual stages 2.
    "tiny": LlamaArch(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=128,
        vocab_size=256, max_position_embeddings=512, rope_theta=10000.0,
    ),
    "llama3.2-1b": LlamaArch(
        num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=8192,
        vocab_size=128256, max_position_embeddings=131072, rope_scaling_factor=32.0, tie_word_embeddings=True,
    ),
    "llama3-8b": LlamaArch(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=14336,
        vocab_size=128256, max_position_embeddings=8192,
    ),
    "llama3-70b": LlamaArch(
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8, ffn_hidden_size=28672,
        vocab_size=128256, max_position_embeddings=8192,
    ),
}


def preset(name: str, **overrides) -> LlamaArch:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False


@dataclass(frozen=True)
class Precision:
    bf16: bool = False
    fp8_format: Optional[str] = None  # "hybrid" | "e4m3" (TransformerEngine only)

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def check_layout(arch: LlamaArch, layout: ParallelLayout) -> None:
    """Raise ValueError naming the flag to change when ``layout`` cannot split ``arch``."""
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    vpp = layout.virtual_pipeline_model_parallel_size or 1
    problems = []
    if arch.num_attention_heads % tp:
        problems.append(f"--tensor-model-parallel-size {tp} must divide the {arch.num_attention_heads} attention heads")
    if arch.num_query_groups % tp:
        problems.append(f"--tensor-model-parallel-size {tp} must divide the {arch.num_query_groups} KV heads (query groups)")
    if arch.ffn_hidden_size % tp:
        problems.append(f"--tensor-model-parallel-size {tp} must divide ffn_hidden_size {arch.ffn_hidden_size}")
    if arch.vocab_size % tp:
        problems.append(f"--tensor-model-parallel-size {tp} must divide the vocabulary size {arch.vocab_size}")
    if arch.num_layers % (pp * vpp):
        problems.append(
            f"{arch.num_layers} layers cannot be split into --pipeline-model-parallel-size {pp} x "
            f"virtual stages {vpp}; choose sizes whose product divides the layer count"
        )
    if layout.sequence_parallel and tp == 1:
        problems.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if problems:
        raise ValueError("invalid parallel layout:\n  " + "\n  ".join(problems))


def transformer_config(arch: LlamaArch, layout: ParallelLayout, precision: Precision = Precision(), *,
                       variable_seq_lengths: bool = False):
    """A megatron-core ``TransformerConfig`` for ``arch`` under ``layout``.

    ``variable_seq_lengths``: pipeline stages exchange each micro-batch's shape before its activations
    (packed rows of different lengths with PP; a few bytes per send)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_layout(arch, layout)
    on_gpu = torch.cuda.is_available()
    fp8 = {}
    if precision.fp8_format:
        if not compat.te_available():
            raise ValueError("--fp8-format needs TransformerEngine on a CUDA machine; drop the flag on CPU")
        fp8 = dict(fp8=precision.fp8_format, fp8_recipe="delayed")
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=precision.params_dtype,
        pipeline_dtype=precision.params_dtype,
        bf16=precision.bf16,
        # CUDA-extension fusions: only where the extensions exist.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # Losses return (numerator, count): exact global means for any number of pairs or tokens per
        # micro-batch (runtime/schedule.py, docs/loss.md).
        calculate_per_token_loss=True,
        variable_seq_lengths=variable_seq_lengths,
        # megatron-core validates the MoE dispatcher even for dense models; only alltoall allows
        # variable sequence lengths (no expert exists here, so nothing is dispatched).
        **({"moe_token_dispatcher_type": "alltoall"} if variable_seq_lengths else {}),
        use_cpu_initialization=not on_gpu,
        **compat.cpu_config_overrides(),
        **fp8,
    )


def layer_spec(config, *, use_te: Optional[bool] = None):
    """TransformerEngine layer spec on GPU when TE is installed, else the local spec with our
    SP-capable RMSNorm and CP-capable core attention (swapped through the ModuleSpec, not ``if``s)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = compat.te_available()
    if use_te:
        from megatron_tgdpo.models.te_shared_prompt import shared_prompt_te_attention

        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
        # megatron's TE attention, plus shared-prompt rows (the same call for every other row)
        spec.submodules.self_attention.submodules.core_attention = shared_prompt_te_attention()
        return spec
    from megatron_tgdpo.models.layers import ContextParallelAttention, RMSNorm

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    sub.self_attention.submodules.core_attention = ContextParallelAttention
    return spec


def block_spec(config, *, vp_stage: Optional[int] = None, use_te: Optional[bool] = None):
    """Layer specs for this pipeline stage plus the final norm (ours for the local spec)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if use_te is None:
        use_te = compat.te_available()
    layer = layer_spec(config, use_te=use_te)
    if use_te:
        return layer  # GPTModel builds TE's final norm itself
    from megatron_tgdpo.models.layers import RMSNorm

    n = compat.num_layers_on_stage(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=RMSNorm)


def build_stage(
    arch: LlamaArch,
    config,
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: Optional[int] = None,
    use_te: Optional[bool] = None,
):
    """One pipeline stage (or virtual stage) of the model as a megatron-core ``GPTModel``."""
    from megatron.core.models.gpt import GPTModel

    compat.silence_known_warnings()
    kwargs = dict(
        config=config,
        transformer_layer_spec=block_spec(config, vp_stage=vp_stage, use_te=use_te),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # keep logits vocab-sharded: log-probs are computed vocab-parallel
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    model = GPTModel(**kwargs)
    install_row_positions(model)  # shared-prompt rows: RoPE at the rows' positions (a no-op otherwise)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device)


def build_model(arch: LlamaArch, config, *, use_te: Optional[bool] = None) -> list:
    """All model chunks this rank holds (one, or several with virtual pipeline stages)."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    chunks = []
    for vp_stage in stages:
        first, last = compat.stage_position(vp_stage)
        chunks.append(build_stage(arch, config, pre_process=first, post_process=last, vp_stage=vp_stage, use_te=use_te))
    return chunks
