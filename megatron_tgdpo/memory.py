"""Per-GPU memory estimate of DPO / TGDPO training: weights, gradients, optimizer, frozen models, activations.

Every number is bytes on one GPU of one pipeline stage; :func:`estimate` evaluates the first and the
last stage (the only ones that differ from the middle ones) and the worst counts. Notation: ``L`` layers,
``h`` hidden, ``f`` FFN hidden, ``kv = query_groups x head_dim``, ``V`` vocabulary, ``a`` heads,
``t``/``p``/``v``/``c``/``d`` = TP/PP/virtual stages/CP/DP, ``b`` pairs per micro-batch (``2b`` rows: chosen
and rejected are concatenated), ``s`` sequence length.

Parameters on one GPU (megatron-core GPTModel, Llama block without biases):
    per layer         (h(h + 2kv) + h^2 + 3hf) / t  +  2h          (qkv, proj, fc1 = [gate; up], fc2; 2 norms)
    stage layers      L / p layers (with virtual stages: v chunks of L/(pv))
    first stage       + V h / t                                  (vocab-parallel embedding)
    last stage        + h + V h / t                              (final norm, output layer; a tied embedding
                                                                  keeps a copy there when p > 1)

Bytes per parameter (megatron DDP with ``grad_reduce_in_fp32``, Adam):
    policy weights    2 (bf16) or 4 (fp32)
    gradients         4: the fp32 main-grad buffer holds every local parameter, also with the
                      distributed optimizer (it reduce-scatters into that buffer, it does not shrink it)
    optimizer         bf16: fp32 master + 2 fp32 moments = 12; fp32: 2 moments = 8;
                      divided by d x c with the distributed optimizer (it shards over DP x CP)
    frozen models     same parameters as the policy, weights only: reference (+ guidance for TGDPO)
    FP8 (TE)          weights stay bf16; TE keeps an FP8 copy of each linear weight (+1 byte per linear
                      parameter) and for the trained policy also its transpose (+2)

Activations (no recompute, bf16, flash attention), bytes saved for backward per token per layer:
    norm1 in 2h, norm1 out 2h, q 2h, k 2kv, v 2kv, attention out 2h (also the proj input), softmax
    statistics 4a (fp32), norm2 in 2h, norm2 out 2h, fc1 out 4f (gate and up), fc2 in 2f
      with sequence parallelism:    (12h + 4kv + 6f + 4a) / t
      without:                      8h + (4h + 4kv + 6f + 4a) / t       (the 4 norm tensors are replicated)
    without flash attention add the softmax probabilities 2as / t (every query token attends to all s
    keys, also under CP); torch's scaled_dot_product_attention on CPU is a flash kernel (it saves no
    probabilities).
    Local layers (megatron's local spec, no TransformerEngine: every CPU run) save more than the fused
    TE layers, per token and layer (``local_layer_bytes_per_token``; e the activation bytes):
      RMSNorm in fp32 math          2 x (4h + (4 - e)h)    the normalised fp32 intermediate of each norm,
                                                           and for e < 4 its fp32 copy of the input
      attention output              e h / t                the attention's own output and the
                                                           projection's contiguous input are two tensors
      SwiGLU                        2 e f / t              silu(gate) and (up + offset) are new tensors
      RoPE tables                   16 d                   cos and sin, for q and k, fp32, per token
                                                           (d = head_dim; packed rows: per sequence; a
                                                           padded micro-batch's rows share theirs)
    (the norm terms are divided by t with sequence parallelism, as the norm tensors are).
    One micro-batch of one layer: ``2b x s/c`` tokens times that. (The Korthikanti et al. 2022 count,
    for a SwiGLU block with GQA, no dropout and flash attention.) FP8 activation savings are not
    modelled, so with FP8 this is an upper bound.

Micro-batches in flight on pipeline rank r (1F1B keeps its warm-up forwards plus one), in layers:
    no virtual stages     min(p - r, m) x L/p                       first stage: L, last: L/p
    v virtual stages      min(2(p - r - 1) + (v - 1)p + 1, m v) x L/(p v)
                                                                    first stage: L (1 + (p - 1)/(p v))
    where m = micro-batches per step (``global batch / (b d)``; assumed large when not given).

Logits (last stage). Plain head (``--no-fused-logprobs``): the LM head output ``2b s/c x V/t`` in the
activation dtype is kept for the backward of the vocab-parallel log-probs and its gradient of the same
size exists during backward, plus the op's one fp32 ``[chunk, V/t]`` work buffer. Fused head (the
default): no logits at all; the op's chunk buffers (fp32 work buffer, and a logits chunk in the
activation dtype) plus an fp32 ``[tokens, h]`` hidden-gradient accumulator. ``chunk`` is
``--logits-chunk-size`` tokens, or by default the tokens whose fp32 row block is 128 MiB
(``ops.DEFAULT_CHUNK_BYTES``). A packed micro-batch holds at most ``2b x s`` tokens, the same as a
padded one, so packing does not change these figures (it changes how many of the tokens are real).

Not counted: CUDA context, NCCL buffers, allocator fragmentation (leave a few GiB: see ``reserve``),
the frozen models' scoring pass (it runs before the policy step, when no policy activations are alive,
and needs one micro-batch's transients), and pipeline send/receive buffers (``2b s/c x h`` each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_tgdpo.models.llama import LlamaArch
from megatron_tgdpo.ops import DEFAULT_CHUNK_BYTES

__all__ = [
    "GIB",
    "MemoryEstimate",
    "StageMemory",
    "activation_bytes_per_token_layer",
    "local_layer_bytes_per_token",
    "estimate",
    "format_table",
    "in_flight_layers",
    "layer_parameters",
    "logits_bytes",
    "stage_parameters",
]

GIB = float(2**30)
# Frozen models a run builds: the reference (and guidance) its loss reads; SimPO and SFT read none, and
# a run with --logprob-cache builds none (``estimate(logprob_cache=True)``).
FROZEN_MODELS = {"tgdpo": 2, "dpo": 1, "ipo": 1, "simpo": 0, "sft": 0, "rm": 0}


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------


def layer_parameters(arch: LlamaArch, *, tensor_model_parallel_size: int = 1) -> tuple[float, float]:
    """(TP-sharded linear weights, replicated norm weights) of one transformer layer on one GPU."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    kv = arch.num_query_groups * arch.head_dim
    linear = h * (h + 2 * kv) + h * h + 3 * h * f
    return linear / tensor_model_parallel_size, 2.0 * h


