"""The one place that knows about megatron-core versions and about running it without CUDA.

Three jobs, nothing else:

1. **Version differences.** The project supports megatron-core 0.16.x (the newest that installs on
   Python 3.11, our CI) and 0.19.x (clusters, Python 3.12). Anything that differs between them is
   guarded here, so the rest of the code calls one name.

2. **CPU shims.** megatron-core assumes CUDA in a handful of places (RNG tracker, buffer devices,
   ``torch.cuda.synchronize`` in p2p and checkpoint save, a few hard-coded ``device="cuda"``).
   :func:`apply_cpu_shims` makes those run on a CPU-only torch so that TP/PP/CP/DP can be tested with
   gloo. It is a no-op whenever CUDA is available: GPU runs never see a shim.

   What it does, and why each piece is needed:

   * ``torch.cuda.current_device`` returns ``torch.device("cpu")``: megatron allocates buffers on
     ``device=torch.cuda.current_device()`` everywhere (p2p shapes, embeddings, RoPE, gathers).
   * ``torch.cuda.synchronize`` / ``torch.cuda.empty_cache`` become no-ops (p2p, checkpointing), and
     ``torch.cuda.current_stream`` / ``torch.cuda.stream`` give a no-op stream (0.19 DDP grad sync).
   * The CUDA RNG API used by megatron's ``CudaRNGStatesTracker`` is routed to the CPU generator,
     so ``model_parallel_cuda_manual_seed`` and ``tracker.fork()`` work (the tracker then switches
     CPU generator states, which is exactly the semantics it has for the CUDA generator).
   * A :class:`torch.overrides.TorchFunctionMode` rewrites a ``cuda`` device argument to ``cpu``,
     makes ``Tensor.cuda()`` return the tensor itself, and reports CPU tensor types under their CUDA
     names (``Tensor.type()``): it catches the hard-coded ``torch.zeros(..., device="cuda")`` in
     schedules, grad clipping and the optimizer, and their ``'torch.cuda.FloatTensor'`` checks,
     without patching those modules one by one.

     The hook costs a Python call on every torch call (~20 us on the 2-core development machine, 5x
     a small op), so the model's forward and loss run with it paused (:func:`hot_path`): at context
     parallelism 1 megatron-core's model forward makes no CUDA-specific call (every layout's tests run
     it so), while its context-parallel RoPE helper moves a pinned index with ``.cuda()``, so under CP
     the hook stays on. Autograd's backward never passes through a function mode, and the schedules,
     the optimizer and set-up, where the hard-coded ``device="cuda"`` calls are, keep it.

3. **torch differences** the hot path cares about: grouped-query attention without copying K/V
   (:func:`grouped_query_sdpa`), and causal attention that pays for the lower triangle only on CPU,
   whose flash kernel computes whole 512-key tiles (:func:`causal_sdpa`).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Iterator

import torch
from packaging.version import Version

# --------------------------------------------------------------------------------------------
# megatron-core version
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def mcore_version() -> Version:
    """Installed megatron-core version."""
    from megatron.core import package_info

    return Version(package_info.__version__)


def silence_known_warnings() -> None:
    """0.19 warns that ``GPTModel`` is deprecated in favour of ``HybridModel``; it still works and is
    the documented model class for the versions we support, so the notice is noise in every rank's log."""
    warnings.filterwarnings("ignore", message=".*GPTModel.*deprecated.*")
    warnings.filterwarnings("ignore", message=".*HybridModel.*")


