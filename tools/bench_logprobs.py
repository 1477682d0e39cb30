#!/usr/bin/env python
"""Time and peak memory of ``vocab_parallel_logprobs`` against megatron-core's vocab-parallel cross entropy.

    python tools/bench_logprobs.py                        # tokens 2048, V 32000 and 128256, fp32 and bf16
    python tools/bench_logprobs.py --vocab 128256 --dtype bf16 --chunk-size 512
    python tools/bench_logprobs.py --tp 2                 # forked gloo ranks (CPU) via run_on_ranks

Compared on the same inputs in the same run:

* ``mcore``: ``tensor_parallel.vocab_parallel_cross_entropy`` (returns the loss = -logprob). It
  modifies an fp32 input in place, so it gets a fresh clone each call; the clone is made *before* the
  timer starts and before the memory baseline is taken, so neither its time nor its memory is counted
  against megatron-core (a caller that still needs its logits would pay that clone on top).
* ``ours``: ``vocab_parallel_logprobs`` with ``chunk_size=None``, and ``ours chunkN`` with chunking.

Modes: ``fwd`` (no autograd, e.g. the reference model's pass) and ``fwd+bwd`` (``out.sum().backward()``).

``--head``: the LM head plus log-probs, fwd+bwd, for one micro-batch pair (default 2 x 4,096 tokens,
hidden 2,048), megatron layout ``[s, b, H]``:

    python tools/bench_logprobs.py --head --vocab 128256 --dtype fp32 --threads 2 --repeats 1

* ``plain``: the unfused head as megatron's ``ColumnParallelLinear`` with gradient-accumulation fusion
  (``logits = h @ W.T``; backward: ``grad_h = g @ W``, the weight gradient added to ``W.main_grad``) +
  ``vocab_parallel_logprobs`` chunked by ``--budget-mib`` (``chunk_tokens``), + its backward;
* ``fused``: ``fused_vocab_parallel_logprobs`` (default ``chunk_size="auto"``, the same budget) with the
  weight gradient added to ``W.main_grad`` (as under megatron DDP).

The weight gradient both paths need is *not* counted: ``W.main_grad`` (fp32, as DDP with
``grad_reduce_in_fp32``) exists before the meter starts, and for 16-bit weights so does the
weight-sized buffer the plain head computes its gradient into before adding it (autograd's
``param.grad`` that DDP's hook would add). Peak = everything else, including the returned hidden
gradient. Runs alternate plain, fused, plain, ... (a shared machine's load then hits both alike); each
is timed, the first of each path is also its memory run; times are the minimum over runs.

Peak memory is the extra memory the call needs on top of its inputs, *including the gradient it
returns* in fwd+bwd. On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the
call. On CPU: the kernel's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``, reset by
writing ``5`` to ``/proc/self/clear_refs``) minus the resident set before the call; torch's CPU
allocator hands large blocks straight to/from the OS (mmap), so this tracks live tensor memory, and a
calibration line shows how a tensor of known size reads. Where ``clear_refs`` cannot be written, a
thread samples the resident set every 0.5 ms instead (can miss short peaks; the output says so).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_tgdpo.runtime.console import quiet_library_warnings  # noqa: E402

quiet_library_warnings()  # before megatron-core's import-time notices (MEGATRON_TGDPO_VERBOSE=1 shows them)

from megatron.core import parallel_state, tensor_parallel  # noqa: E402  (imported before forking ranks)

from megatron_tgdpo import distributed  # noqa: E402
from megatron_tgdpo.monitoring import PeakMemory, mmap_large_blocks, release_free_heap  # noqa: E402
from megatron_tgdpo.ops import (  # noqa: E402
    DEFAULT_CHUNK_BYTES,
    chunk_tokens,
    fused_vocab_parallel_logprobs,
    vocab_parallel_logprobs,
)
from megatron_tgdpo.ops.fused_logprobs import vocab_block  # noqa: E402  (only to print the backward block)

MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def memory_method(device: torch.device) -> str:
    """How ``monitoring.PeakMemory`` measured, in the table's words."""
    base = PeakMemory.method(device)
    if device.type == "cuda":
        return f"{base} minus allocated before the call"
    heap = " (glibc mmap threshold fixed at 1 MiB)" if _MMAP_FIXED else ""
    if base.startswith("VmHWM"):
        return f"kernel RSS high-water mark (VmHWM, reset via /proc/self/clear_refs) minus RSS before the call{heap}"
    return f"RSS sampled every 0.5 ms by a thread minus RSS before the call; may miss short peaks{heap}"