@dataclass(frozen=True)
class StageParameters:
    linear: float  # transformer linear weights (what FP8 casts)
    other: float  # embedding, output layer, norms

    @property
    def total(self) -> float:
        return self.linear + self.other


def stage_parameters(
    arch: LlamaArch,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    first: bool,
    last: bool,
) -> StageParameters:
    """Parameters one GPU holds on a pipeline stage (``first``/``last`` both true without PP)."""
    t, p = tensor_model_parallel_size, pipeline_model_parallel_size
    if arch.num_layers % p:
        raise ValueError(f"--pipeline-model-parallel-size {p} must divide the {arch.num_layers} layers")
    linear, norms = layer_parameters(arch, tensor_model_parallel_size=t)
    layers = arch.num_layers // p
    vocab = arch.vocab_size * arch.hidden_size / t
    other = layers * norms
    if first:
        other += vocab
    if last:
        other += arch.hidden_size  # final norm
        if not arch.tie_word_embeddings or not first:
            other += vocab  # untied output layer, or the tied embedding's copy on the last stage
    return StageParameters(linear=layers * linear, other=other)


# ------------------------------------------------------------------------------------------------
# activations
# ------------------------------------------------------------------------------------------------


def activation_bytes_per_token_layer(
    arch: LlamaArch,
    *,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    seq_length: int,
    flash_attention: bool = True,
    bytes_per_element: int = 2,
) -> float:
    """Bytes one layer saves for backward per token this GPU processes (formula in the module doc)."""
    h, f, a = arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads
    kv = arch.num_query_groups * arch.head_dim
    t = tensor_model_parallel_size
    e = bytes_per_element
    replicated = 4 * e * h  # norm inputs and outputs
    sharded = e * (2 * h + 2 * kv + 3 * f) + 4 * a  # q, attention out, k, v, fc1 out (2f), fc2 in; fp32 lse
    if not flash_attention:
        sharded += e * a * seq_length  # softmax probabilities: a rows over all s keys per query token
    if sequence_parallel:
        return (replicated + sharded) / t
    return replicated + sharded / t


