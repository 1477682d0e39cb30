"""``megatron-tgdpo replicate``: the TGDPO pipeline end to end, on a verifiable task, on CPU.

    megatron-tgdpo replicate                        # one seed, about 15 CPU-minutes
    megatron-tgdpo replicate --seeds 3 --alphas 0.5,1,2 --curves 14 --figures docs/img
    megatron-tgdpo replicate --model smollm2 --seeds 3   # a real chat model: about 12 CPU-minutes a seed
    megatron-tgdpo replicate --preset credit --seeds 8 --figures docs/img   # long answers, every method and
                                                    # control, each seed its own data: ~7 CPU-minutes a seed

Make prompts (SFT / preference / held-out, disjoint) -> SFT on prompt + ideal answer -> sample k responses
per preference prompt from the SFT model -> score them with the task's verifier -> best vs worst pairs ->
DPO from the SFT model (also the guidance model) -> TGDPO from the SFT model guided by the DPO model ->
SimPO, IPO from the SFT model -> every model scored on the same held-out prompts (greedy and k samples):
mean score, exact match, win rate against DPO. One table at the end; with several seeds each cell is the
mean ± standard deviation over seeds. Everything lands under --workdir; a rerun skips every stage whose
output is complete and whose settings are unchanged, so an interrupted run resumes where it stopped.
With a pretrained model (``--model smollm2``, fetched into the cache like ``megatron-tgdpo fetch-model``,
or ``--base`` a Hugging Face directory or .gguf file) the SFT stage is left out: the base model samples the
pairs, is the reference and starting point, renders prompts with its own chat template, and is scored as
the "base" row (``--preset smollm2``, the default then: sorting English words).
Results and the exact commands behind docs/results.md: see that file.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_tgdpo.pipeline.config import ALL_METHODS, METHODS, PRESETS, PipelineConfig, preset

__all__ = ["build_parser", "main"]

REAL_PRESET = "smollm2"  # the preset of --model / --base
REAL_PRESET_MODEL = "smollm2"  # the model --preset smollm2 fetches when neither is given


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _task_params(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE (e.g. min_length=12,max_length=24)")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key.strip()}={value!r}: the value must be an integer") from None
    return out


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser(*, prog: str = "python -m megatron_tgdpo.replicate", doc: str = __doc__,
                 default_workdir: str = "runs/replicate", default_preset: str = "full") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=default_workdir, help=f"where everything goes (default {default_workdir})")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help=f"sizes (default {default_preset}; {REAL_PRESET} with --model / --base); the flags "
                        "below override single settings")
    parser.set_defaults(default_preset=default_preset)
    real = parser.add_mutually_exclusive_group()
    real.add_argument("--model", dest="real_model", metavar="NAME",
                      help="a pretrained model by name (smollm2), fetched once into the user cache "
                      "(megatron-tgdpo fetch-model); it replaces the SFT stage (see above)")
    real.add_argument("--base", metavar="PATH", help="a pretrained model: Hugging Face directory or .gguf file "
                      "(like --model)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, metavar="N", help="run seeds 1..N (default 1)")
    seeds.add_argument("--seed-list", type=_ints, metavar="S1,S2", help="run exactly these seeds")
    parser.add_argument("--alpha", type=float, help="TGDPO alpha of the main table (default 0.5, the paper's)")
    parser.add_argument("--alphas", type=_floats, metavar="A1,A2", help="also train TGDPO at these alphas and print "
                        "the alpha-sensitivity table (e.g. 0.5,1,2)")
    parser.add_argument("--methods", type=lambda t: tuple(t.split(",")), metavar="M1,M2",
                        help=f"models to train and compare (default: {','.join(METHODS)}; also "
                        f"{','.join(m for m in ALL_METHODS if m not in METHODS)}: TGDPO's controls, cross-fitted "
                        "guidance and guidance by a reward model trained on the same pairs, docs/guidance.md; "
                        "the default of --preset credit is all of them)")
    parser.add_argument("--curves", type=int, metavar="N", help="first seed: checkpoint DPO and TGDPO every N "
                        "iterations and score each on the held-out prompts (held-out score curves)")
    parser.add_argument("--figures", type=Path, metavar="DIR", help="also write the curves PNG there (needs --curves)")
    parser.add_argument("--pack-sequences", action=argparse.BooleanOptionalAction, default=None,
                        help="pack several examples into each row in every training job (default: the preset's; "
                        "on in every preset but full, whose docs/results.md figures were measured with padded rows)")
    parser.add_argument("--share-prompt", action=argparse.BooleanOptionalAction, default=None,
                        help="preference jobs: each pair's prompt once per packed row (default: the trainer's, on "
                        "for packed rows on the local attention; docs/results.md's figures were measured with "
                        "--no-share-prompt)")
    parser.add_argument("--verbose", action="store_true", help="show library warnings (also MEGATRON_TGDPO_VERBOSE=1)")
    parser.add_argument("--nproc", type=int, help="ranks per training job (default 1: fastest for the tiny model)")
    sizes = parser.add_argument_group("task and sizes (defaults from --preset)")
    sizes.add_argument("--task", choices=("addition", "sort", "reverse", "word-sort", "word-reverse"))
    sizes.add_argument("--task-params", type=_task_params, metavar="K=V,K=V",
                       help="the task's difficulty parameters (integers), e.g. min_length=12,max_length=24 for "
                       "sort / reverse, num_digits=3 for addition (default: the preset's, or the task's own)")
    sizes.add_argument("--vary-data-seed", action=argparse.BooleanOptionalAction, default=None,
                       help="seed N draws its own prompts and SFT data with data seed N, so the spread over seeds "
                       "includes the data's (default: the preset's; otherwise one data set for all seeds)")
    sizes.add_argument("--sft-prompts", type=int)
    sizes.add_argument("--pref-prompts", type=int)
    sizes.add_argument("--heldout-prompts", type=int)
    sizes.add_argument("--sft-noise", type=float, help="fraction of SFT answers with one digit wrong (default "
                       f"{PipelineConfig.sft_noise:g})")
    sizes.add_argument("--sft-iters", type=int)
    sizes.add_argument("--pref-iters", type=int, help="iterations of every preference model")
    sizes.add_argument("--pref-lr", type=float, help="learning rate of every preference model")
    sizes.add_argument("--beta", type=float, help="DPO / TGDPO beta (also scales the guidance reward)")
    sizes.add_argument("--num-samples", type=int, help="k responses sampled per preference prompt")
    sizes.add_argument("--eval-samples", type=int, help="sampled evaluation: k per held-out prompt (0: greedy only)")
    return parser


def _preset_name(args: argparse.Namespace) -> str:
    if args.preset is not None:
        return args.preset
    if getattr(args, "real_model", None) or getattr(args, "base", None):
        return REAL_PRESET
    return getattr(args, "default_preset", "full")


def _base_path(args: argparse.Namespace, preset_name: str) -> str:
    """The pretrained model's path: --base, --model's cached files, or the real preset's model; '' for none."""
    if getattr(args, "base", None):
        return str(Path(args.base).resolve())
    name = getattr(args, "real_model", None) or (REAL_PRESET_MODEL if preset_name == REAL_PRESET else None)
    if not name:
        return ""
    return fetched_model_dir(name)