def calibrate(device: torch.device, nbytes: int) -> float:
    """How many bytes the meter reports for a tensor of ``nbytes`` filled inside it."""
    with PeakMemory(device) as meter:
        tensor = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        del tensor
    return meter.peak


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    vocab: int
    dtype: str
    path: str
    mode: str
    time_ms: float
    cpu_ms: float  # process CPU time (all threads, user + sys): steadier than wall time on a busy machine
    peak_bytes: int
    max_abs_diff: float  # vs megatron-core's -loss on the same input


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _make_call(path: str, chunk_size: Optional[int], backward: bool, logits: torch.Tensor, target: torch.Tensor):
    """(prepare, call): ``prepare`` builds the input outside the timer, ``call`` runs the op and returns
    the log-probs (detached)."""

    if path == "mcore":

        def prepare() -> torch.Tensor:
            x = logits.clone()  # megatron-core subtracts the max from an fp32 input in place
            return x.requires_grad_() if backward else x

        def call(x: torch.Tensor) -> torch.Tensor:
            out = -tensor_parallel.vocab_parallel_cross_entropy(x, target)
            if backward:
                out.sum().backward()
            return out.detach()

    else:

        def prepare() -> torch.Tensor:
            x = logits.detach()  # shares storage: the op does not modify its input
            return x.requires_grad_() if backward else x

        def call(x: torch.Tensor) -> torch.Tensor:
            out = vocab_parallel_logprobs(x, target, chunk_size=chunk_size)
            if backward:
                out.sum().backward()
            return out.detach()

    return prepare, call


def bench_case(
    path: str,
    chunk_size: Optional[int],
    backward: bool,
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    repeats: int,
    warmup: int,
) -> tuple[float, float, int, torch.Tensor]:
    """Best wall time (s), best process CPU time (s), peak extra memory (bytes) and the log-probs.

    The minimum over repeats, not the median: on a shared machine other processes only ever add time,
    so the fastest run is the best estimate of the op's own cost."""
    device = logits.device
    prepare, call = _make_call(path, chunk_size, backward, logits, target)
    grad_ctx: Callable = torch.enable_grad if backward else torch.no_grad

    # Memory first, on its own run (it doubles as the first warm-up).
    x = prepare()
    with grad_ctx(), PeakMemory(device) as meter:
        out = call(x)
    del x
    for _ in range(max(0, warmup - 1)):
        x = prepare()
        with grad_ctx():
            call(x)
        del x
    times, cpu_times = [], []
    for _ in range(repeats):
        x = prepare()
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with grad_ctx():
            call(x)
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        del x
    return min(times), min(cpu_times), meter.peak, out