def local_layer_bytes_per_token(
    arch: LlamaArch,
    *,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    bytes_per_element: int = 2,
) -> float:
    """What one layer of megatron's local spec (no TransformerEngine) saves for backward per token on top
    of :func:`activation_bytes_per_token_layer` (formula in the module doc)."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    t = tensor_model_parallel_size
    e = bytes_per_element
    norms = 2 * (4 * h + max(4 - e, 0) * h)
    sharded = e * h + 2 * e * f
    rope = 16 * d
    return (norms / t if sequence_parallel else norms) + sharded / t + rope


def in_flight_layers(
    *,
    num_layers: int,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    pipeline_rank: int = 0,
    num_microbatches: Optional[int] = None,
) -> float:
    """Layer-micro-batches whose activations pipeline rank ``pipeline_rank`` holds at its peak (1F1B)."""
    p, v = pipeline_model_parallel_size, virtual_pipeline_model_parallel_size or 1
    m = num_microbatches if num_microbatches is not None else math.inf
    if v == 1:
        return min(p - pipeline_rank, m) * num_layers / p
    chunks = min(2 * (p - pipeline_rank - 1) + (v - 1) * p + 1, m * v)
    return chunks * num_layers / (p * v)


def logits_bytes(
    arch: LlamaArch,
    *,
    tokens: float,
    tensor_model_parallel_size: int = 1,
    logits_chunk_size: Optional[int] = None,
    bytes_per_element: int = 2,
    fused: bool = False,
) -> float:
    """Plain head: saved logits + their gradient (activation dtype) + the fp32 ``[chunk, V/t]`` work
    buffer (``logits_chunk_size`` None: all tokens). Fused head: the chunk buffers (chunk None: the
    128 MiB default) + the fp32 hidden-gradient accumulator; no logits."""
    shard_vocab = arch.vocab_size / tensor_model_parallel_size
    if fused:
        chunk = min(logits_chunk_size or max(1, DEFAULT_CHUNK_BYTES // int(4 * shard_vocab)), tokens)
        buffers = chunk * shard_vocab * (4 + (bytes_per_element if bytes_per_element != 4 else 0))
        return buffers + 4 * tokens * arch.hidden_size
    chunk = min(logits_chunk_size or tokens, tokens)
    return 2 * tokens * shard_vocab * bytes_per_element + 4 * chunk * shard_vocab


# ------------------------------------------------------------------------------------------------
# the estimate
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of one pipeline stage, by component."""

    name: str
    parameters: float
    policy_weights: float
    gradients: float
    optimizer: float
    frozen_weights: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return (self.policy_weights + self.gradients + self.optimizer + self.frozen_weights
                + self.activations + self.logits)


@dataclass(frozen=True)
class MemoryEstimate:
    stages: list[StageMemory]
    data_parallel_size: int
    frozen_models: int
    num_microbatches: Optional[int]
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)