class FetchFailed(RuntimeError):
    """``megatron-tgdpo fetch-model`` failed; ``code`` is its exit status (2: usage, 1: download)."""

    def __init__(self, message: str, *, code: int):
        super().__init__(message)
        self.code = code


def fetched_model_dir(name: str) -> str:
    """The cached Hugging Face directory of model ``name``, fetched first if needed, by the fetch-model
    command in a child process (its progress goes to this console's stderr; the command layer is not
    imported here)."""
    import subprocess

    result = subprocess.run([sys.executable, "-m", "megatron_tgdpo.cli.fetch_model", name],
                            stdout=subprocess.PIPE, text=True)
    paths = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    if result.returncode != 0 or "hf" not in paths:
        raise FetchFailed(f"fetch-model {name} failed (exit {result.returncode}; its message is above)",
                          code=result.returncode or 1)
    return paths["hf"]


def config_from_args(args: argparse.Namespace):
    name = _preset_name(args)
    args.preset = name
    cfg = preset(name)
    overrides = {}
    base = _base_path(args, name)
    if base:
        overrides["base"] = base
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(1, args.seeds + 1))
    elif args.seed_list is not None:
        overrides["seeds"] = args.seed_list
    simple = {"pack_sequences": "pack_sequences", "share_prompt": "share_prompt", "alpha": "alpha", "alphas": "alphas", "methods": "methods",
              "curves": "curve_every", "nproc": "nproc",
              "task": "task", "sft_prompts": "sft_prompts", "pref_prompts": "pref_prompts",
              "heldout_prompts": "heldout_prompts", "sft_noise": "sft_noise", "beta": "beta",
              "num_samples": "num_samples", "eval_samples": "eval_samples", "vary_data_seed": "vary_data_seed"}
    for flag, name in simple.items():
        if getattr(args, flag, None) is not None:
            overrides[name] = getattr(args, flag)
    if getattr(args, "task", None) is not None and args.task != cfg.task:
        overrides["task_params"] = {}  # the task's own defaults
    if getattr(args, "task_params", None) is not None:
        overrides["task_params"] = {**overrides.get("task_params", cfg.task_params), **args.task_params}
    if getattr(args, "sft_iters", None) is not None:
        overrides["sft"] = dataclasses.replace(cfg.sft, iters=args.sft_iters)
    pref = {}
    if getattr(args, "pref_iters", None) is not None:
        pref["iters"] = args.pref_iters
    if getattr(args, "pref_lr", None) is not None:
        pref.update(lr=args.pref_lr, min_lr=args.pref_lr / 10)
    if pref:
        overrides["preference"] = dataclasses.replace(cfg.preference, **pref)
    return dataclasses.replace(cfg, **overrides)