# --------------------------------------------------------------------------------------------
# torch attention: grouped-query heads without copying K/V where the installed torch can
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def sdpa_has_gqa() -> bool:
    """``scaled_dot_product_attention`` takes ``enable_gqa`` (torch >= 2.5)."""
    import inspect

    try:
        return "enable_gqa" in inspect.signature(torch.nn.functional.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: ask the version instead
        return Version(torch.__version__.split("+")[0]) >= Version("2.5")


def grouped_query_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``scaled_dot_product_attention`` over ``[b, heads, s, d]`` queries and ``[b, groups, s, d]``
    keys/values (``heads`` a multiple of ``groups``). Where torch supports it the groups are broadcast
    inside the kernel (``enable_gqa``); older torch gets K/V repeated per head (a copy)."""
    rep = query.shape[1] // key.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if rep == 1:
        return sdpa(query, key, value, **kwargs)
    if sdpa_has_gqa():
        return sdpa(query, key, value, enable_gqa=True, **kwargs)
    return sdpa(query, key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1), **kwargs)


# Query rows per kernel call of :func:`causal_sdpa`'s CPU path: 96-192 measured alike at 300-1,024 tokens, 256 slower
# (docs/performance.md, "Causal attention on CPU: query chunks").
CPU_CAUSAL_CHUNK = 128


@functools.lru_cache(maxsize=None)
def _cpu_flash_ops() -> Any:
    """torch's CPU flash-attention forward and backward ops (``None`` where this torch lacks them)."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu")
            and hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward")):
        return None
    return ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward


class _ChunkedCausalAttention(torch.autograd.Function):
    """Causal attention as query chunks over key prefixes (see :func:`causal_sdpa`), with the kernel's
    own backward per chunk. The key and value gradients of the chunks are added into one buffer in
    place: through autograd, every chunk's prefix slice would cost a zero-filled full-size gradient, a
    copy and an add, which takes back what the chunks save."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                chunk: int) -> torch.Tensor:
        forward_op, _ = _cpu_flash_ops()
        s = query.shape[2]
        # band[i, j] = 0 where j <= i + s, else -inf. Chunk [m, e)'s mask is band[:e - m, s - m : s - m + e]:
        # query m + i sees key p where p <= m + i (bottom-right causal over the prefix [0, e)).
        band = torch.full((chunk, s + chunk), float("-inf"), dtype=query.dtype, device=query.device).triu(s + 1)
        spans, outs, lses = [], [], []
        for m in range(0, s, chunk):
            e = min(m + chunk, s)
            mask = None if m == 0 else band[: e - m, s - m : s - m + e]
            out, lse = forward_op(query[:, :, m:e], key[:, :, :e], value[:, :, :e], 0.0, m == 0,
                                  attn_mask=mask, scale=scale)
            spans.append((m, e, mask))
            outs.append(out)
            lses.append(lse)
        out = torch.cat(outs, dim=2)
        # The joined output, not the chunks': backward reads each chunk's rows as a view of it, so the
        # attention output is held once (the projection after it keeps it too).
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _, backward_op = _cpu_flash_ops()
        query, key, value, out, *lses = ctx.saved_tensors
        grad_q = torch.empty_like(query)
        grad_k = torch.zeros_like(key)
        grad_v = torch.zeros_like(value)
        for (m, e, mask), lse in zip(ctx.spans, lses):
            gq, gk, gv = backward_op(grad[:, :, m:e], query[:, :, m:e], key[:, :, :e], value[:, :, :e],
                                     out[:, :, m:e], lse, 0.0, m == 0, attn_mask=mask, scale=ctx.scale)
            grad_q[:, :, m:e] = gq
            grad_k[:, :, :e] += gk
            grad_v[:, :, :e] += gv
        return grad_q, grad_k, grad_v, None, None


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float,
                dropout_p: float = 0.0) -> torch.Tensor:
    """Causal :func:`grouped_query_sdpa` over ``[b, heads, s, d]`` / ``[b, groups, s, d]``, the same
    queries as keys.

    On CPU, sequences longer than :data:`CPU_CAUSAL_CHUNK` run in query chunks. torch's CPU flash
    kernel computes whole key tiles of up to 512 columns and masks the part above the diagonal, so a
    causal sequence of up to 512 tokens costs what full attention does (about 0.9-1.1x, forward and
    backward) and longer ones pay for a 512-wide triangle per query tile. Chunk ``[m, e)`` of the
    queries attends to keys ``[0, e)`` under an additive mask (bottom-right causal), and only the
    first chunk is a causal square: about ``s^2 / 2 + s * chunk / 2`` scores instead of ``~s^2``.
    The result is the same softmax over the same keys (rounding differs). CUDA kernels skip the
    masked tiles themselves, so GPU calls go straight through, as do calls with dropout (whose
    random stream chunking would change) and a torch without the CPU flash ops."""
    s = query.shape[2]
    if (query.device.type != "cpu" or dropout_p or s <= CPU_CAUSAL_CHUNK or key.shape[2] != s
            or _cpu_flash_ops() is None):
        return grouped_query_sdpa(query, key, value, is_causal=True, dropout_p=dropout_p, scale=scale)
    return _ChunkedCausalAttention.apply(query, key, value, scale, CPU_CAUSAL_CHUNK)


# --------------------------------------------------------------------------------------------
# Transformer Engine availability (GPU only)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def te_available() -> bool:
    """TransformerEngine's torch extension is importable and CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


# --------------------------------------------------------------------------------------------
# CPU shims
# --------------------------------------------------------------------------------------------

_CPU = torch.device("cpu")
_SHIMS_APPLIED = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "CUDA device index" in torch factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU; ``Tensor.cuda()`` returns the tensor unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron checks ``param.type() == 'torch.cuda.FloatTensor'`` (grad clipping, optimizers).
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class _CpuStream:
    """Stand-in for a CUDA stream: CPU execution is synchronous, so ordering calls are no-ops
    (0.19's DDP grad sync asks for ``torch.cuda.current_stream()`` and waits on events)."""

    def wait_stream(self, *_: Any) -> None: ...
    def wait_event(self, *_: Any) -> None: ...
    def synchronize(self) -> None: ...
    def record_event(self, *_: Any, **__: Any) -> None: ...
    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *_: Any) -> None: ...