def estimate(
    arch: LlamaArch,
    *,
    num_gpus: int,
    micro_batch_size: int,
    seq_length: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    use_distributed_optimizer: bool = False,
    bf16: bool = True,
    fp8_format: Optional[str] = None,
    loss_type: str = "tgdpo",
    global_batch_size: Optional[int] = None,
    logits_chunk_size: Optional[int] = 4096,
    flash_attention: bool = True,
    fused_logprobs: bool = False,
    logprob_cache: bool = False,
    local_layers: bool = False,
) -> MemoryEstimate:
    """Per-GPU bytes of the first and the last pipeline stage (one entry without PP)."""
    t, p, c = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    v = virtual_pipeline_model_parallel_size
    if min(t, p, c, num_gpus, micro_batch_size, seq_length) < 1:
        raise ValueError("sizes, --num-gpus, --micro-batch-size and --seq-length must be >= 1")
    if num_gpus % (t * p * c):
        raise ValueError(f"--num-gpus {num_gpus} is not divisible by TP x PP x CP = {t} x {p} x {c}")
    if arch.num_layers % (p * (v or 1)):
        raise ValueError(f"PP {p} x virtual stages {v or 1} must divide the {arch.num_layers} layers")
    if loss_type not in FROZEN_MODELS:
        raise ValueError(f"--loss-type {loss_type!r}: choose one of {sorted(FROZEN_MODELS)}")
    d = num_gpus // (t * p * c)
    m = None
    if global_batch_size is not None:
        if global_batch_size % (micro_batch_size * d):
            raise ValueError(f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size "
                             f"{micro_batch_size} x DP {d}")
        m = global_batch_size // (micro_batch_size * d)
    weight_bytes = 2 if bf16 else 4
    optimizer_bytes = (12 if bf16 else 8) / (d * c if use_distributed_optimizer else 1)
    frozen = 0 if logprob_cache else FROZEN_MODELS[loss_type]
    fp8_policy, fp8_frozen = (2, 1) if fp8_format else (0, 0)
    tokens = 2 * micro_batch_size * seq_length / c  # chosen + rejected rows, this CP rank's share
    per_layer = tokens * activation_bytes_per_token_layer(
        arch, tensor_model_parallel_size=t, sequence_parallel=sequence_parallel, seq_length=seq_length,
        flash_attention=flash_attention, bytes_per_element=weight_bytes)
    if local_layers:
        per_layer += tokens * local_layer_bytes_per_token(
            arch, tensor_model_parallel_size=t, sequence_parallel=sequence_parallel, bytes_per_element=weight_bytes)

    if p == 1:
        positions = [("first & last", 0, True, True)]
    else:
        positions = [("first", 0, True, False), ("last", p - 1, False, True)]
    stages = []
    for name, rank, first, last in positions:
        params = stage_parameters(arch, tensor_model_parallel_size=t, pipeline_model_parallel_size=p,
                                  first=first, last=last)
        layers = in_flight_layers(num_layers=arch.num_layers, pipeline_model_parallel_size=p,
                                  virtual_pipeline_model_parallel_size=v, pipeline_rank=rank, num_microbatches=m)
        activations = layers * per_layer
        logits = 0.0
        if last:
            # final norm input + output of the last micro-batch, then the logits
            norm = 2 * weight_bytes * arch.hidden_size * tokens / (t if sequence_parallel else 1)
            activations += norm
            logits = logits_bytes(arch, tokens=tokens, tensor_model_parallel_size=t,
                                  logits_chunk_size=logits_chunk_size, bytes_per_element=weight_bytes,
                                  fused=fused_logprobs)
        stages.append(StageMemory(
            name=name,
            parameters=params.total,
            policy_weights=params.total * weight_bytes + params.linear * fp8_policy,
            gradients=params.total * 4,
            optimizer=params.total * optimizer_bytes,
            frozen_weights=frozen * (params.total * weight_bytes + params.linear * fp8_frozen),
            activations=activations,
            logits=logits,
        ))
    notes = []
    if m is not None and m < p:
        notes.append(f"only {m} micro-batches per step for PP {p}: the pipeline never fills "
                     "(raise --global-batch-size)")
    return MemoryEstimate(stages=stages, data_parallel_size=d, frozen_models=frozen, num_microbatches=m, notes=notes)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

ROWS = (
    ("policy weights", "policy_weights"),
    ("gradients (fp32 main grads)", "gradients"),
    ("optimizer (Adam, fp32)", "optimizer"),
    ("frozen model weights", "frozen_weights"),
    ("activations (1F1B in flight)", "activations"),
    ("logits + log-prob chunk", "logits"),
)


def format_table(est: MemoryEstimate, *, capacity_gib: float = 80.0, reserve_gib: float = 4.0) -> tuple[str, list[str]]:
    """(the table, warnings). Columns: each evaluated pipeline stage, in GiB per GPU."""
    width = 30
    header = f"{'per GPU, GiB':<{width}}" + "".join(f"{s.name + ' stage':>20}" for s in est.stages)
    lines = [header, "-" * len(header)]
    lines.append(f"{'parameters on this GPU':<{width}}" + "".join(f"{s.parameters / 1e9:>19.3f}B" for s in est.stages))
    for label, attr in ROWS:
        lines.append(f"{label:<{width}}" + "".join(f"{getattr(s, attr) / GIB:>20.2f}" for s in est.stages))
    lines.append("-" * len(header))
    lines.append(f"{'total':<{width}}" + "".join(f"{s.total / GIB:>20.2f}" for s in est.stages))
    lines.append(f"{'of ' + format(capacity_gib, 'g') + ' GiB':<{width}}"
                 + "".join(f"{100 * s.total / GIB / capacity_gib:>19.0f}%" for s in est.stages))
    warnings = list(est.notes)
    worst = est.worst
    total = worst.total / GIB
    if total > capacity_gib:
        warnings.append(
            f"OVER: the {worst.name} stage needs {total:.1f} GiB of {capacity_gib:g} GiB; raise TP/PP/CP, use "
            "--use-distributed-optimizer and --sequence-parallel, or lower --micro-batch-size / --seq-length"
        )
    elif total > capacity_gib - reserve_gib:
        warnings.append(
            f"TIGHT: the {worst.name} stage leaves {capacity_gib - total:.1f} GiB for CUDA context, NCCL buffers and "
            f"allocator fragmentation (plan for >= {reserve_gib:g} GiB)"
        )
    return "\n".join(lines), warnings
