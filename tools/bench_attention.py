#!/usr/bin/env python
r"""Causal attention on CPU: one kernel call against ``compat.causal_sdpa``'s query chunks.

    python tools/bench_attention.py                      # the full-length TRL comparison's block shapes
    python tools/bench_attention.py --shapes 4x200 1x2048 --heads 8 --groups 2 --head-dim 64

torch's CPU flash kernel computes whole key tiles of up to 512 columns, so a causal sequence of up to
512 tokens costs about what full attention does. ``compat.causal_sdpa`` (what the local attention
runs) splits the queries into chunks of ``compat.CPU_CAUSAL_CHUNK`` that attend to their key prefix.
For each shape ``NxL`` (N sequences of L tokens in one call, ``[L, N, heads, d]`` as the model holds
them), every round times forward + backward of three variants in turn, alternating their order:

* ``full``: one call without a mask (every query sees every key: the work the kernel does on its tiles);
* ``causal``: one causal call (``is_causal=True``);
* ``chunked``: ``compat.causal_sdpa``.

It prints milliseconds (median and min..max over ``--rounds``) and the ratios ``causal / full`` (how
much of the triangle the kernel skips) and ``chunked / causal`` (what the chunks save), on one thread
unless ``--threads`` says otherwise. fp32, random inputs; the chunked result is checked against the
single call (within 1e-4) before timing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The packed + shared blocks of `bench_vs_trl.py --length-scale 1 --seq-length 2048` (micro-batch 4),
# as the local attention groups them: N blocks padded to L per call.
DEFAULT_SHAPES = ("11x1012", "9x764", "4x471", "1x1059", "4x200")
VARIANTS = ("full", "causal", "chunked")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                   help="NxL: N sequences of L tokens per call")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--groups", type=int, default=2, help="key/value heads (grouped-query attention)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    except ValueError:
        p.error(f"--shapes takes NxL pairs such as 4x600, got {args.shapes}")
    if any(len(s) != 2 or min(s) < 1 for s in args.shapes):
        p.error(f"--shapes takes NxL pairs of positive integers, got {args.shapes}")
    if args.heads % args.groups:
        p.error(f"--heads ({args.heads}) must be a multiple of --groups ({args.groups})")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def variant_fn(name: str, scale: float):
    from megatron_tgdpo import compat

    if name == "full":
        return lambda q, k, v: compat.grouped_query_sdpa(q, k, v, scale=scale)
    if name == "causal":
        return lambda q, k, v: compat.grouped_query_sdpa(q, k, v, is_causal=True, scale=scale)
    return lambda q, k, v: compat.causal_sdpa(q, k, v, scale=scale)


def inputs(n: int, length: int, args: argparse.Namespace, *, generator):
    import torch

    def one(heads: int):  # [L, N, heads, d] as the model holds it, viewed as [N, heads, L, d]
        return torch.randn(length, n, heads, args.head_dim, generator=generator).requires_grad_()

    return one(args.heads), one(args.groups), one(args.groups)


def timed(fn, q, k, v) -> float:
    """Seconds of forward + backward, the output laid back out as the model does ([L, N, heads * d])."""
    start = time.perf_counter()
    out = fn(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))
    out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1).sum().backward()
    return time.perf_counter() - start


def check(args: argparse.Namespace, scale: float, generator) -> None:
    """The chunked output equals the single causal call's at every shape (before any timing)."""
    import torch

    for n, length in args.shapes:
        q, k, v = (t.detach() for t in inputs(n, length, args, generator=generator))
        want = variant_fn("causal", scale)(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))
        got = variant_fn("chunked", scale)(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))
        err = (got - want).abs().max().item()
        if not torch.isfinite(got).all() or err > 1e-4:
            raise SystemExit(f"bench_attention: chunked differs from one causal call at {n}x{length}: {err:.2e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_tgdpo import compat

    torch.set_num_threads(args.threads)
    scale = args.head_dim ** -0.5
    generator = torch.Generator().manual_seed(args.seed)
    check(args, scale, generator)
    fns = {name: variant_fn(name, scale) for name in VARIANTS}
    times = {(shape, name): [] for shape in args.shapes for name in VARIANTS}
    for r in range(args.rounds):
        for shape in args.shapes:
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for name in order:
                q, k, v = inputs(*shape, args, generator=generator)
                times[shape, name].append(timed(fns[name], q, k, v))
    print(f"forward + backward, ms (median, min..max of {args.rounds} rounds); heads {args.heads}, groups "
          f"{args.groups}, head dim {args.head_dim}, {args.threads} thread(s), chunk {compat.CPU_CAUSAL_CHUNK}")
    print(f"{'shape':>9}  " + "  ".join(f"{name:>20}" for name in VARIANTS) + "  causal/full  chunked/causal")
    for shape in args.shapes:
        med = {name: statistics.median(times[shape, name]) * 1e3 for name in VARIANTS}
        cells = [f"{med[name]:8.1f} {min(times[shape, name]) * 1e3:5.1f}..{max(times[shape, name]) * 1e3:<5.1f}"
                 for name in VARIANTS]
        print(f"{shape[0]:>4}x{shape[1]:<4}  " + "  ".join(f"{c:>20}" for c in cells)
              + f"  {med['causal'] / med['full']:11.2f}  {med['chunked'] / med['causal']:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