_CPU_STREAM = _CpuStream()


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:  # noqa: ARG001 - signature of torch's
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:  # noqa: ARG001
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which is this function.
    torch.default_generator.manual_seed(int(seed))


def cpu_config_overrides() -> dict:
    """TransformerConfig settings that CPU (gloo) runs need; empty with CUDA.

    ``batch_p2p_comm=False``: with interleaved pipeline stages at PP=2 the previous and the next stage
    are the same rank, so a batched ``batch_isend_irecv`` posts two receives from one peer with one tag;
    gloo may match them out of order (activation and gradient have the same shape, so nothing fails,
    the numbers are just swapped). megatron's unbatched path orders sends/receives by rank parity, which
    pairs them correctly. NCCL keeps issue order, so GPU runs keep the batched default.
    """
    return {} if torch.cuda.is_available() else {"batch_p2p_comm": False}


def apply_cpu_shims() -> None:
    """Make megatron-core usable on a CPU-only torch. Idempotent; a no-op when CUDA is available."""
    global _SHIMS_APPLIED
    if _SHIMS_APPLIED or torch.cuda.is_available():
        return

    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda stream=None: _CPU_STREAM  # type: ignore[assignment]
    torch.cuda.manual_seed = _cpu_manual_seed  # type: ignore[assignment]
    torch.cuda.manual_seed_all = _cpu_manual_seed  # type: ignore[assignment]
    torch.cuda.get_rng_state = _cpu_get_rng_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = _cpu_set_rng_state  # type: ignore[assignment]
    torch.cuda.random.get_rng_state = _cpu_get_rng_state  # type: ignore[assignment]
    torch.cuda.random.set_rng_state = _cpu_set_rng_state  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mcore_random

    # The tracker calls these module-level helpers, bound at import time.
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    if hasattr(mcore_random, "_get_cuda_rng_state"):
        mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()

    global _CPU_MODE
    _CPU_MODE = _CudaToCpuMode()
    _CPU_MODE.__enter__()  # stays on the mode stack for the life of the process
    _SHIMS_APPLIED = True