def run(args: argparse.Namespace, *, out=print) -> int:
    from megatron_tgdpo.pipeline import PipelineError, run_replication
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    # Data preparation and checkpoint checks import megatron-core here too: the console shows the run only.
    quiet_library_warnings(verbose=args.verbose)
    try:
        cfg = config_from_args(args)
    except FetchFailed as exc:
        print(f"error: --model: {exc}", file=sys.stderr)
        return exc.code
    if cfg.base and not Path(cfg.base).exists():
        print(f"error: --base: {cfg.base} does not exist (a Hugging Face directory or a .gguf file)", file=sys.stderr)
        return 2
    problems = cfg.problems()
    if args.figures is not None and not cfg.curve_every:
        problems.append("--figures needs --curves N")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        report, summary = run_replication(cfg, args.workdir, log=lambda m: out(m, flush=True), figures=args.figures)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    timings = summary["timings"]
    ran = sum(t["seconds"] for t in timings.values() if not t["skipped"])
    cpu = sum(t.get("cpu_seconds", 0.0) for t in timings.values() if not t["skipped"])
    total = sum(t["seconds"] for t in timings.values())
    out(f"\nstages: {len(timings)} ({sum(t['skipped'] for t in timings.values())} skipped: done earlier); this "
        f"invocation {time.monotonic() - started:.0f}s wall, stages run now {ran:.0f}s wall / {cpu:.0f} CPU-s; "
        f"all stages {total:.0f}s wall when run; details in {Path(args.workdir) / 'results.json'}\n")
    out(report, flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None, *, prog: str = "python -m megatron_tgdpo.replicate") -> int:
    return run(build_parser(prog=prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