def run_benchmark(args: argparse.Namespace) -> list[Result]:
    """All cases on this rank's shard; returns rows (times are per rank)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    paths = [("mcore", None), ("ours", None)] + [(f"ours chunk{c}", c) for c in args.chunk_size]
    results = []
    for vocab in args.vocab:
        if vocab % tp:
            raise SystemExit(f"--vocab {vocab} is not divisible by --tp {tp}")
        for dtype_name in args.dtype:
            gen = torch.Generator().manual_seed(1000 * rank + vocab)
            logits = (torch.randn(args.tokens, vocab // tp, generator=gen) * 3).to(DTYPES[dtype_name]).to(device)
            # Megatron layout [s, b, V/tp]; the ops flatten the leading dims anyway.
            logits = logits.view(args.tokens, 1, vocab // tp)
            target = torch.randint(0, vocab, (args.tokens, 1), generator=torch.Generator().manual_seed(vocab)).to(device)
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                reference = None
                for path, chunk in paths:
                    seconds, cpu_seconds, peak, out = bench_case(
                        path.split()[0], chunk, backward, logits, target, repeats=args.repeats, warmup=args.warmup
                    )
                    reference = out if reference is None else reference
                    diff = (out - reference).abs().max().item()
                    results.append(Result(vocab, dtype_name, path, mode, seconds * 1e3, cpu_seconds * 1e3, peak, diff))
            del logits, target
            release_free_heap()
    return results


# --------------------------------------------------------------------------------------------
# --head: LM head + log-probs, plain vs fused
# --------------------------------------------------------------------------------------------


class _PlainHead(torch.autograd.Function):
    """The unfused LM head as megatron-core's ``ColumnParallelLinear`` runs it with gradient-accumulation
    fusion: ``logits = hidden @ weight.T``; backward returns the hidden gradient and adds the weight
    gradient to ``weight.main_grad`` (in place for fp32; for 16-bit weights through ``wgrad_buffer``, the
    16-bit gradient that DDP's hook would add)."""

    @staticmethod
    def forward(ctx, hidden, weight, wgrad_buffer):  # noqa: D102
        ctx.save_for_backward(hidden, weight)
        ctx.wgrad_buffer = wgrad_buffer
        return torch.matmul(hidden, weight.t())

    @staticmethod
    def backward(ctx, grad_logits):  # noqa: D102
        hidden, weight = ctx.saved_tensors
        grad_2d, hidden_2d = grad_logits.reshape(-1, weight.shape[0]), hidden.reshape(-1, weight.shape[1])
        grad_hidden = torch.mm(grad_2d, weight).view(hidden.shape)
        if ctx.wgrad_buffer is None:
            weight.main_grad.addmm_(grad_2d.t(), hidden_2d)
        else:
            weight.main_grad.add_(torch.mm(grad_2d.t(), hidden_2d, out=ctx.wgrad_buffer))
        return grad_hidden, None, None


@dataclass
class HeadResult:
    vocab: int
    dtype: str
    path: str
    chunk: str
    time_ms: float
    cpu_ms: float
    peak_bytes: int
    logp_diff: float = 0.0  # max |fused - plain|
    grad_hidden_rel: float = 0.0  # max |fused - plain| / max |plain|
    grad_weight_rel: float = 0.0


def _head_call(path: str, hidden, weight, target, *, chunk: int, wgrad_buffer):
    """One fwd+bwd of the log-prob path; returns (log-probs, hidden gradient)."""
    h = hidden.detach().requires_grad_()  # shares storage: no copy
    if path == "plain":
        logits = _PlainHead.apply(h, weight, wgrad_buffer)
        out = vocab_parallel_logprobs(logits, target, chunk_size=chunk)
        del logits
    else:
        out = fused_vocab_parallel_logprobs(h, weight, target, chunk_size=chunk)  # the default "auto" at 128 MiB
    out.sum().backward()
    return out.detach(), h.grad


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def run_head_benchmark(args: argparse.Namespace) -> list[HeadResult]:
    """Plain vs fused LM head + log-probs on this rank's vocab shard (hidden replicated, no SP)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    seq = args.tokens // 2
    results = []
    for vocab in args.vocab:
        if vocab % tp:
            raise SystemExit(f"--vocab {vocab} is not divisible by --tp {tp}")
        shard = vocab // tp
        chunk = chunk_tokens(shard, budget_bytes=args.budget_mib * MIB)  # both paths: the same budget
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            gen = torch.Generator().manual_seed(1000 * rank + vocab)
            hidden = torch.randn(seq, 2, args.hidden, generator=gen).to(dtype).to(device)
            weight = torch.nn.Parameter(
                (torch.randn(shard, args.hidden, generator=gen) * (3.0 / args.hidden**0.5)).to(dtype).to(device)
            )
            weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=device)
            target = torch.randint(0, vocab, (seq, 2), generator=torch.Generator().manual_seed(vocab)).to(device)
            wgrad_buffer = None if dtype == torch.float32 else torch.empty_like(weight, requires_grad=False)
            paths = ("plain", "fused")
            times = {path: [] for path in paths}
            cpu_times = {path: [] for path in paths}
            peaks, reference, diffs = {}, None, (float("nan"),) * 3
            # Runs alternate between the paths, so that a shared machine's changing load hits both alike.
            for run in range(max(1, args.repeats)):
                for path in paths:
                    weight.main_grad.zero_()
                    release_free_heap()
                    _sync(device)
                    with PeakMemory(device) as meter:
                        start, cpu_start = time.perf_counter(), time.process_time()
                        out, grad_hidden = _head_call(path, hidden, weight, target, chunk=chunk,
                                                      wgrad_buffer=wgrad_buffer)
                        _sync(device)
                        times[path].append(time.perf_counter() - start)
                        cpu_times[path].append(time.process_time() - cpu_start)
                    if run == 0:
                        peaks[path] = meter.peak
                        if path == "plain":
                            reference = (out, grad_hidden, weight.main_grad.clone())
                        else:
                            diffs = ((out - reference[0]).abs().max().item(), _rel(grad_hidden, reference[1]),
                                     _rel(weight.main_grad, reference[2]))
                            reference = None
                    del out, grad_hidden
            chunks = {"plain": f"{chunk} tok", "fused": f"{chunk} tok / {vocab_block(args.tokens, shard, chunk)} voc"}
            for path in paths:
                results.append(HeadResult(
                    vocab, dtype_name, path, chunks[path], min(times[path]) * 1e3, min(cpu_times[path]) * 1e3,
                    peaks[path], *(diffs if path == "fused" else ()),
                ))
            del hidden, weight, target, wgrad_buffer
            release_free_heap()
    return results


def print_head_table(results: list[HeadResult], args: argparse.Namespace, device: torch.device, ranks: int) -> None:
    method = memory_method(device)
    cal = calibrate(device, 256 * MIB)
    threads = torch.get_num_threads() if ranks == 1 else args.threads or 1
    print(
        "\nLM head + token log-probs, fwd+bwd: plain (head GEMM + logits + vocab_parallel_logprobs) vs "
        f"fused_vocab_parallel_logprobs\ndevice {device.type}"
        f"{'' if device.type == 'cpu' else ' ' + torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, {threads} thread(s) per rank, tokens {args.tokens} (2 x {args.tokens // 2}), "
        f"hidden {args.hidden}, TP {args.tp}, chunk budget {args.budget_mib} MiB "
        f"(default {DEFAULT_CHUNK_BYTES // MIB} MiB), time = best of {max(1, args.repeats)}"
    )
    print(f"peak = extra memory over the inputs, weight gradient (main_grad) excluded: {method}")
    print(f"calibration: a 256 MiB tensor reads as {cal / MIB:.1f} MiB")
    header = (f"{'V':>7} {'dtype':>5}  {'path':<6}{'chunk':<20}{'time ms':>11}{'cpu ms':>11}{'peak MiB':>10}"
              f"{'|dlogp|':>10}{'dh rel':>9}{'dW rel':>9}")
    print(header)
    print("-" * len(header))
    plain = {}
    for row in results:
        key = (row.vocab, row.dtype)
        diffs = (f"{'':>10}{'':>9}{'':>9}" if row.path == "plain" else
                 f"{row.logp_diff:>10.1e}{row.grad_hidden_rel:>9.1e}{row.grad_weight_rel:>9.1e}")
        print(f"{row.vocab:>7} {row.dtype:>5}  {row.path:<6}{row.chunk:<20}{row.time_ms:>11.0f}{row.cpu_ms:>11.0f}"
              f"{row.peak_bytes / MIB:>10.0f}{diffs}")
        if row.path == "plain":
            plain[key] = row
        else:
            ref = plain[key]
            print(f"{'':>15}fused/plain{'':<15}{row.time_ms / ref.time_ms:>11.2f}{row.cpu_ms / ref.cpu_ms:>11.2f}"
                  f"{row.peak_bytes / max(ref.peak_bytes, 1):>10.3f}")


def _rank_main(args: argparse.Namespace) -> list:
    torch.set_num_threads(args.threads or 1)
    return run_head_benchmark(args) if args.head else run_benchmark(args)


def _single_process(args: argparse.Namespace) -> list[Result]:
    """TP=1 in this process: megatron-core's op needs parallel state, so start a 1-rank group."""
    distributed.init_process_group(distributed.read_launch_env({}))  # a world of one: no port to bind
    distributed.init_model_parallel(tensor_model_parallel_size=1)
    try:
        return run_head_benchmark(args) if args.head else run_benchmark(args)
    finally:
        distributed.destroy()


def print_table(results: list[Result], args: argparse.Namespace, device: torch.device, ranks: int) -> None:
    method = memory_method(device)
    cal_bytes = 256 * MIB
    cal = calibrate(device, cal_bytes)
    threads = torch.get_num_threads() if ranks == 1 else args.threads or 1
    print(
        f"\nvocab_parallel_logprobs vs megatron-core {_mcore_version()} vocab_parallel_cross_entropy"
        f"\ndevice {device.type}{'' if device.type == 'cpu' else ' ' + torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, {threads} thread(s) per rank, tokens {args.tokens}, TP {args.tp} "
        f"(each rank holds V/TP vocab rows), time = best of {args.repeats} after {args.warmup} warm-up"
    )
    print(f"peak = extra memory the call needs over its inputs (incl. the returned gradient): {method}")
    print(f"calibration: a {cal_bytes / MIB:.0f} MiB tensor reads as {cal / MIB:.1f} MiB")
    print("time = wall clock, cpu = this process's CPU time over all its threads (user + sys; on GPU only host time)")
    if ranks > 1:
        print("time = slowest rank, peak = largest rank (ranks share the CPU cores)")
    header = (
        f"{'V':>7} {'dtype':>5}  {'path':<16}{'mode':<8}{'time ms':>10}{'x mcore':>9}{'cpu ms':>10}{'x mcore':>9}"
        f"{'peak MiB':>11}{'x mcore':>9}  {'|diff|':>8}"
    )
    print(header)
    print("-" * len(header))
    base = {}
    for row in results:
        key = (row.vocab, row.dtype, row.mode)
        if row.path == "mcore":
            base[key] = row
        ref = base[key]
        time_ratio = row.time_ms / ref.time_ms if ref.time_ms else float("nan")
        cpu_ratio = row.cpu_ms / ref.cpu_ms if ref.cpu_ms else float("nan")
        mem_ratio = f"{row.peak_bytes / ref.peak_bytes:9.2f}" if ref.peak_bytes > MIB else f"{'-':>9}"
        print(
            f"{row.vocab:>7} {row.dtype:>5}  {row.path:<16}{row.mode:<8}{row.time_ms:>10.1f}{time_ratio:>9.2f}"
            f"{row.cpu_ms:>10.1f}{cpu_ratio:>9.2f}{row.peak_bytes / MIB:>11.1f}{mem_ratio}  {row.max_abs_diff:>8.1e}"
        )
    shard_bytes = {name: DTYPES[name].itemsize for name in args.dtype}
    sizes = ", ".join(
        f"V={v} {d}: {args.tokens * v // args.tp * shard_bytes[d] / MIB:.0f} MiB ({args.tokens * v // args.tp * 4 / MIB:.0f} MiB as fp32)"
        for v in args.vocab
        for d in args.dtype
    )
    print(f"logits shard per rank: {sizes}")
    print("mcore's fresh clone per call (fp32 input is modified in place) is excluded from its time and peak.")
    print("|diff| = max |logprob - (-mcore loss)| on the same input.")


def _mcore_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def _merge_ranks(per_rank: list[list[Result]]) -> list[Result]:
    merged = []
    for rows in zip(*per_rank):
        first = rows[0]
        merged.append(
            Result(
                first.vocab, first.dtype, first.path, first.mode, max(r.time_ms for r in rows),
                max(r.cpu_ms for r in rows), max(r.peak_bytes for r in rows), max(r.max_abs_diff for r in rows),
            )
        )
    return merged


def _merge_head_ranks(per_rank: list[list[HeadResult]]) -> list[HeadResult]:
    merged = []
    for rows in zip(*per_rank):
        first = rows[0]
        merged.append(HeadResult(
            first.vocab, first.dtype, first.path, first.chunk, max(r.time_ms for r in rows),
            max(r.cpu_ms for r in rows), max(r.peak_bytes for r in rows), max(r.logp_diff for r in rows),
            max(r.grad_hidden_rel for r in rows), max(r.grad_weight_rel for r in rows),
        ))
    return merged


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head", action="store_true", help="LM head + log-probs: plain vs fused (see above)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens (s*b) per call (default 2048; --head: 8192)")
    parser.add_argument("--hidden", type=int, default=2048, help="--head: hidden size")
    parser.add_argument("--budget-mib", type=int, default=DEFAULT_CHUNK_BYTES // MIB,
                        help="--head: fp32 work-buffer budget of both paths' chunks (MiB; chunk_tokens)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="full vocab sizes")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[256], help="chunk sizes for the chunked rows")
    parser.add_argument("--tp", type=int, default=1, help=">1: that many forked gloo ranks (CPU only)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per rank (default: torch's default with --tp 1, 1 per rank otherwise); on a busy "
        "machine use 1: OpenMP threads that wait for a descheduled sibling make multi-thread times erratic",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = 8192 if args.head else 2048
    if args.head and args.tokens % 2:
        parser.error("--head needs an even --tokens (a pair of sequences)")
    return args


_MMAP_FIXED = False


def main(argv: Optional[list[str]] = None) -> None:
    global _MMAP_FIXED
    args = parse_args(argv)
    if not torch.cuda.is_available():
        _MMAP_FIXED = mmap_large_blocks()  # before forking, so ranks inherit it
    if args.threads and args.tp == 1:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.tp == 1:
        results = _single_process(args)
    else:
        if device.type == "cuda":
            raise SystemExit("--tp > 1 forks gloo ranks and is CPU only; on GPUs launch with torchrun instead")
        from megatron_tgdpo.testing import run_on_ranks

        per_rank = run_on_ranks(args.tp, _rank_main, args, tensor_model_parallel_size=args.tp, timeout=3600.0)
        results = _merge_head_ranks(per_rank) if args.head else _merge_ranks(per_rank)
    (print_head_table if args.head else print_table)(results, args, device, args.tp)
    load_after = os.getloadavg()
    print(
        f"1-min load average before/after: {load_before[0]:.1f}/{load_after[0]:.1f} on {os.cpu_count()} cores "
        "(times are only comparable when nothing else runs)"
    )


if __name__ == "__main__":
    main()
