#!/usr/bin/env python
r"""DPO side by side with TRL's ``DPOTrainer``: the same model, the same pairs in the same order, the
same settings, one process per run, interleaved rounds.

    pip install -e ".[bench]"        # TRL 1.16.0, the version this comparison was last run with (setup.py)
    python tools/bench_vs_trl.py --rounds 3 --output runs/bench_vs_trl.json

What is held equal, so that the losses compare and the speeds measure the implementations only:

* model: a small Llama written once with transformers (``LlamaForCausalLM``, seeded, fp32) as a Hugging
  Face directory under ``--work-dir``; this project loads it with ``--load`` (policy) and ``--ref-load``
  (reference), TRL with ``from_pretrained`` twice (policy and ``ref_model``): the reference is the
  initial policy on both sides, scored online every step (TRL's ``precompute_ref_log_probs`` off);
* pairs: ``--pairs`` ragged pairs with UltraFeedback-like lengths (the distribution of
  ``tools/bench_step.py``, scaled by ``--length-scale``), random token ids drawn from a seeded
  generator. Both sides receive token ids, not text: this project a prepared set, TRL a dataset of
  ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` whose tokenization step is skipped (TRL would
  otherwise append an EOS to every response), so the sequences are identical token for token;
* order: this project's sampler order for ``--seed`` (``data.sampler.epoch_permutation``, epoch 0);
  TRL reads the pairs in that order without shuffling. Micro-batches hold the same pairs on both
  sides (``--micro-batch-size`` pairs; TRL: ``per_device_train_batch_size``), a step the same
  ``--global-batch-size`` pairs (TRL: gradient accumulation over the micro-batches);
* loss and optimizer: DPO, TRL's ``loss_type=["sigmoid"]``, the same ``--beta``; AdamW with the same
  ``--lr`` (constant schedule, no warmup), betas, eps 1e-8 (megatron-core's default; this project has
  no flag for it), ``--weight-decay`` and gradient clipping at ``--clip-grad`` global norm; fp32, no
  activation checkpointing (TRL's default ``gradient_checkpointing`` and ``bf16`` are turned off);
* threads: every run gets ``--threads`` torch threads (``OMP_NUM_THREADS``).

Variants of this project: ``padded`` (``--no-pack-sequences``: rows padded to the longest row of the
micro-batch, as TRL pads), ``packed`` (``--pack-sequences --no-share-prompt``) and ``packed+shared``
(``--pack-sequences --share-prompt``: each pair's prompt once per row, the trainer's default on CPU), the last only when
``megatron-tgdpo train --help`` lists ``--share-prompt`` (otherwise skipped with a note).

Each round runs TRL and every variant once, each in its own process, in an order that alternates
from round to round (a busy machine's load then falls on every side alike). Per run:

* real tokens/s: prompt + response tokens of both sequences of every pair (the prompt counted once
  per sequence, as both sides compute it), over the wall time of steps 2..N (step 1 warms up
  allocators and caches): this project's ``step_time_s`` (metrics.jsonl), TRL's time between the
  ends of consecutive optimizer steps (batch collation included, as in this project's step time);
* peak RSS: the run's resident-set high-water mark (``ru_maxrss`` of that child process, read with
  ``os.wait4``), start-up and imports included;
* process CPU seconds (user + system, same source): the whole run, start-up included; on a machine
  shared with other jobs it moves less with the load than wall time does;
* computed positions per real token over the timed steps: the positions each side's policy forward
  actually ran (padding included; a shared prompt counted once) over the real tokens. TRL: rows x width
  of every collated micro-batch its ``compute_loss`` received (chosen and rejected rows padded to the
  longest of the micro-batch), summed per optimizer step; this project: each step's computed tokens
  from ``metrics.jsonl`` (``tokens_per_s`` x ``step_time_s``). The reference forward runs the same
  positions on each side, so the ratio is the whole step's;
* step 1..3: loss, mean chosen / rejected sequence log-prob and gradient norm (before clipping).

The table gives per side the median and min..max of real tokens/s over the rounds, the ratio of the
medians to TRL's (project / TRL), computed positions per real token and the **position bound** (TRL's
positions / the side's: the speed ratio a side reaches when a step's cost is proportional to the
positions it computes, as it is when matrix products dominate), the median peak RSS and its ratio,
and then the first three losses of every side with their difference from TRL's (from round 1; every
round must give the same losses, which is checked). Exit status 0, 2 on a configuration error, 1 when a run fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
# Runnable from a checkout without installing the package.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TOOLS))

TOKENIZER = ROOT / "examples" / "data" / "synthetic" / "tokenizer.model"
VARIANTS = {
    "padded": ["--no-pack-sequences"],
    "packed": ["--pack-sequences", "--no-share-prompt"],
    "packed+shared": ["--pack-sequences", "--share-prompt"],
}
TRL = "TRL"
COMPARED_STEPS = 3


# --------------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_vs_trl.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every side once)")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS),
                   help="this project's variants (packed+shared only where --share-prompt exists)")
    p.add_argument("--pairs", type=int, default=256, help="preference pairs (all trained once)")
    p.add_argument("--length-scale", type=float, default=0.0625,
                   help="multiply the UltraFeedback-like lengths (1.0: prompt median 150, responses ~450)")
    p.add_argument("--seq-length", type=int, default=128, help="longest prompt + response (pairs cut to fit)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--global-batch-size", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.95)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1234, help="data, model weights and sampler order")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=2, help="key/value heads (grouped-query attention)")
    p.add_argument("--ffn-hidden-size", type=int, default=384)
    p.add_argument("--vocab-size", type=int, default=512,
                   help="model vocabulary (token ids are drawn from the shipped tokenizer's 38)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--work-dir", default="runs/bench_vs_trl", help="model, data and run logs (replaced)")
    p.add_argument("--output", default=None, help="write every figure as JSON here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)  # one TRL run (a child process)
    return p


def check(args: argparse.Namespace) -> Optional[str]:
    """The first problem with the flags, as one line, or None."""
    positive = ("rounds", "pairs", "seq_length", "micro_batch_size", "global_batch_size", "hidden_size",
                "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
                "threads")
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if args.global_batch_size % args.micro_batch_size:
        return "--global-batch-size must be a multiple of --micro-batch-size"
    if args.pairs < 2 * args.global_batch_size:
        return "--pairs must give at least 2 steps (2 x --global-batch-size): step 1 is not timed"
    if args.num_attention_heads % args.num_query_groups or args.hidden_size % args.num_attention_heads:
        return "--num-attention-heads must divide --hidden-size and be a multiple of --num-query-groups"
    if not args.length_scale > 0 or not (args.beta > 0 and args.lr > 0):
        return "--length-scale, --beta and --lr must be > 0"
    if args.vocab_size < 64:
        return "--vocab-size must be >= 64 (the shipped tokenizer has 38 tokens)"
    return None


# --------------------------------------------------------------------------------------------
# the shared inputs
# --------------------------------------------------------------------------------------------


def write_model(out: Path, args: argparse.Namespace) -> dict:
    """A seeded fp32 Llama written with transformers; returns its config as a dict."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_query_groups, max_position_embeddings=max(1024, 2 * args.seq_length),
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_dropout=0.0,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), **{
        k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads")}}


def write_pairs(work: Path, args: argparse.Namespace) -> dict:
    """The pairs as this project's prepared set and as token-id lists in the trained order (for TRL)."""
    import numpy as np

    import bench_step
    from megatron_tgdpo.data.sampler import epoch_permutation

    drawn = bench_step.draw_lengths(args.pairs, scale=args.length_scale, seed=args.seed)
    lengths, cut = bench_step.fit_lengths(drawn, args.seq_length)
    rng = np.random.default_rng(args.seed + 1)
    vocab = 38  # the shipped tokenizer's size: every id is one the prepared set's tokenizer knows
    items = [tuple(rng.integers(0, vocab, size=int(n), dtype=np.int64) for n in row) for row in lengths]
    bench_step.write_prepared_pairs(work / "data" / "pairs", items, tokenizer=str(TOKENIZER),
                                    max_seq_length=args.seq_length,
                                    extra={"bench_vs_trl": {"scale": args.length_scale, "seed": args.seed}})
    order = epoch_permutation(len(items), seed=args.seed, epoch=0).tolist()
    ordered = [{"prompt_ids": items[i][0].tolist(), "chosen_ids": items[i][1].tolist(),
                "rejected_ids": items[i][2].tolist()} for i in order]
    (work / "pairs_in_order.json").write_text(json.dumps(ordered))
    per_pair = [2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in ordered]
    g = args.global_batch_size
    steps = len(per_pair) // g
    return {"pairs": len(items), "pairs_cut_to_seq_length": cut, "steps": steps,
            "real_tokens_per_step": [sum(per_pair[s * g:(s + 1) * g]) for s in range(steps)],
            "stats": bench_step.length_stats(lengths)}


def share_prompt_available() -> bool:
    out = subprocess.run([sys.executable, "-m", "megatron_tgdpo", "train", "--help"], capture_output=True,
                         text=True, env=child_env(threads=1), timeout=300)
    return "--share-prompt" in out.stdout


def child_env(*, threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# --------------------------------------------------------------------------------------------
# one run, in its own process
# --------------------------------------------------------------------------------------------


def run_child(cmd: list[str], *, log: Path, env: dict, timeout: float) -> tuple[int, int, float, float]:
    """(exit status, peak RSS in bytes, wall seconds, CPU seconds) of ``cmd``; its output goes to ``log``."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux.
    return (proc.returncode, int(usage.ru_maxrss) * 1024, time.perf_counter() - start,
            usage.ru_utime + usage.ru_stime)


def project_flags(variant: str, *, work: Path, args: argparse.Namespace, steps: int, run_dir: Path) -> list[str]:
    """``megatron-tgdpo train`` flags of one run of ``variant``."""
    return ["--load", str(work / "model"), "--ref-load", str(work / "model"),
            "--data-path", str(work / "data" / "pairs"), "--loss-type", "dpo",
            "--beta", repr(args.beta), "--lr", repr(args.lr), "--min-lr", "0", "--lr-decay-style", "constant",
            "--lr-warmup-fraction", "0", "--clip-grad", repr(args.clip_grad), "--adam-beta1", repr(args.adam_beta1),
            "--adam-beta2", repr(args.adam_beta2), "--weight-decay", repr(args.weight_decay),
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--seq-length", str(args.seq_length), "--train-iters", str(steps), "--seed", str(args.seed),
            "--log-dir", str(run_dir), "--log-interval", "1", *VARIANTS[variant]]


def run_project(variant: str, *, work: Path, args: argparse.Namespace, steps: int, tag: str) -> dict:
    run_dir = work / "runs" / f"{variant}-{tag}"
    cmd = [sys.executable, "-m", "megatron_tgdpo", "train",
           *project_flags(variant, work=work, args=args, steps=steps, run_dir=run_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    rc, rss, wall, cpu = run_child(cmd, log=run_dir / "stdout.log", env=child_env(threads=args.threads),
                                   timeout=args.timeout)
    if rc != 0:
        raise RuntimeError(f"{variant} exited {rc}; see {run_dir / 'stdout.log'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = sorted(rows, key=lambda r: r["iteration"])
    return {"step_time_s": [r["step_time_s"] for r in rows],
            # computed positions (padding included, a shared prompt once) of each step, as the loop logs them
            "computed_positions": [round(r["tokens_per_s"] * r["step_time_s"]) for r in rows],
            "loss": [r["loss"] for r in rows[:COMPARED_STEPS]],
            "logps_chosen": [r["logps/chosen"] for r in rows[:COMPARED_STEPS]],
            "logps_rejected": [r["logps/rejected"] for r in rows[:COMPARED_STEPS]],
            "grad_norm": [r["grad_norm"] for r in rows[:COMPARED_STEPS]],
            "peak_rss_bytes": rss, "process_wall_s": wall, "process_cpu_s": cpu}


def run_trl(*, work: Path, args: argparse.Namespace, steps: int, tag: str) -> dict:
    run_dir = work / "runs" / f"trl-{tag}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"work": str(work), "out": str(run_dir), "steps": steps, **{
        k: getattr(args, k) for k in ("beta", "lr", "clip_grad", "adam_beta1", "adam_beta2", "weight_decay",
                                      "micro_batch_size", "global_batch_size", "seed", "threads")}}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(run_dir / "spec.json")]
    rc, rss, wall, cpu = run_child(cmd, log=run_dir / "stdout.log", env=child_env(threads=args.threads),
                                   timeout=args.timeout)
    if rc != 0:
        raise RuntimeError(f"TRL exited {rc}; see {run_dir / 'stdout.log'}")
    result = json.loads((run_dir / "result.json").read_text())
    return {**result, "peak_rss_bytes": rss, "process_wall_s": wall, "process_cpu_s": cpu}


def trl_worker(spec_path: str) -> int:
    """One TRL DPOTrainer run over the pairs in order; writes result.json beside the spec."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    work, out = Path(spec["work"]), Path(spec["out"])
    pairs = json.loads((work / "pairs_in_order.json").read_text())
    dataset = datasets.Dataset.from_list(pairs)
    # TRL needs a tokenizer object for its pad id only: the pairs arrive as token ids.
    vocab = {"<pad>": 0, "<eos>": 1}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                        pad_token="<pad>", eos_token="<eos>")

    class TokenIdsDPOTrainer(DPOTrainer):
        """DPOTrainer over pairs given as token ids, read in the order given."""

        micro_losses: list[float] = []
        micro_positions: list[int] = []  # rows x width of every collated training micro-batch

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # ids already given
            return dataset

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                rows, width = inputs["input_ids"].shape
                self.micro_positions.append(int(rows) * int(width))
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if isinstance(result, tuple) else result
            self.micro_losses.append(float(loss.detach()))
            return result

    class Record(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                self.logs.append(dict(logs))

    accumulation = spec["global_batch_size"] // spec["micro_batch_size"]
    config = DPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=accumulation, max_steps=spec["steps"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", adam_beta1=spec["adam_beta1"],
        adam_beta2=spec["adam_beta2"], adam_epsilon=1e-8, weight_decay=spec["weight_decay"],
        max_grad_norm=spec["clip_grad"], beta=spec["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=False,
        max_length=None, pad_to_multiple_of=None, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=spec["seed"],
        data_seed=spec["seed"], dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    record = Record()
    trainer = TokenIdsDPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, callbacks=[record])
    # What this comparison promises about TRL's side, checked on the trainer it built.
    assert trainer.loss_types == ["sigmoid"] and not trainer.precompute_ref_logps, "TRL: not plain online DPO"
    assert trainer.ref_model is not None and not trainer.args.gradient_checkpointing, "TRL: settings differ"
    trainer.train()
    losses = trainer.micro_losses
    step_losses = [sum(losses[s * accumulation:(s + 1) * accumulation]) / accumulation
                   for s in range(len(losses) // accumulation)]
    logs = record.logs
    positions = trainer.micro_positions
    result = {
        "step_time_s": [b - a for a, b in zip(record.ends, record.ends[1:])],
        "computed_positions": [sum(positions[s * accumulation:(s + 1) * accumulation])
                               for s in range(len(positions) // accumulation)],
        "loss": step_losses[:COMPARED_STEPS],
        "logps_chosen": [row.get("logps/chosen") for row in logs[:COMPARED_STEPS]],
        "logps_rejected": [row.get("logps/rejected") for row in logs[:COMPARED_STEPS]],
        "grad_norm": [row.get("grad_norm") for row in logs[:COMPARED_STEPS]],
    }
    (out / "result.json").write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------


def real_tokens_per_s(run: dict, tokens_per_step: Sequence[int]) -> float:
    """Steps 2..N: real tokens over wall seconds."""
    times = run["step_time_s"][1:len(tokens_per_step)]
    return sum(tokens_per_step[1:len(times) + 1]) / sum(times)


def positions_per_real_token(run: dict, tokens_per_step: Sequence[int]) -> Optional[float]:
    """Steps 2..N (the timed ones): computed positions over real tokens (None: not recorded)."""
    if not run.get("computed_positions"):
        return None
    steps = min(len(run["computed_positions"]), len(tokens_per_step))
    return sum(run["computed_positions"][1:steps]) / sum(tokens_per_step[1:steps])


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for name in ("torch", "megatron-core", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def summarize(sides: Sequence[str], runs: dict[str, list[dict]], tokens: Sequence[int]) -> dict:
    out = {}
    for side in sides:
        speeds = [real_tokens_per_s(r, tokens) for r in runs[side]]
        rss = [r["peak_rss_bytes"] for r in runs[side]]
        out[side] = {"real_tokens_per_s": {"median": statistics.median(speeds), "min": min(speeds),
                                           "max": max(speeds), "rounds": speeds},
                     "peak_rss_mib": statistics.median(rss) / 2**20,
                     "process_cpu_s": statistics.median(r["process_cpu_s"] for r in runs[side]),
                     "positions_per_real_token": positions_per_real_token(runs[side][0], tokens),
                     "positions_same_in_every_round": all(
                         r.get("computed_positions") == runs[side][0].get("computed_positions") for r in runs[side]),
                     **{k: runs[side][0][k] for k in ("loss", "logps_chosen", "logps_rejected", "grad_norm")},
                     "loss_spread_over_rounds": max(
                         abs(a - b) for r in runs[side] for a, b in zip(r["loss"], runs[side][0]["loss"]))}
    base = out[TRL]
    for side in sides:
        s = out[side]
        s["speed_ratio"] = s["real_tokens_per_s"]["median"] / base["real_tokens_per_s"]["median"]
        s["rss_ratio"] = s["peak_rss_mib"] / base["peak_rss_mib"]
        mine, trl = s["positions_per_real_token"], base["positions_per_real_token"]
        s["position_bound"] = trl / mine if mine and trl else None
        s["loss_diff"] = [a - b for a, b in zip(s["loss"], base["loss"])]
    return out


def table(summary: dict, sides: Sequence[str]) -> str:
    lines = [f"{'side':<14} {'real tok/s median':>17} {'min..max':>15} {'ratio':>6} {'positions/real':>14} "
             f"{'bound':>6} {'peak RSS MiB':>12} {'ratio':>6} {'process CPU s':>13}"]
    for side in sides:
        s = summary[side]
        t = s["real_tokens_per_s"]
        lines.append(f"{side:<14} {t['median']:>17.0f} {t['min']:>7.0f}..{t['max']:<7.0f} {s['speed_ratio']:>6.2f} "
                     f"{fmt([s['positions_per_real_token']], 0, 14, 3)} {fmt([s['position_bound']], 0, 6, 2)} "
                     f"{s['peak_rss_mib']:>12.0f} {s['rss_ratio']:>6.2f} {s['process_cpu_s']:>13.1f}")
    lines.append("ratio: real tokens/s over TRL's; positions/real: computed positions per real token (steps 2..N); "
                 "bound: TRL's positions / the side's")
    lines.append("")
    lines.append(f"{'side':<14} {'step':>4} {'loss':>12} {'- TRL':>10} {'logp chosen':>12} {'logp rejected':>13} "
                 f"{'grad norm':>10}")
    for side in sides:
        s = summary[side]
        for i, loss in enumerate(s["loss"]):
            diff = "" if side == TRL else f"{s['loss_diff'][i]:+.1e}"
            lines.append(f"{side:<14} {i + 1:>4} {loss:>12.8f} {diff:>10} {fmt(s['logps_chosen'], i, 12, 4)} "
                         f"{fmt(s['logps_rejected'], i, 13, 4)} {fmt(s['grad_norm'], i, 10, 5)}")
    return "\n".join(lines)


def fmt(values: Sequence[Optional[float]], i: int, width: int, digits: int) -> str:
    value = values[i] if i < len(values) else None
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    problem = check(args)
    if problem:
        print(f"bench_vs_trl.py: {problem}", file=sys.stderr)
        return 2
    try:
        import trl  # noqa: F401
    except ImportError:
        print('bench_vs_trl.py: TRL is not installed; pip install -e ".[bench]"', file=sys.stderr)
        return 2

    import shutil

    work = Path(args.work_dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    model = write_model(work / "model", args)
    data = write_pairs(work, args)
    steps, tokens = data["steps"], data["real_tokens_per_step"]
    variants = list(args.variants)
    notes = []
    if "packed+shared" in variants and not share_prompt_available():
        variants.remove("packed+shared")
        notes.append("packed+shared skipped: this checkout's `megatron-tgdpo train --help` has no --share-prompt")
    sides = [TRL, *variants]
    print(f"model: {model}\npairs: {data['pairs']} ({data['pairs_cut_to_seq_length']} cut), {steps} steps of "
          f"{args.global_batch_size}, real tokens {sum(tokens)}; timed: steps 2..{steps}", flush=True)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            tag = f"r{r + 1}"
            try:
                run = (run_trl(work=work, args=args, steps=steps, tag=tag) if side == TRL else
                       run_project(side, work=work, args=args, steps=steps, tag=tag))
            except (RuntimeError, subprocess.SubprocessError, OSError, KeyError, ValueError) as exc:
                print(f"bench_vs_trl.py: {exc}", file=sys.stderr)
                return 1
            runs[side].append(run)
            print(f"round {r + 1} {side:<14} {real_tokens_per_s(run, tokens):8.0f} real tok/s  "
                  f"{fmt([positions_per_real_token(run, tokens)], 0, 5, 3)} positions/real  peak RSS "
                  f"{run['peak_rss_bytes'] / 2**20:6.0f} MiB  process CPU {run['process_cpu_s']:6.1f} s  "
                  f"losses {['%.8f' % x for x in run['loss']]}", flush=True)
    summary = summarize(sides, runs, tokens)
    print()
    print(table(summary, sides))
    for note in notes:
        print(f"note: {note}")
    report = {"argv": list(sys.argv[1:] if argv is None else argv), "versions": versions(), "model": model,
              "data": {k: v for k, v in data.items() if k != "real_tokens_per_step"}, "steps": steps,
              "notes": notes, "summary": summary, "runs": runs}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
