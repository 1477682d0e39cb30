#!/usr/bin/env python
r"""Whole training steps, measured side by side: packed vs padded, fused vs plain log-probs, and DPO
online vs TGDPO online vs TGDPO with the offline cache vs a policy-only step (SimPO), on the same tokens.

    # CPU, forked gloo ranks (no launcher): the 70B example's shape scaled down (docs/performance.md)
    python tools/bench_step.py --model tiny --pipeline-model-parallel-size 2 --micro-batch-size 1 \
        --global-batch-size 128 --length-scale 0.0625 --seq-length 128 --steps 2 --warmup 1
    # one GPU (torchrun, NCCL)
    torchrun --nproc-per-node 1 tools/bench_step.py --model llama3.2-1b --bf16 --seq-length 4096 \
        --micro-batch-size 1 --global-batch-size 8 --steps 3 --warmup 1 --output runs/bench_step.json

One run prints one table (and writes JSON with ``--output``). Every variant trains the same pairs (the
same seed, so the same shuffled order) for ``--warmup`` + ``--steps`` iterations through the real step
(``algorithms.preference.PreferenceAlgorithm``: frozen scoring, megatron-core schedule, optimizer),
and the measured steps give:

* step time: the fastest, median and slowest measured step (batch assembly + frozen scoring + policy
  step + optimizer + the metrics reduction the loop does when it logs) over every round, and the
  median of each round; ratios between variants are of medians (a mean of a few steps on a shared
  machine follows its load bursts); tokens/s (computed positions, padding included) and real tokens/s
  (prompt + response tokens), both for the whole job over the summed step times;
* computed tokens / real tokens and the padding fraction (``pad %``: positions that hold no token
  over computed positions; a shared prompt's tokens count once, as its row computes them, so the
  figure is never negative), and where the padding comes from (rows
  padded to the longest row or to ``--seq-length``; per-sequence padding to 2 x CP; packed row tails
  rounded to ``--pad-to-multiple-of`` or, with virtual stages, to the step's fullest row). With
  pipeline parallelism padded rows are padded to ``--seq-length`` (one shape for every micro-batch), so
  the table also gives ``comp/real at PP 1``: the same micro-batches with every row only as long as a
  single-stage run makes it (padded: the micro-batch's longest row; packed: its own content; no
  empty micro-batches), the fair comparison for layouts without PP;
* model TFLOP/s per device as the training loop logs it (``monitoring.FlopModel`` over the computed
  tokens, attention over a padded row's width or a packed token's own segment, 3 passes for the policy
  + one per frozen model),
  and "useful" TFLOP/s (the same model over the real sequences only, attention at each sequence's own
  length); MFU for both against the device's dense bf16 peak (``monitoring.PEAK_TFLOPS``; CUDA only);
* peak memory: CUDA: ``torch.cuda.max_memory_allocated`` over the measured steps minus what was
  allocated before the variant was set up (weights, gradients and optimizer included); CPU: the rank's
  resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) over the measured
  steps minus its resident set before set-up. ``step growth`` is the same peak minus what was
  allocated/resident just before the measured steps: the step's transient memory (what the fused
  head saves). Both are the maximum over ranks. The estimate of ``megatron_tgdpo.memory.estimate``
  (``tools/estimate_memory.py``) is printed beside them, at ``--seq-length`` and at the longest row
  the run actually had; on CUDA the table gives the estimator's error against the measured peak.

Variants (``--compare``, default all): ``packing`` adds the padded layout of the base variant,
``logprobs`` its plain (unfused) LM head, ``sharing`` the base variant with ``--share-prompt``,
``algorithms`` DPO online, TGDPO with the offline cache
(built first with ``tools/precompute_logprobs.run``; its time is reported, not counted in the steps)
and SimPO (no frozen model: the policy-only step). The base variant is ``--base-loss`` (default
tgdpo) online, packed, fused head. ``--pack-sequences``, ``--fused-logprobs``, ``--loss-type``,
``--logprob-cache`` are set per variant; every other training flag (``--help`` lists them) applies to
all variants: model (``--model`` preset, ``--ref-load``), layout (TP/PP/VPP/CP/SP/DP), precision
(``--bf16``, ``--fp8-format hybrid`` where TransformerEngine is installed), batch, ``--seq-length``,
``--pad-to-multiple-of``, ``--logits-chunk-size``, ``--beta``/``--alpha``, ``--seed``.

Data: a prepared set of exactly the pairs the steps consume is written under ``--work-dir`` (an
``IndexedDataset`` + manifest, the format ``tools/prepare_data.py`` writes, so ``setup.resolve_data``,
the sampler and the cache tool read it as any prepared set). Its token ids are random (over the
tokenizer's vocabulary: the shipped sentencepiece tokenizer unless ``--tokenizer``); its lengths are
drawn from a built-in UltraFeedback-like distribution, or copied from ``--data-path`` (the first pairs
of that prepared set, with its tokenizer). The built-in distribution, per pair:

    prompt   lognormal, median 150 tokens, sigma 0.65, clipped to [50, 600]
    response base lognormal, median 450, sigma 0.5; chosen = base x e^N(+0.05, 0.25), rejected =
             base x e^N(-0.05, 0.25), each clipped to [100, 1200] (medians ~470 / ~430; the two sides of
             a pair differ by ~30% typically, the chosen one longer on average)

(mean prompt ~180, mean responses ~530 / ~490; the longest row 1,800 fits --seq-length 2048).
``--length-scale s`` multiplies every length (rounded, at least 1) to shrink the set for CPU runs; pass
``--seq-length`` scaled alike. A pair whose prompt + longer response exceeds ``--seq-length`` is cut
(prompt first, as ``prepare_data.py``'s truncate_prompt), and the count is reported.

Frozen models: the reference is ``--ref-load`` (default: the seeded initialisation of ``--model``; with
``--synthetic-model FIELD=VALUE,...`` a random checkpoint of the preset with those architecture fields
changed, written into ``--work-dir``: a "tiny-ish" model of any width without a preset) and the policy
starts as its copy; the guidance model is ``--guidance-load``, else ``--ref-load``, else a
random checkpoint of the same architecture written once into ``--work-dir`` (Hugging Face layout,
``convert.synthetic``). Weights do not change step cost.

Launch: without a launcher on a CPU machine the ranks are forked gloo processes
(``megatron_tgdpo.testing.run_on_ranks``; ``--nproc`` ranks, default TP x PP x CP), a fresh set per
variant, so every variant's memory is measured in a fresh process. Under torchrun / srun (and on a
CUDA machine without one: a single rank) the variants run one after another in the launched processes,
the memory of the previous one released before the next is built. Exit status 0, 2 on a configuration
error, 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from megatron_tgdpo.config import ConfigError, TrainConfig, parse_tool_args  # noqa: E402
from megatron_tgdpo.monitoring import PeakMemory, mmap_large_blocks, release_free_heap  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = ROOT / "examples" / "data" / "synthetic" / "tokenizer.model"
COMPARISONS = ("packing", "logprobs", "algorithms", "sharing")
MIB = 2**20
GIB = 2**30

# The built-in UltraFeedback-like length distribution (tokens; see the module docstring).
PROMPT = dict(median=150.0, sigma=0.65, low=50, high=600)
RESPONSE = dict(median=450.0, sigma=0.5, low=100, high=1200, side_shift=0.05, side_sigma=0.25)


# --------------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------------


def tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_step.py", add_help=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (allocator, kernels, caches)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="run the whole list of variants this many times, alternating (a busy machine's load "
                             "then hits every variant alike); figures pool the measured steps of all rounds")
    parser.add_argument("--compare", nargs="+", choices=COMPARISONS, default=list(COMPARISONS),
                        help="which comparisons to run (each adds its variants to the base one)")
    parser.add_argument("--base-loss", choices=("tgdpo", "dpo"), default="tgdpo",
                        help="loss of the base variant (online, packed, fused head)")
    parser.add_argument("--length-scale", type=float, default=1.0,
                        help="multiply the built-in lengths (e.g. 0.0625 with --seq-length 128 on CPU)")
    parser.add_argument("--synthetic-model", default=None, metavar="FIELD=VALUE[,...]|preset",
                        help="write a random checkpoint of the --model preset with these LlamaArch fields changed "
                             "(e.g. hidden_size=256,ffn_hidden_size=1024; 'preset': none changed) and use it as "
                             "--ref-load (and guidance): every model is then loaded, none initialised")
    parser.add_argument("--num-pairs", type=int, default=None,
                        help="pairs in the benchmark set (default: global batch x (warmup + steps))")
    parser.add_argument("--work-dir", default="runs/bench_step", help="where the data set, guidance checkpoint "
                        "and cache are written (replaced each run)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--nproc", type=int, default=None,
                        help="CPU without a launcher: forked gloo ranks (default TP x PP x CP)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="CPU forked ranks: seconds per variant")
    return parser


def parse(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, TrainConfig]:
    ours = tool_parser()
    args, cfg = parse_tool_args(ours, argv, applies="all but --pack-sequences, --fused-logprobs, --loss-type, "
                                                   "--logprob-cache, --data-path (read, not trained on)")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        ours.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    if args.length_scale <= 0:
        ours.error("--length-scale must be > 0")
    if args.num_pairs is not None and args.num_pairs < 1:
        ours.error("--num-pairs must be >= 1")
    if args.synthetic_model is not None:
        if cfg.ref_load is not None:
            ours.error("--synthetic-model writes the reference: drop --ref-load")
        try:
            args.synthetic_model = synthetic_overrides(args.synthetic_model)
        except ValueError as exc:
            ours.error(f"--synthetic-model: {exc}")
    return args, cfg


def synthetic_overrides(spec: str) -> dict:
    """``num_layers=4,hidden_size=256`` -> ``{"num_layers": 4, "hidden_size": 256}`` (LlamaArch fields);
    ``preset`` -> ``{}``."""
    from megatron_tgdpo.models.llama import LlamaArch

    if spec.strip() == "preset":
        return {}
    fields = {f.name: f for f in dataclasses.fields(LlamaArch)}
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        text = value.strip()
        if text.lower() in ("true", "false"):
            out[key] = text.lower() == "true"
        elif text.lower() == "none":
            out[key] = None
        else:
            out[key] = float(text) if any(ch in text for ch in ".e") else int(text)
    return out


# --------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    loss_type: str
    cached: bool = False
    packed: bool = True
    fused: bool = True
    shared: bool = False  # --share-prompt (packed rows only)

    @property
    def frozen(self) -> str:
        if self.loss_type == "simpo":
            return "none (policy only)"
        if self.cached:
            return "log-prob cache"
        return "reference + guidance" if self.loss_type == "tgdpo" else "reference"


def plan_variants(compare: Sequence[str], base_loss: str = "tgdpo") -> list[Variant]:
    """The base variant first, then each comparison's (no duplicates)."""
    base = Variant(f"{base_loss} online", base_loss)
    out = [base]
    if "packing" in compare:
        out.append(dataclasses.replace(base, name=f"{base_loss} online, padded", packed=False))
    if "logprobs" in compare:
        out.append(dataclasses.replace(base, name=f"{base_loss} online, plain head", fused=False))
    if "sharing" in compare:
        out.append(dataclasses.replace(base, name=f"{base_loss} online, shared prompt", shared=True))
    if "algorithms" in compare:
        out += [Variant("dpo online", "dpo"), Variant("tgdpo online", "tgdpo"),
                Variant("tgdpo cached", "tgdpo", cached=True), Variant("simpo (policy only)", "simpo")]
    seen, unique = set(), []
    for v in out:
        key = (v.loss_type, v.cached, v.packed, v.fused, v.shared)
        if key not in seen:
            seen.add(key)
            unique.append(v)
    return unique