_CPU_MODE: _CudaToCpuMode | None = None


def _hook_on_top() -> bool:
    stack = torch._C._len_torch_function_stack()
    return _CPU_MODE is not None and stack > 0 and torch._C._get_function_stack_at(stack - 1) is _CPU_MODE


@contextlib.contextmanager
def cpu_device_hook_paused() -> Iterator[None]:
    """The CPU device hook (the function mode above) off for the duration; a no-op with CUDA, before
    :func:`apply_cpu_shims`, and when another mode was entered on top of it (it is then left alone)."""
    if not _hook_on_top():
        yield
        return
    _CPU_MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _CPU_MODE.__enter__()


@contextlib.contextmanager
def hot_path(*, context_parallel_size: int) -> Iterator[None]:
    """Around a model forward and its loss: the CPU device hook paused where that code needs none
    (context parallelism 1; see the module docstring), so its hundreds of torch calls per micro-batch
    do not each pay a Python call. A no-op with CUDA."""
    if context_parallel_size != 1:
        yield
        return
    with cpu_device_hook_paused():
        yield


@contextlib.contextmanager
def count_device_hook_calls() -> Iterator[list[int]]:
    """Diagnostics: ``[n]``, the torch calls that went through the CPU device hook in the block (profiling
    tools; a no-op counter with CUDA). The count is taken inside the hook, so paused regions add none."""
    counter = [0]
    if _CPU_MODE is None:
        yield counter
        return
    plain = _CudaToCpuMode.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        counter[0] += 1
        return plain(self, func, types, args, kwargs)

    _CudaToCpuMode.__torch_function__ = counting
    try:
        yield counter
    finally:
        _CudaToCpuMode.__torch_function__ = plain


# --------------------------------------------------------------------------------------------
# Pipeline stage helpers (signatures moved between 0.16 and 0.19)
# --------------------------------------------------------------------------------------------


def num_layers_on_stage(config, *, vp_stage: int | None = None) -> int:
    """Transformer layers this (virtual) pipeline stage builds."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    try:
        return get_num_layers_to_build(config, vp_stage=vp_stage)
    except TypeError:  # older signature without vp_stage
        return get_num_layers_to_build(config)


def stage_position(vp_stage: int | None) -> tuple[bool, bool]:
    """(is first stage, is last stage) of this rank's (virtual) pipeline chunk."""
    from megatron.core import parallel_state as ps

    if vp_stage is None:
        return ps.is_pipeline_first_stage(ignore_virtual=True), ps.is_pipeline_last_stage(ignore_virtual=True)
    return (
        ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
    )


# --------------------------------------------------------------------------------------------
# Optimizer checkpoint state
# --------------------------------------------------------------------------------------------

# Distributed-optimizer state is saved per DP shard ("dp_reshardable"): fully parallel, no gather
# onto one rank (which would not fit at 70B). It reshards across DP sizes, not across TP/PP;
# checkpointing.load_checkpoint refuses a TP/PP change for optimizer state with a clear message.
OPTIMIZER_SHARDING = "dp_reshardable"


