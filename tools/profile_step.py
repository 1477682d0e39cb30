#!/usr/bin/env python
r"""Where the time of one preference training step goes: a per-part table from torch.profiler.

    # SmolLM2-135M-Instruct (V = 49,152, 30 layers), 1 rank, fp32, rows <= 256 tokens, packed
    python tools/profile_step.py --load ~/.cache/megatron_tgdpo/models/smollm2/hf --loss-type dpo \
        --seq-length 128 --micro-batch-size 1 --global-batch-size 8 --pack-sequences --heads fused plain

A benchmark, not a test: it builds the real run (``runtime.trainer.Trainer`` with the preference
algorithm: frozen reference scoring, megatron-core's schedule, the optimizer) in one forked gloo rank per
variant, trains ``--warmup`` unmeasured steps, times ``--steps`` steps without the profiler, then
profiles ``--steps`` more under ``torch.profiler`` and prints, per variant (``--heads``: the fused LM
head, the plain one or both), one table:

* the step's phases: data (what the step waits for its next global batch; the reading, packing and
  collating run one step ahead in a background thread and are printed apart), reference forward
  (frozen scoring), policy forward + backward (megatron-core's schedule), optimizer (grad norm, clip,
  Adam, scheduler), the metrics reduction the loop does when it logs, and the rest;
* inside the policy's forward and backward, the model's parts: embedding, RoPE, norms, attention,
  MLP, LM head + log-probs (the fused op, or the output layer plus the plain op), and what is left
  (the loss, metric sums, the schedule's own work). Backward time is attributed to the part whose
  forward op created the autograd node (the profiler's sequence numbers link the two).

Percentages are of the profiled step. The unprofiled step time is printed beside it, so the
profiler's own overhead is visible. ``--hook-calls`` also counts the torch calls one step makes
through the CPU shim's device hook (``compat``; CPU only) and times the hook per call.

Data: random token ids over the model's tokenizer with ``tools/bench_step.py``'s UltraFeedback-like
lengths scaled by ``--length-scale`` (default 0.125: prompts ~19, responses ~55 tokens), cut to
``--seq-length``. Every training flag applies (``--help`` lists them); the reference is ``--ref-load``
(default: ``--load``; without either, the seeded ``--model`` preset).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_tgdpo.config import ConfigError, TrainConfig, parse_tool_args  # noqa: E402

PHASES = ("data", "reference forward", "policy forward + backward", "optimizer", "metrics reduce")
PARTS = ("embedding", "rope", "norms", "attention", "mlp", "lm head + log-probs")
LOGPROB_OPS = ("_FusedVocabParallelLogprobs", "_VocabParallelLogprobs")


def tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profile_step.py", add_help=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed steps, then as many profiled steps")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--heads", nargs="+", choices=("fused", "plain"), default=["fused"],
                        help="LM head variants to profile, each in a fresh rank process")
    parser.add_argument("--length-scale", type=float, default=0.125, help="scale of bench_step's lengths")
    parser.add_argument("--num-pairs", type=int, default=None, help="pairs in the set (default: all steps')")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the rank")
    parser.add_argument("--hook-calls", action="store_true",
                        help="also count the torch calls of one step through the CPU device hook")
    parser.add_argument("--work-dir", default="runs/profile_step", help="where the data set is written")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per variant")
    return parser


# --------------------------------------------------------------------------------------------
# labels: record_function scopes around the phases and the model's parts
# --------------------------------------------------------------------------------------------


def _labelled(fn, label: str):
    import functools

    from torch.autograd.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


HOST_DATA_S: list[float] = []  # seconds of each batch preparation, whichever thread ran it


def _timed(fn, into: list):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    return wrapper


def _label_modules(chunk, *, prefix: str) -> None:
    """record_function scopes around every part of a GPTModel chunk (forward hooks; no numerics change)."""
    from torch.autograd.profiler import record_function

    from megatron_tgdpo.models.state_dict import gpt_model

    def hook(module, label: str) -> None:
        def pre(*_):
            scope = record_function(prefix + label)
            scope.__enter__()
            module.__dict__.setdefault("_profile_scopes", []).append(scope)

        def post(*_):
            module.__dict__["_profile_scopes"].pop().__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    gpt = gpt_model(chunk)
    if getattr(gpt, "embedding", None) is not None:
        hook(gpt.embedding, "embedding")
    if getattr(gpt, "rotary_pos_emb", None) is not None:
        hook(gpt.rotary_pos_emb, "rope")
    if getattr(gpt, "output_layer", None) is not None:
        hook(gpt.output_layer, "lm head + log-probs")
    decoder = gpt.decoder
    for layer in decoder.layers:
        for name, label in (("input_layernorm", "norms"), ("pre_mlp_layernorm", "norms"),
                            ("self_attention", "attention"), ("mlp", "mlp")):
            sub = getattr(layer, name, None)
            if sub is not None and list(sub.parameters()):
                hook(sub, label)
    if getattr(decoder, "final_layernorm", None) is not None:
        hook(decoder.final_layernorm, "norms")


def instrument(algorithm) -> None:
    """Phase scopes (functions wrapped by name) and part scopes (module hooks) for one algorithm."""
    from megatron_tgdpo import compat, logprob_cache
    from megatron_tgdpo.algorithms import preference
    from megatron_tgdpo.runtime import data, frozen, metrics, prefetch, schedule

    prefetch.Prefetcher.next_global_batch = _labelled(prefetch.Prefetcher.next_global_batch, "phase:data")
    data.BatchSource.next_global_batch = _timed(data.BatchSource.next_global_batch, HOST_DATA_S)
    # The frozen models run inside the policy's schedule (runtime/frozen.py): that phase nests in the
    # policy's, and attribute() takes its time out of the policy's. The cached path reads the cache.
    frozen.FrozenScorer.forward = _labelled(frozen.FrozenScorer.forward, "phase:reference forward")
    logprob_cache.attach_cached_logps = _labelled(logprob_cache.attach_cached_logps, "phase:reference forward")
    preference.run_schedule = _labelled(preference.run_schedule, "phase:policy forward + backward")
    compat.guarded_optimizer_step = _labelled(compat.guarded_optimizer_step, "phase:optimizer")
    metrics.StepMetrics.reduce = _labelled(metrics.StepMetrics.reduce, "phase:metrics reduce")
    schedule.output_logprobs = _labelled(schedule.output_logprobs, "part:lm head + log-probs")
    for chunk in algorithm.policy.chunks:
        _label_modules(chunk, prefix="part:")


# --------------------------------------------------------------------------------------------
# attribution
# --------------------------------------------------------------------------------------------


def _scope(event, kind: str) -> Optional[str]:
    """The innermost ``kind:`` label enclosing a profiler event (its own name included)."""
    while event is not None:
        if event.name.startswith(kind + ":"):
            return event.name[len(kind) + 1:]
        event = event.cpu_parent
    return None


def attribute(events) -> dict:
    """{phase: us, (part, "forward"|"backward"): us} over the profiled events (microseconds)."""
    totals: dict = defaultdict(float)
    creator: dict[int, str] = {}
    backward = []
    for event in events:
        name = event.name
        if name.startswith("phase:"):
            totals[name[6:]] += event.cpu_time_total
            outer = _scope(event.cpu_parent, "phase")
            if outer is not None:  # a phase inside another (frozen scoring in the policy's schedule): not the outer's
                totals[outer] -= event.cpu_time_total
        elif name.startswith("part:") and _scope(event.cpu_parent, "part") is None:
            totals[(name[5:], "forward")] += event.cpu_time_total  # outermost part scopes only
        elif name.startswith("autograd::engine::evaluate_function"):
            backward.append(event)
        elif event.sequence_nr >= 0 and not name.startswith("autograd::"):
            part = _scope(event, "part")
            if part is not None:
                creator.setdefault(event.sequence_nr, part)
            elif name in LOGPROB_OPS:
                creator.setdefault(event.sequence_nr, "lm head + log-probs")
    for event in backward:
        if _scope(event, "phase") != "policy forward + backward":
            continue
        if _scope(event.cpu_parent, "autograd::engine::evaluate_function") is not None:
            continue  # nested in another node's backward: counted there
        part = creator.get(event.sequence_nr, "other")
        totals[(part, "backward")] += event.cpu_time_total
    return dict(totals)


# --------------------------------------------------------------------------------------------
# one variant, in its own rank process
# --------------------------------------------------------------------------------------------


def _count_hook_calls(trainer) -> Optional[dict]:
    """Torch calls of one step through the CPU device hook, and the hook's cost per call (CPU only)."""
    import torch

    from megatron_tgdpo import compat

    if torch.cuda.is_available():
        return None
    with compat.count_device_hook_calls() as calls:
        trainer.step()
    a, b = torch.randn(8), torch.randn(8)

    def per_call() -> float:
        t0 = time.perf_counter()
        for _ in range(20000):
            torch.add(a, b)
        return (time.perf_counter() - t0) / 20000

    with compat.cpu_device_hook_paused():
        bare = min(per_call() for _ in range(3))
    hooked = min(per_call() for _ in range(3))
    return {"calls": calls[0], "us_per_call": 1e6 * max(0.0, hooked - bare)}