def variant_config(cfg: TrainConfig, variant: Variant, *, data_path: str, guidance: str, cache: Optional[str],
                   iterations: int) -> TrainConfig:
    tgdpo = variant.loss_type == "tgdpo"
    preference = dataclasses.replace(cfg.preference, logprob_cache=cache if variant.cached else None,
                                     guidance_load=guidance if tgdpo else None)
    return dataclasses.replace(
        cfg, loss_type=variant.loss_type, pack_sequences=variant.packed, fused_logprobs=variant.fused,
        share_prompt=variant.shared and variant.packed,
        preference=preference, data_path=data_path, eval_data_path=None, eval_iters=0, eval_interval=None, train_iters=iterations,
        train_epochs=None, load=None, save=None, save_interval=None, keep_last=None, log_dir=None,
        tensorboard=False, wandb_project=None, exit_duration_in_mins=None,
    )


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def draw_lengths(num_pairs: int, *, scale: float = 1.0, seed: int = 1234) -> np.ndarray:
    """int64 ``[num_pairs, 3]`` (prompt, chosen, rejected) from the built-in distribution, scaled."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(math.log(PROMPT["median"]), PROMPT["sigma"], num_pairs), PROMPT["low"],
                     PROMPT["high"])
    base = rng.lognormal(math.log(RESPONSE["median"]), RESPONSE["sigma"], num_pairs)
    sides = []
    for shift in (RESPONSE["side_shift"], -RESPONSE["side_shift"]):
        side = base * np.exp(rng.normal(shift, RESPONSE["side_sigma"], num_pairs))
        sides.append(np.clip(side, RESPONSE["low"], RESPONSE["high"]))
    lengths = np.stack([prompt, *sides], axis=1) * scale
    return np.maximum(1, np.round(lengths)).astype(np.int64)


def fit_lengths(lengths: np.ndarray, seq_length: int) -> tuple[np.ndarray, int]:
    """Cut pairs whose prompt + longer response exceeds ``seq_length``: the prompt first (keeping at
    least one token), then the responses. Returns (lengths, number of pairs cut)."""
    out = lengths.copy()
    cut = 0
    for row in out:
        longest = int(max(row[1], row[2]))
        if row[0] + longest <= seq_length:
            continue
        cut += 1
        row[0] = max(1, seq_length - longest)
        row[1] = min(row[1], seq_length - row[0])
        row[2] = min(row[2], seq_length - row[0])
    return out, cut


def length_stats(lengths: np.ndarray) -> dict:
    names = ("prompt", "chosen", "rejected")
    stats = {n: {"min": int(lengths[:, i].min()), "median": float(np.median(lengths[:, i])),
                 "mean": round(float(lengths[:, i].mean()), 1), "max": int(lengths[:, i].max())}
             for i, n in enumerate(names)}
    rows = lengths[:, 0:1] + lengths[:, 1:]
    stats["sequence"] = {"mean": round(float(rows.mean()), 1), "max": int(rows.max())}
    stats["chosen_minus_rejected_abs_mean"] = round(float(np.abs(lengths[:, 1] - lengths[:, 2]).mean()), 1)
    return stats


def write_prepared_pairs(prefix: str | Path, items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                         tokenizer: str, chat_template: Optional[str] = None, max_seq_length: int,
                         extra: Optional[dict] = None) -> dict:
    """Write ``items`` (prompt, chosen, rejected token ids) as a prepared preference set at ``prefix``
    (``.bin``/``.idx``/``.manifest.json``, published atomically) whose manifest is the one
    ``data.prepare`` writes, so every reader accepts it. Returns the manifest."""
    from collections import Counter

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_tgdpo.data import prepare
    from megatron_tgdpo.data.manifest import bin_path, idx_path, write_manifest
    from megatron_tgdpo.data.publish import StagedOutput
    from megatron_tgdpo.data.tokenizer import load_tokenizer, tokenizer_content_hash

    tok = load_tokenizer(tokenizer, chat_template=chat_template)
    config = prepare.PrepareConfig(inputs=(), output_prefix=str(prefix), tokenizer=str(tokenizer),
                                   chat_template=chat_template, max_seq_length=max_seq_length, min_prompt_tokens=1,
                                   extra=dict(extra or {}))
    dtype = DType.optimal_dtype(tok.vocab_size)
    lengths = np.asarray([[len(p), len(c), len(r)] for p, c, r in items], dtype=np.int64).reshape(-1, 3)
    with StagedOutput(prefix) as out:
        builder = IndexedDatasetBuilder(str(bin_path(out.stage_prefix)), dtype=dtype)
        try:
            for (p, c, r), row in zip(items, lengths.tolist()):
                builder.add_document(np.concatenate([p, c, r]).astype(np.int64), row)
        finally:
            builder.data_file.close()
        builder.finalize(str(idx_path(out.stage_prefix)))
        manifest = prepare.build_manifest(
            config=config, policy=config.length_policy(), tokenizer=tok,
            tokenizer_sha256=tokenizer_content_hash(tok.path), inputs=[], problems=[],
            counts=Counter(valid_records=len(items)), num_pairs=len(items), token_totals=lengths.sum(axis=0),
            max_lengths=lengths.max(axis=0), max_row=int((lengths[:, 0] + lengths[:, 1:].max(axis=1)).max()),
            dtype_name=np.dtype(dtype).name, stage_prefix=out.stage_prefix)
        write_manifest(out.stage_prefix, manifest)
        out.publish()
    return manifest


def synthesize(prefix: str | Path, *, num_pairs: int, scale: float, seq_length: int, seed: int,
               tokenizer: str) -> dict:
    """The built-in length distribution with random token ids, as a prepared set. Returns a summary."""
    from megatron_tgdpo.data.tokenizer import load_tokenizer

    drawn = draw_lengths(num_pairs, scale=scale, seed=seed)
    lengths, cut = fit_lengths(drawn, seq_length)
    vocab = load_tokenizer(tokenizer).vocab_size
    rng = np.random.default_rng(seed + 1)
    items = [tuple(rng.integers(0, vocab, size=int(n), dtype=np.int64) for n in row) for row in lengths]
    write_prepared_pairs(prefix, items, tokenizer=tokenizer, max_seq_length=seq_length,
                         extra={"bench_step": {"lengths": "built-in UltraFeedback-like", "scale": scale,
                                               "seed": seed}})
    return {"source": "built-in UltraFeedback-like distribution", "scale": scale, "pairs": num_pairs,
            "pairs_cut_to_seq_length": cut, "tokenizer": str(tokenizer), "stats": length_stats(lengths)}


def copy_pairs(prefix: str | Path, source: str, *, num_pairs: int, seq_length: int,
               tokenizer: Optional[str]) -> dict:
    """The first ``num_pairs`` pairs of the prepared set ``source`` (repeated if it has fewer), with its
    tokenizer, cut to ``seq_length``."""
    from megatron_tgdpo.data import PreferenceDataset
    from megatron_tgdpo.data.manifest import manifest_path
    from megatron_tgdpo.data.tokenizer import resolve_dataset_tokenizer

    dataset = PreferenceDataset(source)
    tok = resolve_dataset_tokenizer(dataset.manifest, override=tokenizer, manifest_path=manifest_path(source))
    template = dataset.manifest.get("chat_template", {}).get("name")
    picked = [dataset[i % len(dataset)] for i in range(num_pairs)]
    original = np.asarray([[len(it["prompt"]), len(it["chosen"]), len(it["rejected"])] for it in picked],
                          dtype=np.int64)
    lengths, cut = fit_lengths(original, seq_length)
    # Prompts are cut from the left (their end joins the response), responses from the right.
    items = [(it["prompt"][len(it["prompt"]) - p:], it["chosen"][:c], it["rejected"][:r])
             for it, (p, c, r) in zip(picked, lengths.tolist())]
    write_prepared_pairs(prefix, items, tokenizer=tok, chat_template=template, max_seq_length=seq_length,
                         extra={"bench_step": {"copied_from": str(source)}})
    return {"source": f"first pairs of {source}", "scale": 1.0, "pairs": num_pairs, "pairs_cut_to_seq_length": cut,
            "tokenizer": tok, "stats": length_stats(lengths)}


def ensure_guidance(cfg: TrainConfig, work: Path, *, tokenizer_vocab: int) -> str:
    """A guidance checkpoint path: --guidance-load, else --ref-load, else a random one written here."""
    if cfg.guidance_load is not None:
        return cfg.guidance_load
    if cfg.ref_load is not None:
        return cfg.ref_load
    import torch

    from megatron_tgdpo.convert.synthetic import write_synthetic_hf
    from megatron_tgdpo.runtime import setup

    arch, _ = setup.resolve_architecture(cfg, tokenizer_vocab=tokenizer_vocab)
    out = work / "guidance-hf"
    write_synthetic_hf(out, arch, dtype=torch.bfloat16 if cfg.bf16 else torch.float32, seed=cfg.seed + 7)
    return str(out)


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------


class Meter:
    """A variant's memory (``monitoring.PeakMemory``): CUDA allocated bytes, CPU resident set. ``peak_bytes``
    over what was there before the variant was built, ``step_growth_bytes`` over what was there just
    before the measured steps."""

    def __init__(self, device):
        self.device = device
        self.start = 0
        self.steps = PeakMemory(device)
        self.method = PeakMemory.method(device)

    def begin_variant(self) -> None:
        import torch

        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.start = PeakMemory.current(self.device)

    def begin_steps(self) -> None:
        self.steps.start()

    def end_steps(self) -> dict:
        self.steps.stop()
        peak = self.steps.absolute
        return {"peak_bytes": max(0, peak - self.start), "step_growth_bytes": self.steps.peak,
                "absolute_peak_bytes": peak, "method": self.method}


# --------------------------------------------------------------------------------------------
# one variant, on every rank
# --------------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _content_segments(batch) -> int:
    """Segments of a packed row before its tail: one per sequence, plus one per shared prompt."""
    return batch.num_sequences + len({p for p in (batch.prefix_of or ()) if p >= 0})


def held_tokens(batch, lengths: np.ndarray, *, context_parallel_size: int) -> int:
    """Positions of one micro-batch that hold a token: its real tokens, but each shared prompt's tokens
    once (a shared-prompt row computes a pair's prompt once; the prompt tokens that start each response
    segment are held there too). Without shared prompts, the real tokens."""
    if not (batch.packed and batch.prefix_of and any(p >= 0 for p in batch.prefix_of)):
        return batch.real_tokens
    from megatron_tgdpo.data.packing import shared_prompt_split

    once = sum(shared_prompt_split(int(lengths[i, 0]), context_parallel_size=context_parallel_size)[0]
               for i in batch["sample_idx"].tolist())
    return batch.real_tokens - once


def _padding_breakdown(batch, held: int) -> tuple[int, int]:
    """(per-sequence padding, row padding) positions of one micro-batch that holds ``held`` tokens."""
    if not batch.packed:
        return 0, batch.num_tokens - held
    bounds = batch.segment_bounds()
    segments = bounds[_content_segments(batch)] - bounds[0]  # the sequences' segments come first, the tail last
    return segments - held, batch.num_tokens - segments


def single_stage_positions(batch, lengths: np.ndarray, *, multiple: int) -> int:
    """Positions ``batch`` would compute in a single-stage run (no pipeline parallelism): padded rows as
    long as the micro-batch's longest row rounded up to ``multiple`` (not ``--seq-length``), a packed row
    its segments rounded up to ``multiple`` (the collator's lcm with 2 x CP), an empty micro-batch (one
    that fills an interleaved schedule) none."""
    if batch.packed:
        if batch.num_sequences == 0:
            return 0
        bounds = batch.segment_bounds()
        content = int(bounds[_content_segments(batch)] - bounds[0])
        return max(-(-content // multiple), 1) * multiple
    samples = batch["sample_idx"].tolist()
    longest = max(int(lengths[i, 0] + max(lengths[i, 1], lengths[i, 2])) for i in samples)
    return batch.shape[0] * max(-(-longest // multiple), 1) * multiple


def measure_variant(cfg: TrainConfig, *, steps: int, warmup: int, threads: Optional[int] = None) -> dict:
    """Build ``cfg``'s run and time ``warmup`` + ``steps`` iterations on this rank (every rank calls it)."""
    import torch
    import torch.distributed as dist

    from megatron_tgdpo import compat
    from megatron_tgdpo.algorithms.preference import PreferenceAlgorithm
    from megatron_tgdpo.data import PreferenceDataset
    from megatron_tgdpo.data.collate import padding_multiple
    from megatron_tgdpo.distributed import current_device
    from megatron_tgdpo.memory import estimate
    from megatron_tgdpo.monitoring import FlopModel
    from megatron_tgdpo.runtime.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    device = current_device()
    meter = Meter(device)
    meter.begin_variant()
    Trainer.check(cfg)
    trainer = Trainer(cfg, PreferenceAlgorithm)
    built = time.perf_counter()  # the set-up before the build (data, parallel groups) is counted too
    algorithm = trainer.setup(iterations=warmup + steps)
    build_s = time.perf_counter() - built
    data, arch, arch_name = trainer.run.data, trainer.run.arch, trainer.run.arch_name
    lengths = PreferenceDataset(data.train_prefix).lengths
    flops = FlopModel(arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads,
                      arch.num_query_groups, arch.vocab_size)
    passes = algorithm.passes_per_token
    multiple = padding_multiple(pad_to_multiple_of=cfg.pad_to_multiple_of, tensor_parallel=cfg.tensor_model_parallel_size,
                                sequence_parallel=cfg.sequence_parallel, context_parallel=cfg.context_parallel_size)
    if cfg.pack_sequences:
        multiple = math.lcm(multiple, 2 * cfg.context_parallel_size)
    records = []
    losses = []
    for iteration in range(warmup + steps):
        measured = iteration >= warmup
        if iteration == warmup:
            meter.begin_steps()
        _sync(device)
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        result = trainer.step()
        batches = trainer.batches
        reduced = result.metrics.reduce(means=algorithm.means, maxima=algorithm.maxima)
        _sync(device)
        dist.barrier()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(reduced.get("loss", float("nan"))))
        if not measured:
            continue
        seq_pad = row_pad = single_stage = held = 0
        useful = 0.0
        for batch in batches:
            holds = held_tokens(batch, lengths, context_parallel_size=cfg.context_parallel_size)
            held += holds
            a, b = _padding_breakdown(batch, holds)
            seq_pad, row_pad = seq_pad + a, row_pad + b
            single_stage += single_stage_positions(batch, lengths, multiple=multiple)
            for sample in batch["sample_idx"].tolist():
                p, c, r = (int(x) for x in lengths[sample])
                useful += sum(n * flops.forward_flops_per_token(n) for n in (p + c, p + r))
        computed = result.tokens
        records.append({
            "elapsed_s": elapsed, "cpu_s": cpu, "computed_tokens": computed, "real_tokens": result.real_tokens,
            "micro_batches": len(batches), "longest_row": max(b.shape[1] for b in batches),
            "max_tokens_per_micro_batch": max(b.num_tokens for b in batches), "sequence_padding": seq_pad,
            "held_tokens": held,
            "row_padding": row_pad, "updated": bool(result.updated), "single_stage_tokens": single_stage,
            "loop_flops": flops.step_flops(tokens=computed, seq_length=result.attention_span,
                                           frozen_models=passes - 3.0),
            "useful_flops": useful * passes,
        })
    memory = meter.end_steps()
    estimates = {}
    micro = cfg.micro_batch_size
    seen = max(r["max_tokens_per_micro_batch"] for r in records) // (2 * micro)
    for label, seq in (("at_seq_length", cfg.seq_length), ("at_longest_row", max(seen, 1))):
        est = estimate(
            arch, num_gpus=dist.get_world_size(), micro_batch_size=micro, seq_length=seq,
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
            context_parallel_size=cfg.context_parallel_size, sequence_parallel=cfg.sequence_parallel,
            use_distributed_optimizer=cfg.use_distributed_optimizer, bf16=cfg.bf16, fp8_format=cfg.fp8_format,
            loss_type=cfg.loss_type, global_batch_size=cfg.global_batch_size,
            logits_chunk_size=cfg.logits_chunk_size, flash_attention=True,  # torch's CPU attention is a flash kernel
            fused_logprobs=cfg.fused_logprobs, logprob_cache=cfg.logprob_cache is not None,
            local_layers=not compat.te_available())
        estimates[label] = {"seq_length": seq, "bytes": int(est.worst.total)}
    out = {
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "arch_name": arch_name,
        "parameters": arch.num_parameters(), "describe": algorithm.describe(), "passes_per_token": passes,
        "build_s": build_s, "steps": records, "losses": losses, "memory": memory, "estimates": estimates,
        "te": compat.te_available(),
    }
    del algorithm, trainer
    release_free_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _peak_tflops() -> Optional[float]:
    from megatron_tgdpo.monitoring import peak_tflops

    return peak_tflops()