def _torch_adams(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = [getattr(o, "optimizer", None) for o in chained]
    return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def _prime_torch_adam_state(optimizer) -> None:
    """Without apex/TE megatron falls back to torch Adam, whose state megatron's ``init_state_fn``
    creates without ``step``; the distributed optimizer's ``state_dict`` then cannot build the
    loading template. Give never-stepped parameters the complete state torch Adam would create."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                state = adam.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
                    state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict: dict, *, is_loading: bool) -> dict:
    if is_loading:
        _prime_torch_adam_state(optimizer)
    metadata = {"distrib_optim_sharding_type": OPTIMIZER_SHARDING, "chained_optim_avoid_prefix": True}
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)


def _param_group_steps(state) -> set:
    """Every ``step`` recorded in the ``param_groups`` of a (possibly chained) optimizer state dict."""
    found = set()
    if isinstance(state, dict):
        for key, value in state.items():
            if key == "param_groups" and isinstance(value, list):
                found.update(float(g["step"]) for g in value if isinstance(g, dict) and g.get("step") is not None)
            else:
                found |= _param_group_steps(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            found |= _param_group_steps(value)
    return found


def load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` plus a fix for the torch-Adam fallback (no apex/TE).

    megatron-core's distributed optimizer keeps torch Adam's ``step`` only in the param groups of its
    checkpoint (the per-parameter sharded state has no ``step``) and on load writes one *shared*
    tensor into every parameter's state, which torch Adam then increments once per parameter. Either
    way the bias correction after a resume would differ from an uninterrupted run, so each parameter
    gets its own ``step`` equal to the checkpoint's.
    """
    with torch.no_grad():  # fp32 distributed optimizer: main params are views of leaf params
        optimizer.load_state_dict(state)
    adams = _torch_adams(optimizer)
    if not adams:
        return
    steps = _param_group_steps(state)
    if len(steps) > 1:
        raise RuntimeError(f"optimizer checkpoint has inconsistent step counts {sorted(steps)}")
    for adam in adams:
        for group in adam.param_groups:
            for p in group["params"]:
                param_state = adam.state[p]
                if steps:
                    param_state["step"] = torch.tensor(next(iter(steps)), dtype=torch.float32)
                elif "step" in param_state:
                    param_state["step"] = param_state["step"].clone()


# --------------------------------------------------------------------------------------------
# Optimizer step that can be skipped (non-finite loss or gradients)
# --------------------------------------------------------------------------------------------


def guarded_optimizer_step(optimizer, *, loss_finite: bool) -> tuple[bool, float]:
    """megatron-core's ``optimizer.step()`` split open so a NaN/Inf step changes no weight.

    The same sequence as ``MegatronOptimizer.step`` / ``ChainedOptimizer.step`` in 0.16 and 0.19
    (prepare grads -> global grad norm -> clip by that norm -> step), with one decision added after
    the norm: a non-finite norm, an fp16 overflow, or ``loss_finite=False`` (agreed by every rank)
    returns ``(False, norm)`` before any parameter or optimizer state is touched. Returns
    ``(updated, grad_norm)``."""
    import math

    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not loss_finite or not math.isfinite(grad_norm):
        return False, grad_norm
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(inner, "is_stub_optimizer", False):
            continue
        params = inner.get_parameters()
        if params and inner.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params, max_norm=inner.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=getattr(inner.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False),
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm


# --------------------------------------------------------------------------------------------
# Inference forwards (KV-cache generation)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def inference_forward() -> Iterator[None]:
    """Mark a model forward as inference for megatron-core (0.19's ``InferenceMode``; no-op on 0.16)."""
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:  # 0.16: inference is "context given and not training"
        InferenceMode = None
    if InferenceMode is None or not hasattr(InferenceMode, "active"):
        yield
        return
    with InferenceMode.active():
        yield


# --------------------------------------------------------------------------------------------
# torch.load's weights-only allow-list
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_safe_globals(extra: list) -> Iterator[None]:
    """Admit ``extra`` in ``torch.load(weights_only=True)`` for the duration (torch >= 2.5 scopes it;
    2.4 has only the process-wide ``add_safe_globals``, which is then used: it only ever grows)."""
    import torch.serialization as serialization

    scoped = getattr(serialization, "safe_globals", None)
    if scoped is not None:
        with scoped(extra):
            yield
        return
    serialization.add_safe_globals([g for g in extra if not isinstance(g, tuple)])  # 2.4 takes no (fn, name)
    yield