def profile_rank(cfg: TrainConfig, steps: int, warmup: int, threads: Optional[int], hook_calls: bool) -> dict:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from megatron_tgdpo.algorithms.preference import PreferenceAlgorithm
    from megatron_tgdpo.runtime.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    try:
        Trainer.check(cfg)
    except ConfigError as exc:
        return {"error": str(exc)}
    trainer = Trainer(cfg, PreferenceAlgorithm)
    algorithm = trainer.setup(iterations=warmup + 2 * steps + (1 if hook_calls else 0))
    instrument(algorithm)

    def step() -> float:
        dist.barrier()
        t0 = time.perf_counter()
        result = trainer.step()
        result.metrics.reduce(means=algorithm.means, maxima=algorithm.maxima)  # as the loop does when it logs
        return time.perf_counter() - t0

    for _ in range(warmup):
        step()
    plain = [step() for _ in range(steps)]
    tokens = [(sum(b.num_tokens for b in trainer.batches), sum(b.real_tokens for b in trainer.batches),
               len(trainer.batches))]
    HOST_DATA_S.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = [step() for _ in range(steps)]
    host_data_s = sum(HOST_DATA_S) / steps
    totals = attribute(prof.events())
    out = {"plain_s": plain, "profiled_s": profiled, "tokens": tokens[0], "totals_us": totals, "host_data_s": host_data_s,
           "threads": torch.get_num_threads(), "arch": dataclasses.asdict(trainer.run.arch),
           "arch_name": trainer.run.arch_name}
    if hook_calls:
        out["hook"] = _count_hook_calls(trainer)
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def table(result: dict, *, head: str) -> str:
    steps = len(result["profiled_s"])
    step_us = 1e6 * sum(result["profiled_s"]) / steps
    totals = {k: v / steps for k, v in result["totals_us"].items()}
    computed, real, micro = result["tokens"]
    arch = result["arch"]
    lines = [
        f"{head} head | {result['arch_name']} (V {arch['vocab_size']:,}, {arch['num_layers']} layers, hidden "
        f"{arch['hidden_size']}) | {result['threads']} thread(s) | {micro} micro-batches, {computed:,} positions "
        f"({real:,} real) a step",
        f"step: {statistics.median(result['plain_s']):.3f} s unprofiled (median of {len(result['plain_s'])}, "
        f"{min(result['plain_s']):.3f}-{max(result['plain_s']):.3f}), {step_us / 1e6:.3f} s profiled; "
        f"{real / statistics.median(result['plain_s']):,.0f} real tokens/s unprofiled",
        "",
        "| where | forward ms | backward ms | ms / step | % of step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]

    def row(name: str, fwd: Optional[float], bwd: Optional[float], total: float) -> None:
        cell = lambda v: "" if v is None else f"{v / 1e3:,.1f}"  # noqa: E731
        lines.append(f"| {name} | {cell(fwd)} | {cell(bwd)} | {total / 1e3:,.1f} | {100 * total / step_us:.1f} |")

    policy = totals.get("policy forward + backward", 0.0)
    attributed = 0.0
    for part in PARTS + ("other",):
        fwd, bwd = totals.get((part, "forward")), totals.get((part, "backward"))
        if fwd is None and bwd is None:
            continue
        attributed += (fwd or 0.0) + (bwd or 0.0)
        row(f"policy: {part}" if part != "other" else "policy: backward of other ops", fwd, bwd,
            (fwd or 0.0) + (bwd or 0.0))
    rest = policy - attributed
    lines.append(f"| policy: loss, metric sums, schedule (rest) | | | {rest / 1e3:,.1f} | {100 * rest / step_us:.1f} |")
    row("policy forward + backward, total", None, None, policy)
    phases = 0.0
    for phase in PHASES:
        if phase == "policy forward + backward":
            phases += policy
            continue
        value = totals.get(phase, 0.0)
        phases += value
        row(phase, None, None, value)
    row("rest of the step (host bookkeeping)", None, None, max(0.0, step_us - phases))
    lines += ["", f"data: {1e3 * result['host_data_s']:,.1f} ms a step of host work preparing batches (reading, "
                  "packing, collating; one step ahead in a background thread: the data row is what the step waited)"]
    if result.get("hook"):
        hook = result["hook"]
        cost = hook["calls"] * hook["us_per_call"]
        lines += ["", f"CPU device hook: {hook['calls']:,} torch calls a step through it x "
                      f"{hook['us_per_call']:.1f} us = {cost / 1e3:,.1f} ms "
                      f"({100 * cost / (1e6 * statistics.median(result['plain_s'])):.1f} % of the unprofiled step)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, cfg: TrainConfig) -> str:
    """A prepared set of random ids over the model's tokenizer, bench_step's lengths scaled."""
    import bench_step

    # A model directory or .gguf file holds its tokenizer; a --model preset uses the shipped one.
    tokenizer = cfg.tokenizer or cfg.load or bench_step.DEFAULT_TOKENIZER
    pairs = args.num_pairs or cfg.global_batch_size * (args.warmup + 2 * args.steps + 1)
    prefix = Path(args.work_dir) / "pairs"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    bench_step.synthesize(prefix, num_pairs=pairs, scale=args.length_scale, seq_length=cfg.seq_length,
                          seed=cfg.seed, tokenizer=str(tokenizer))
    return str(prefix)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    parser = tool_parser()
    try:
        args, cfg = parse_tool_args(parser, argv, applies="all but --data-path (written by the tool)")
    except ConfigError as exc:
        print(f"profile_step: {exc}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0 or args.length_scale <= 0:
        parser.error("--steps must be >= 1, --warmup >= 0 and --length-scale > 0")
    quiet_library_warnings(verbose=cfg.verbose)
    from megatron_tgdpo.testing import run_on_ranks

    prefix = prepare(args, cfg)
    cfg = dataclasses.replace(cfg, data_path=prefix, ref_load=cfg.ref_load or cfg.load, eval_data_path=None,
                              eval_iters=0, log_dir=None, save=None, tensorboard=False, wandb_project=None,
                              train_iters=args.warmup + 2 * args.steps + 1, train_epochs=None)
    print(f"profile_step: load average {os.getloadavg()[0]:.1f} before", flush=True)
    for head in args.heads:
        variant = dataclasses.replace(cfg, fused_logprobs=head == "fused")
        result = run_on_ranks(1, profile_rank, variant, args.steps, args.warmup, args.threads, args.hook_calls,
                              model_parallel=False, timeout=args.timeout)[0]
        if "error" in result:
            print(f"profile_step: {result['error']}", file=sys.stderr)
            return 2
        print(table(result, head=head), "\n", flush=True)
    print(f"profile_step: load average {os.getloadavg()[0]:.1f} after", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