def pool_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Every rank's result over several rounds as one: the measured steps of all rounds in order, the
    highest memory, the longest build, the first round's losses."""
    pooled = []
    for per_round in zip(*rounds):  # one rank's results, round by round
        first = dict(per_round[0])
        first["steps"] = [dict(s, round=i) for i, r in enumerate(per_round) for s in r["steps"]]
        first["build_s"] = max(r["build_s"] for r in per_round)
        first["memory"] = max((r["memory"] for r in per_round), key=lambda m: m["peak_bytes"])
        pooled.append(first)
    return pooled


def merge_ranks(per_rank: list[dict], *, model_parallel: int, steps: int, peak: Optional[float]) -> dict:
    """One variant's job-wide figures from every rank's: tokens summed over data-parallel replicas (each
    model-parallel group shares its batches), times and memory the maximum over ranks."""
    world = len(per_rank)
    first = per_rank[0]
    totals = {}
    for key in ("computed_tokens", "real_tokens", "held_tokens", "micro_batches", "sequence_padding", "row_padding", "loop_flops",
                "useful_flops", "single_stage_tokens"):
        totals[key] = sum(sum(s.get(key, 0) for s in r["steps"]) for r in per_rank) / model_parallel
    times = [max(r["steps"][i]["elapsed_s"] for r in per_rank) for i in range(steps)]
    cpu_times = [sum(r["steps"][i]["cpu_s"] for r in per_rank) for i in range(steps)]
    rounds: dict[int, list[float]] = {}
    for i, t in enumerate(times):
        rounds.setdefault(first["steps"][i].get("round", 0), []).append(t)
    total_time = sum(times)
    computed, real = totals["computed_tokens"], totals["real_tokens"]
    tflops = totals["loop_flops"] / total_time / 1e12 / world
    useful = totals["useful_flops"] / total_time / 1e12 / world
    peak_bytes = max(r["memory"]["peak_bytes"] for r in per_rank)
    estimates = {k: max(r["estimates"][k]["bytes"] for r in per_rank) for k in first["estimates"]}
    merged = {
        "describe": first["describe"], "arch_name": first["arch_name"], "parameters": first["parameters"],
        "passes_per_token": first["passes_per_token"], "world_size": world, "te_layers": first["te"],
        # the median step: what ratios compare (the mean of a few steps follows a shared machine's bursts)
        "step_time_s": float(np.median(times)), "step_time_min_s": min(times), "step_time_max_s": max(times),
        "step_time_mean_s": total_time / steps, "step_times_s": times,
        "round_median_step_s": [float(np.median(rounds[k])) for k in sorted(rounds)],
        # process CPU time (all threads, user + sys) summed over ranks, median step: steadier than wall time
        "cpu_time_s": float(np.median(cpu_times)),
        "cpu_times_s": [sum(r["steps"][i]["cpu_s"] for r in per_rank) for i in range(steps)],
        "build_s": max(r["build_s"] for r in per_rank),
        "computed_tokens_per_step": computed / steps, "real_tokens_per_step": real / steps,
        "micro_batches_per_step": totals["micro_batches"] / steps,
        "computed_per_real": computed / real if real else float("nan"),
        "single_stage_per_real": totals["single_stage_tokens"] / real if real else float("nan"),
        # padding positions over computed positions (a shared prompt's tokens held once: never negative)
        "padding_fraction": 1 - totals["held_tokens"] / computed if computed else float("nan"),
        "sequence_padding_per_step": totals["sequence_padding"] / steps,
        "row_padding_per_step": totals["row_padding"] / steps,
        "longest_row": max(max(s["longest_row"] for s in r["steps"]) for r in per_rank),
        "tokens_per_s": computed / total_time, "real_tokens_per_s": real / total_time,
        "tflops_per_device": tflops, "useful_tflops_per_device": useful,
        "mfu": tflops / peak if peak else None, "useful_mfu": useful / peak if peak else None,
        "peak_memory_bytes": peak_bytes,
        "step_growth_bytes": max(r["memory"]["step_growth_bytes"] for r in per_rank),
        "memory_method": first["memory"]["method"],
        "estimate_bytes": estimates,
        "losses_rank0": first["losses"], "all_updated": all(s["updated"] for r in per_rank for s in r["steps"]),
    }
    if per_rank[0]["memory"]["method"].startswith("torch.cuda"):
        merged["estimate_error_pct"] = {k: 100.0 * (v - peak_bytes) / peak_bytes for k, v in estimates.items()}
    return merged


