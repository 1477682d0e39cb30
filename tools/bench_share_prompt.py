#!/usr/bin/env python
r"""Shared vs unshared prompts: the model's work for one global batch, in interleaved rounds.

    python tools/bench_share_prompt.py --length-scale 0.25 --seq-length 512 --pairs 64 --rounds 5 \
        --arch hidden_size=256,ffn_hidden_size=768,num_attention_heads=8,num_query_groups=2,vocab_size=4096

The same pairs (the built-in UltraFeedback-like lengths of ``tools/bench_step.py``, scaled) are packed
with and without ``--share-prompt`` (first-fit-decreasing into rows of ``2 x micro-batch x seq-length``)
and run through the project's schedule on one rank: the policy's forward + backward and one frozen
model's forward (DPO online), no optimizer, no data loading. Each round runs both variants, alternating
which goes first; the figures are the process CPU seconds (``time.process_time``: on a shared machine
wall time measures the neighbours) and wall seconds per variant, as min / median / max over the
rounds, plus computed positions per real token. ``tools/bench_step.py --compare sharing`` measures the
whole training step (optimizer, batch assembly, metrics) the same way.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rank(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from bench_step import draw_lengths
    from megatron_tgdpo.data.packing import PackedPreferenceCollator, capacity_for
    from megatron_tgdpo.models import llama
    from megatron_tgdpo.models.state_dict import seeded_init
    from megatron_tgdpo.runtime.schedule import LogprobSettings, run_schedule, score_logps

    torch.set_num_threads(1)
    overrides = {}
    for part in filter(None, args.arch.split(",")):
        key, _, value = part.partition("=")
        overrides[key] = float(value) if "." in value else int(value)
    arch = llama.preset(args.model, **overrides)
    lengths = draw_lengths(args.pairs, scale=args.length_scale)
    rng = np.random.default_rng(0)
    items = [{"prompt": rng.integers(1, arch.vocab_size, p), "chosen": rng.integers(1, arch.vocab_size, c),
              "rejected": rng.integers(1, arch.vocab_size, r), "index": i} for i, (p, c, r) in enumerate(lengths)]
    capacity = capacity_for(micro_batch_size=args.micro_batch_size, seq_length=args.seq_length)
    batches, stats = {}, {}
    for name, share in (("unshared", False), ("shared", True)):
        collate = PackedPreferenceCollator(pad_id=0, pad_to_multiple_of=16, share_prompt=share)
        plan = collate.plan(lengths, capacity=capacity)
        batches[name] = [collate([items[i] for i in b]) for b in plan.bins]
        stats[name] = dict(micro_batches=plan.num_bins, computed_per_real=plan.computed_tokens / plan.real_tokens)
    policy = llama.build_model(arch, llama.transformer_config(arch, llama.ParallelLayout()))
    frozen = llama.build_model(arch, llama.transformer_config(arch, llama.ParallelLayout()))
    seeded_init(policy, seed=1, std=0.02)
    seeded_init(frozen, seed=1, std=0.02)

    def loss_fn(index, batch, logps):
        return (logps * batch["loss_mask"]).sum(), batch.num_pairs, None

    def step(name: str) -> None:
        score_logps(frozen, batches[name], logprobs=LogprobSettings())
        for chunk in policy:
            chunk.train()
            chunk.zero_grad(set_to_none=True)
        run_schedule(policy, batches[name], loss_fn, forward_only=False, logprobs=LogprobSettings())

    for name in batches:  # warm-up
        step(name)
    times = {name: {"cpu": [], "wall": []} for name in batches}
    for r in range(args.rounds):
        for name in (("unshared", "shared") if r % 2 == 0 else ("shared", "unshared")):
            cpu, wall = time.process_time(), time.perf_counter()
            step(name)
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    out = {}
    for name, t in times.items():
        out[name] = dict(stats[name], **{k: (min(v), statistics.median(v), max(v)) for k, v in t.items()})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--arch", default="", metavar="FIELD=VALUE[,...]",
                        help="LlamaArch fields to change in the preset (e.g. hidden_size=256,ffn_hidden_size=768)")
    parser.add_argument("--length-scale", type=float, default=0.25)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from megatron_tgdpo.testing import run_on_ranks

    (result,) = run_on_ranks(1, _rank, args, timeout=3600.0)
    for name, r in result.items():
        cpu, wall = r["cpu"], r["wall"]
        print(f"{name:9s} micro-batches {r['micro_batches']:3d} | computed/real {r['computed_per_real']:.3f} | "
              f"CPU s min/median/max {cpu[0]:.2f}/{cpu[1]:.2f}/{cpu[2]:.2f} | "
              f"wall s {wall[0]:.2f}/{wall[1]:.2f}/{wall[2]:.2f}")
    s, u = result["shared"], result["unshared"]
    print(f"shared / unshared: CPU median {s['cpu'][1] / u['cpu'][1]:.3f}, min {s['cpu'][0] / u['cpu'][0]:.3f}; "
          f"wall median {s['wall'][1] / u['wall'][1]:.3f}; computed positions {s['computed_per_real'] / u['computed_per_real']:.3f}")


if __name__ == "__main__":
    main()