# --------------------------------------------------------------------------------------------
# the cache (TGDPO cached)
# --------------------------------------------------------------------------------------------


def build_cache(cfg: TrainConfig, output: str) -> dict:
    """Every rank: the reference + guidance log-probs of the whole benchmark set (``megatron_tgdpo.precompute``)."""
    import torch.distributed as dist

    from megatron_tgdpo import precompute

    start = time.perf_counter()
    summary = precompute.run(cfg, output=output, overwrite=True)
    dist.barrier()
    return {"seconds": time.perf_counter() - start, "pairs": summary["num_samples"], "roles": summary["roles"]}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _mem(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.0f} MiB"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def ratios(results: dict[str, dict], variants: list[Variant], *, cuda: bool) -> dict:
    """The side-by-side figures each comparison is about."""
    by = {v.name: results[v.name] for v in variants if v.name in results}
    base_v = variants[0]
    base = by[base_v.name]
    out: dict[str, Any] = {}
    mem_key = "peak_memory_bytes" if cuda else "step_growth_bytes"
    padded = next((v for v in variants if not v.packed), None)
    if padded is not None:
        p = by[padded.name]
        out["packing"] = {
            "variant": base_v.name,
            "computed_per_real_packed": base["computed_per_real"], "computed_per_real_padded": p["computed_per_real"],
            "single_stage_per_real_packed": base.get("single_stage_per_real"),
            "single_stage_per_real_padded": p.get("single_stage_per_real"),
            "padding_fraction_packed": base["padding_fraction"], "padding_fraction_padded": p["padding_fraction"],
            "step_time_packed_over_padded": _ratio(base["step_time_s"], p["step_time_s"]),
            "cpu_time_packed_over_padded": _ratio(base["cpu_time_s"], p["cpu_time_s"]),
            "min_step_time_packed_over_padded": _ratio(base["step_time_min_s"], p["step_time_min_s"]),
            "real_tokens_per_s_packed_over_padded": _ratio(base["real_tokens_per_s"], p["real_tokens_per_s"]),
            "micro_batches_per_step": {"packed": base["micro_batches_per_step"], "padded": p["micro_batches_per_step"]},
        }
    plain = next((v for v in variants if not v.fused), None)
    if plain is not None:
        q = by[plain.name]
        out["logprobs"] = {
            "variant": base_v.name, "memory_measure": mem_key,
            "step_time_fused_over_plain": _ratio(base["step_time_s"], q["step_time_s"]),
            "cpu_time_fused_over_plain": _ratio(base["cpu_time_s"], q["cpu_time_s"]),
            "min_step_time_fused_over_plain": _ratio(base["step_time_min_s"], q["step_time_min_s"]),
            "memory_fused_over_plain": _ratio(base[mem_key], q[mem_key]),
            "memory_fused": base[mem_key], "memory_plain": q[mem_key],
        }
    shared = next((v for v in variants if v.shared), None)
    if shared is not None:
        r = by[shared.name]
        out["sharing"] = {
            "variant": base_v.name,
            "step_time_shared_over_unshared": _ratio(r["step_time_s"], base["step_time_s"]),
            "cpu_time_shared_over_unshared": _ratio(r["cpu_time_s"], base["cpu_time_s"]),
            "min_step_time_shared_over_unshared": _ratio(r["step_time_min_s"], base["step_time_min_s"]),
            "computed_per_real_shared": r["computed_per_real"], "computed_per_real_unshared": base["computed_per_real"],
        }
    names = {"dpo online": "dpo_online", "tgdpo online": "tgdpo_online", "tgdpo cached": "tgdpo_cached",
             "simpo (policy only)": "policy_only"}
    if all(n in by for n in names):
        ref = by["tgdpo online"]
        out["algorithms"] = {
            "step_time_s": {key: by[n]["step_time_s"] for n, key in names.items()},
            "step_time_over_tgdpo_online": {key: _ratio(by[n]["step_time_s"], ref["step_time_s"])
                                            for n, key in names.items()},
            "cpu_time_over_tgdpo_online": {key: _ratio(by[n]["cpu_time_s"], ref["cpu_time_s"])
                                           for n, key in names.items()},
            "min_step_time_over_tgdpo_online": {key: _ratio(by[n]["step_time_min_s"], ref["step_time_min_s"])
                                                for n, key in names.items()},
            "step_time_over_policy_only": {key: _ratio(by[n]["step_time_s"], by["simpo (policy only)"]["step_time_s"])
                                           for n, key in names.items()},
        }
    return out


def format_report(report: dict) -> str:
    results, variants = report["results"], [Variant(**v) for v in report["variants"]]
    cuda = report["environment"]["device"].startswith("cuda")
    mfu = any(r.get("mfu") is not None for r in results.values())
    pp = report["environment"].get("pipeline_parallel", 1)
    comp = [f"comp/real (PP {pp})", "comp/real at PP 1"] if pp > 1 else ["comp/real"]
    header = ["variant", "frozen", "layout", "head", "min s", "median s", "max s"] + ([] if cuda else ["CPU s"]) + comp + ["pad %", "tok/s", "real tok/s",
              "TFLOP/s", "useful TFLOP/s"] + (["MFU", "useful MFU"] if mfu else []) + \
             ["peak mem", "step growth", "estimate"] + (["est. err"] if cuda else [])
    rows = []
    for v in variants:
        r = results.get(v.name)
        if r is None:
            continue
        row = [v.name, v.frozen, "packed" if v.packed else "padded", "fused" if v.fused else "plain",
               f"{r['step_time_min_s']:.3f}", f"{r['step_time_s']:.3f}", f"{r.get('step_time_max_s', r['step_time_s']):.3f}"] + \
              ([] if cuda else [f"{r['cpu_time_s']:.2f}"]) + [f"{r['computed_per_real']:.3f}"] + \
              ([f"{r.get('single_stage_per_real', float('nan')):.3f}"] if pp > 1 else []) + [f"{100 * r['padding_fraction']:.1f}",
               f"{r['tokens_per_s']:,.0f}", f"{r['real_tokens_per_s']:,.0f}", f"{r['tflops_per_device']:.3g}",
               f"{r['useful_tflops_per_device']:.3g}"]
        if mfu:
            row += [f"{100 * r['mfu']:.1f}%", f"{100 * r['useful_mfu']:.1f}%"]
        est = r["estimate_bytes"]
        row += [_mem(r["peak_memory_bytes"]), _mem(r["step_growth_bytes"]),
                f"{_mem(est['at_longest_row'])} ({_mem(est['at_seq_length'])} at --seq-length)"]
        if cuda:
            row.append(f"{r['estimate_error_pct']['at_longest_row']:+.0f}%")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
    rt = report["ratios"]
    rounds = {v.name: results[v.name].get("round_median_step_s") for v in variants if v.name in results}
    if any(r and len(r) > 1 for r in rounds.values()):
        lines.append("median step of each round (s): " + " | ".join(
            f"{name} " + ", ".join(f"{t:.3f}" for t in r) for name, r in rounds.items() if r))
    if "packing" in rt:
        p = rt["packing"]
        under_pp = ""
        if pp > 1 and p.get("single_stage_per_real_padded") is not None:
            under_pp = (f" [PP {pp}: padded rows are padded to --seq-length; the same micro-batches at PP 1: "
                        f"{p['single_stage_per_real_packed']:.3f} packed vs {p['single_stage_per_real_padded']:.3f} "
                        "padded]")
        lines.append(
            f"packed vs padded ({p['variant']}): computed/real tokens {p['computed_per_real_packed']:.3f} packed vs "
            f"{p['computed_per_real_padded']:.3f} padded (padding {100 * p['padding_fraction_packed']:.1f}% vs "
            f"{100 * p['padding_fraction_padded']:.1f}%){under_pp}; median step time packed/padded "
            f"{p['step_time_packed_over_padded']:.3f}x (fastest steps {p['min_step_time_packed_over_padded']:.3f}x, CPU "
            f"time {p['cpu_time_packed_over_padded']:.3f}x); real tokens/s {p['real_tokens_per_s_packed_over_padded']:.2f}x; "
            f"micro-batches/step {p['micro_batches_per_step']['packed']:.1f} vs {p['micro_batches_per_step']['padded']:.1f}")
    if "logprobs" in rt:
        q = rt["logprobs"]
        what = "peak max_memory_allocated" if q["memory_measure"] == "peak_memory_bytes" else "peak RSS growth"
        lines.append(
            f"fused vs plain head ({q['variant']}): median step time fused/plain {q['step_time_fused_over_plain']:.3f}x "
            f"(fastest steps {q['min_step_time_fused_over_plain']:.3f}x, CPU time {q['cpu_time_fused_over_plain']:.3f}x); "
            f"{what} {_mem(q['memory_fused'])} vs {_mem(q['memory_plain'])} = {q['memory_fused_over_plain']:.3f}x")
    if "algorithms" in rt:
        a = rt["algorithms"]["step_time_over_tgdpo_online"]
        b = rt["algorithms"]["step_time_over_policy_only"]
        lines.append(
            "median step time vs TGDPO online: " + " | ".join(f"{k} {v:.3f}x" for k, v in a.items()) +
            "\nfastest step vs TGDPO online's: " + " | ".join(
                f"{k} {v:.3f}x" for k, v in rt["algorithms"]["min_step_time_over_tgdpo_online"].items()) +
            ("" if cuda else "\nCPU time vs TGDPO online: " + " | ".join(
                f"{k} {v:.3f}x" for k, v in rt["algorithms"]["cpu_time_over_tgdpo_online"].items())) +
            "\nmedian step time vs policy-only (SimPO): " + " | ".join(f"{k} {v:.3f}x" for k, v in b.items()))
    if report.get("cache_build"):
        c = report["cache_build"]
        lines.append(f"cache build (tools/precompute_logprobs, not in the step times): {c['seconds']:.1f}s for "
                     f"{c['pairs']} pairs, roles {', '.join(c['roles'])}")
    d = report["data"]
    s = d["stats"]
    lines.append(
        f"data: {d['pairs']} pairs, {d['source']} (scale {d['scale']:g}); prompt median {s['prompt']['median']:.0f} "
        f"[{s['prompt']['min']}..{s['prompt']['max']}], chosen median {s['chosen']['median']:.0f}, rejected median "
        f"{s['rejected']['median']:.0f} [{min(s['chosen']['min'], s['rejected']['min'])}.."
        f"{max(s['chosen']['max'], s['rejected']['max'])}]; {d['pairs_cut_to_seq_length']} pairs cut to --seq-length")
    e = report["environment"]
    lines.append(
        f"{e['model']} ({e['parameters'] / 1e6:.1f}M params) | {e['layout']} | {e['device_name']} | "
        f"{'TE' if e['te_layers'] else 'local'} layers | torch {e['torch']} | megatron-core {e['megatron_core']} | "
        f"{report['settings']['steps']} measured steps after {report['settings']['warmup']} warm-up"
        f"{' x ' + str(report['settings']['rounds']) + ' rounds' if report['settings'].get('rounds', 1) > 1 else ''}"
        f" | memory: "
        f"{e['memory_method']}" + (f" | load average {e['load_before']:.1f} -> {e['load_after']:.1f} on "
                                    f"{os.cpu_count()} cores" if not cuda else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def _rank_variant(cfg: TrainConfig, steps: int, warmup: int, threads: Optional[int]) -> dict:
    return measure_variant(cfg, steps=steps, warmup=warmup, threads=threads)


def _rank_cache(cfg: TrainConfig, output: str) -> dict:
    return build_cache(cfg, output)


def prepare_inputs(args: argparse.Namespace, cfg: TrainConfig, work: Path, *,
                   data_parallel: int) -> tuple[dict, str, str, Optional[str]]:
    """(data summary, data prefix, guidance path, written reference or None); run by one process before
    the ranks start."""
    import shutil

    from megatron_tgdpo.data.tokenizer import load_tokenizer

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    reference = None
    if args.synthetic_model is not None:
        import torch

        from megatron_tgdpo.convert.synthetic import write_synthetic_hf
        from megatron_tgdpo.models import llama

        arch = llama.preset(cfg.model, **args.synthetic_model)
        reference = str(work / "reference-hf")
        write_synthetic_hf(reference, arch, dtype=torch.bfloat16 if cfg.bf16 else torch.float32, seed=cfg.seed)
        cfg = dataclasses.replace(cfg, ref_load=reference)
    pairs = args.num_pairs or cfg.global_batch_size * (args.warmup + args.steps)
    prefix = work / "pairs"
    if cfg.data_path is not None:
        data = copy_pairs(prefix, cfg.data_path, num_pairs=pairs, seq_length=cfg.seq_length, tokenizer=cfg.tokenizer)
    else:
        tokenizer = cfg.tokenizer or str(DEFAULT_TOKENIZER)
        data = synthesize(prefix, num_pairs=pairs, scale=args.length_scale, seq_length=cfg.seq_length,
                          seed=cfg.seed, tokenizer=tokenizer)
    vocab = load_tokenizer(data["tokenizer"]).vocab_size
    guidance = ensure_guidance(dataclasses.replace(cfg, data_path=str(prefix)), work, tokenizer_vocab=vocab)
    data["data_parallel_size"] = data_parallel
    return data, str(prefix), guidance, reference


def precheck(cfg: TrainConfig, variants: Sequence[Variant], *, world: int, guidance: str) -> None:
    """Every variant's configuration problems before any rank builds a model (what
    ``setup.check_config`` finds, against ``world`` ranks); raises ConfigError. The cache is stood in
    for (it is built later)."""
    from megatron_tgdpo.config import validate
    from megatron_tgdpo.models import llama
    from megatron_tgdpo.runtime import setup

    problems: list[str] = []
    for variant in variants:
        vcfg = variant_config(cfg, variant, data_path=cfg.data_path, guidance=guidance, cache=None, iterations=1)
        try:
            arch, name = setup.declared_architecture(vcfg)
        except ConfigError as exc:
            raise ConfigError(exc.problems) from None
        problems += validate(vcfg, world_size=world, num_heads=arch.num_attention_heads,
                             num_query_groups=arch.num_query_groups, num_layers=arch.num_layers)
        try:
            llama.check_layout(arch, setup.layout_of(vcfg))
        except ValueError as exc:
            problems += [f"{line.strip()} of {name}" for line in str(exc).splitlines()[1:]]
        if vcfg.seq_length > arch.max_position_embeddings:
            problems.append(f"--seq-length {vcfg.seq_length} exceeds the {arch.max_position_embeddings} positions of {name}")
    if problems:
        raise ConfigError(problems)


def _environment(cfg: TrainConfig, first: dict, device) -> dict:
    import torch

    from megatron_tgdpo import compat

    tp, pp, cp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.context_parallel_size
    dp = first["world_size"] // (tp * pp * cp)
    vpp = f" (VPP {cfg.virtual_pipeline_model_parallel_size})" if cfg.virtual_pipeline_model_parallel_size else ""
    return {
        "device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "megatron_core": str(compat.mcore_version()),
        "python": platform.python_version(), "model": first["arch_name"], "parameters": first["parameters"],
        "te_layers": first["te_layers"], "memory_method": first["memory_method"],
        "layout": f"TP {tp}{' (SP)' if cfg.sequence_parallel else ''} x PP {pp}{vpp} x CP {cp} x DP {dp}",
        "pipeline_parallel": pp,
        "precision": ("bf16" if cfg.bf16 else "fp32") + (f" + fp8 {cfg.fp8_format}" if cfg.fp8_format else ""),
        "micro_batch_size": cfg.micro_batch_size, "global_batch_size": cfg.global_batch_size,
        "seq_length": cfg.seq_length, "pad_to_multiple_of": cfg.pad_to_multiple_of,
    }


def run(args: argparse.Namespace, cfg: TrainConfig) -> dict:
    """Everything; returns the report (on the reporting process; None elsewhere)."""
    import torch

    from megatron_tgdpo import distributed

    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    in_process = launched or torch.cuda.is_available()
    if in_process and args.nproc not in (None, int(os.environ.get("WORLD_SIZE", "1"))):
        raise ConfigError("--nproc applies to CPU runs without a launcher; under torchrun use --nproc-per-node")
    if not torch.cuda.is_available():
        mmap_large_blocks()  # before forking: the ranks inherit it
    load_before = os.getloadavg()[0]
    tp, pp, cp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.context_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1")) if in_process else (args.nproc or tp * pp * cp)
    model_parallel = tp * pp * cp
    if world % model_parallel:
        raise ConfigError(f"{world} ranks are not divisible by TP*PP*CP = {tp}*{pp}*{cp}; set --nproc")
    variants = plan_variants(args.compare, args.base_loss)
    iterations = args.warmup + args.steps
    work = Path(args.work_dir)
    reporter = True
    if in_process:
        import torch.distributed as dist

        distributed.init_process_group(distributed.read_launch_env())
        reporter = dist.get_rank() == 0
        box = [None]
        if reporter:
            box = [prepare_inputs(args, cfg, work, data_parallel=world // model_parallel)]
        dist.broadcast_object_list(box, src=0)
        data, prefix, guidance, reference = box[0]
    else:
        data, prefix, guidance, reference = prepare_inputs(args, cfg, work, data_parallel=world // model_parallel)
    if reference is not None:
        cfg = dataclasses.replace(cfg, ref_load=reference)
    precheck(dataclasses.replace(cfg, data_path=prefix), variants, world=world, guidance=guidance)

    def on_ranks(fn, *fn_args) -> list:
        if in_process:
            import torch.distributed as dist

            mine = fn(*fn_args)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            return gathered
        from megatron_tgdpo.testing import run_on_ranks

        return run_on_ranks(world, fn, *fn_args, model_parallel=False, timeout=args.timeout)

    def say(text: str) -> None:
        if reporter:
            print(text, flush=True)

    say(f"bench_step: {len(variants)} variants x ({args.warmup} warm-up + {args.steps} measured steps) | "
        f"{world} rank(s) ({'launched' if launched else 'one process' if in_process else 'forked gloo ranks'}) | "
        f"data: {data['pairs']} pairs, {data['source']}")
    cache = str(work / "cache")
    cache_build = None
    if any(v.cached for v in variants):
        base = variant_config(cfg, Variant("cache", "tgdpo"), data_path=prefix, guidance=guidance, cache=None,
                              iterations=iterations)
        base = dataclasses.replace(base, log_interval=10**9)  # the tool's progress lines: only its last step
        cache_build = on_ranks(_rank_cache, base, cache)[0]
        say(f"  cache built in {cache_build['seconds']:.1f}s")
    results = {}
    peak = _peak_tflops()
    raw: dict[str, list[list[dict]]] = {v.name: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            vcfg = variant_config(cfg, variant, data_path=prefix, guidance=guidance, cache=cache,
                                  iterations=iterations)
            raw[variant.name].append(on_ranks(_rank_variant, vcfg, args.steps, args.warmup, args.threads))
            r = merge_ranks(raw[variant.name][-1], model_parallel=model_parallel, steps=args.steps, peak=peak)
            say(f"  {variant.name:<28}{f' round {round_ + 1}' if args.rounds > 1 else ''} median step "
                f"{r['step_time_s']:.3f}s (CPU {r['cpu_time_s']:.2f}s) | computed/real {r['computed_per_real']:.3f} | "
                f"{r['real_tokens_per_s']:,.0f} real tok/s | peak {_mem(r['peak_memory_bytes'])} | build "
                f"{r['build_s']:.1f}s")
    for variant in variants:
        results[variant.name] = merge_ranks(pool_rounds(raw[variant.name]), model_parallel=model_parallel,
                                            steps=args.steps * args.rounds, peak=peak)
    if in_process:
        distributed.destroy()
    if not reporter:
        return {}
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    first = results[variants[0].name]
    report = {
        "tool": "tools/bench_step.py", "argv": sys.argv[1:],
        "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "compare": list(args.compare),
                     "base_loss": args.base_loss, "length_scale": args.length_scale},
        "environment": {**_environment(cfg, first, device), "load_before": load_before,
                        "load_after": os.getloadavg()[0], "peak_tflops": peak},
        "data": data, "variants": [dataclasses.asdict(v) for v in variants], "results": results,
        "cache_build": cache_build,
    }
    report["ratios"] = ratios(results, variants, cuda=device.type == "cuda")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    try:
        args, cfg = parse(argv)
    except ConfigError as exc:
        print(f"bench_step: {exc}", file=sys.stderr)
        return 2
    quiet_library_warnings(verbose=cfg.verbose)
    try:
        report = run(args, cfg)
    except ConfigError as exc:
        print(f"bench_step: {exc}", file=sys.stderr)
        return 2
    if report:
        print(format_report(report), flush=True)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
