"""``python -m megatron_tgdpo.ppo.compare``: sparse-reward PPO vs RTO (dense DPO token reward + sparse) vs
DPO on a verifier task, held-out score against the number of sampled responses used, several seeds.

    python -m megatron_tgdpo.ppo.compare --output runs/rto_compare            # defaults: reverse, 3 seeds
    python -m megatron_tgdpo.ppo.compare --output runs/rto_compare --seeds 1 --ppo-iters 20   # a quick look

Stages (each one's outputs are kept; a rerun skips what is done, so an interrupted comparison continues):

1. prompt files (``megatron_tgdpo.tasks``): SFT prompts, RL prompts (train split), held-out prompts;
2. SFT (``python -m megatron_tgdpo.train --loss-type sft`` on prompt + answer), shared by every seed —
   deliberately short, so that the model has partial skill and room to improve;
3. per seed:

   * DPO: the SFT model samples ``--samples-per-prompt`` responses to the first ``max(--dpo-prompts)`` RL
     prompts (``tools/generate.py``), the verifier scores them, best-vs-worst pairs
     (``tools/build_pairs.py``) from the first *n* prompts train one DPO model per *n* in
     ``--dpo-prompts`` (budget: *n* x samples-per-prompt responses);
   * sparse PPO (``--reward sparse``) and RTO (``--reward dense-dpo+sparse`` with the DPO model of
     ``--reward-model-prompts`` prompts as the token reward), same prompt stream, same seed, same
     number of rollouts, held-out score every ``--eval-every`` iterations;
4. the report: a table of held-out score (mean and standard deviation over seeds) at matched sample
   budgets, written to ``<output>/table_rm<n>.md`` and ``results_rm<n>.json``, and the curve
   ``<output>/rto_curve_rm<n>.png`` (``n``: ``--reward-model-prompts``; rerunning with another ``n``
   reuses everything but the RTO runs, e.g. to ask whether a better reward model helps).

Sample accounting: a PPO point at *N* rollout samples has sampled *N* responses; a DPO point at *N* has
sampled *N* responses to build its pairs; RTO additionally used the samples of its DPO reward model,
reported separately (its curve is plotted against its own rollouts, and shifted by the reward model's
samples as a dotted line).

Every training job is a single-process subprocess (CPU or one GPU); logs are in ``<output>/logs``.
``python -m megatron_tgdpo.ppo.compare evaluate`` is the held-out scorer of checkpoints it uses itself.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from statistics import fmean, pstdev
from typing import Optional, Sequence

from megatron_tgdpo.pipeline.launch import run_logged
from megatron_tgdpo.pipeline.stages import PipelineError
from megatron_tgdpo.resources import resource_path

CHAT_TEMPLATE = "plain"  # the built-in tokenizer's


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_tgdpo.ppo.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/rto_compare", help="working and results directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--task", default="reverse", help="a verifier task of megatron_tgdpo.tasks")
    p.add_argument("--tokenizer", default=str(resource_path("synthetic", "tokenizer.model")))
    p.add_argument("--sft-prompts", type=int, default=2000)
    p.add_argument("--rl-prompts", type=int, default=2000)
    p.add_argument("--heldout-prompts", type=int, default=200)
    p.add_argument("--sft-iters", type=int, default=200, help="short on purpose: partial skill, room to improve")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="DPO sampling and PPO rollouts alike")
    p.add_argument("--dpo-prompts", type=int, nargs="+", default=[480, 960, 1920],
                   help="one DPO model per budget (prompts whose samples build its pairs)")
    p.add_argument("--reward-model-prompts", type=int, default=480, help="RTO's reward: the DPO model of this budget")
    p.add_argument("--dpo-epochs", type=float, default=2.0)
    p.add_argument("--ppo-iters", type=int, default=60)
    p.add_argument("--prompts-per-iter", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=5, help="PPO iterations between held-out evaluations")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--ppo-lr", type=float, default=1e-3)
    p.add_argument("--critic-lr", type=float, default=2e-3)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (and the dense reward's)")
    p.add_argument("--dense-reward-scale", type=float, default=0.5,
                   help="0.5 x beta 0.1 = the KL coefficient: without the sparse score the optimum is the DPO model")
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--image", default=None, help="also write the curve here (e.g. docs/img/rto_curve_rm480.png)")
    return p


# ----------------------------------------------------------------------------------------------
# running stages
# ----------------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _run(cmd: Sequence[str], *, log: Path, what: str) -> None:
    """One subprocess, its output to ``log`` (``pipeline.launch.run_logged``: raises PipelineError with
    the log's tail on failure)."""
    start = time.monotonic()
    run_logged(cmd, log=log, what=what)
    _say(f"{what}: done in {time.monotonic() - start:.0f}s")


def _done(directory: Path) -> bool:
    return (directory / "DONE").is_file()


def _mark(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


# ----------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------


def _prompts(args, out: Path) -> dict[str, Path]:
    from megatron_tgdpo.tasks import get_task, make_prompts, write_jsonl_atomic

    files = {"sft": out / "prompts" / "sft.jsonl", "rl": out / "prompts" / "rl.jsonl",
             "heldout": out / "prompts" / "heldout.jsonl"}
    if not all(f.is_file() for f in files.values()):
        task = get_task(args.task)
        write_jsonl_atomic(files["sft"], make_prompts(task, num=args.sft_prompts, seed=101, split="train"))
        write_jsonl_atomic(files["rl"], make_prompts(task, num=args.rl_prompts, seed=102, split="train"))
        write_jsonl_atomic(files["heldout"], make_prompts(task, num=args.heldout_prompts, seed=103, split="heldout"))
        _say(f"prompt files in {out / 'prompts'}")
    return files


def _prepare(args, inputs: Path, prefix: Path, *, fmt: str, log: Path, what: str) -> None:
    _run(_py("-m", "megatron_tgdpo", "prepare", "--input", str(inputs), "--output-prefix", str(prefix), "--format", fmt,
             "--tokenizer", args.tokenizer, "--chat-template", CHAT_TEMPLATE, "--max-seq-length", str(args.seq_length),
             "--min-prompt-tokens", "4", "--workers", "1", "--quiet"), log=log, what=what)


def _sft(args, out: Path, prompts: dict[str, Path]) -> Path:
    work = out / "sft"
    ckpt = work / "checkpoints"
    if _done(work):
        return ckpt
    records = [json.loads(line) for line in prompts["sft"].read_text().splitlines()]
    data = work / "sft.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["answer"]}) + "\n" for r in records))
    _prepare(args, data, work / "data", fmt="sft", log=out / "logs" / "sft_prepare.log", what="SFT data")
    _run(_py("-m", "megatron_tgdpo.train", "--loss-type", "sft", "--data-path", str(work / "data"), "--model", "tiny",
             "--micro-batch-size", "32", "--global-batch-size", "32", "--seq-length", str(args.seq_length),
             "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-fraction", "0.05", "--train-iters", str(args.sft_iters),
             "--seed", "1", "--log-interval", "50", "--eval-iters", "0", "--no-tensorboard", "--save", str(ckpt),
             "--log-dir", str(work / "log")), log=out / "logs" / "sft.log", what=f"SFT ({args.sft_iters} iterations)")
    _mark(work)
    return ckpt


def _dpo(args, out: Path, seed: int, sft: Path, prompts: dict[str, Path]) -> dict[int, Path]:
    """One DPO model per budget; returns {prompts: checkpoint}."""
    work = out / f"seed{seed}" / "dpo"
    logs = out / "logs" / f"seed{seed}"
    budgets = sorted(set(args.dpo_prompts) | {args.reward_model_prompts})
    models = {n: work / f"n{n}" / "checkpoints" for n in budgets}
    if all(_done(work / f"n{n}") for n in budgets):
        return models
    samples = work / "samples.jsonl"
    if not samples.is_file():
        subset = work / "prompts.jsonl"
        work.mkdir(parents=True, exist_ok=True)
        lines = prompts["rl"].read_text().splitlines()[:max(budgets)]
        subset.write_text("\n".join(lines) + "\n")
        raw = work / "samples.raw.jsonl"
        _run(_py("-m", "megatron_tgdpo", "generate", "--load", str(sft), "--input", str(subset), "--output", str(raw),
                 "--overwrite", "--num-samples", str(args.samples_per_prompt), "--temperature", "1.0",
                 "--max-new-tokens", str(args.max_new_tokens), "--micro-batch-size", "64", "--seed", str(seed)),
             log=logs / "dpo_sample.log", what=f"seed {seed}: SFT samples for DPO ({len(lines)} prompts)")
        _run(_py("-m", "megatron_tgdpo.tasks", "score", "--samples", str(raw), "--output", str(samples)),
             log=logs / "dpo_score.log", what=f"seed {seed}: verifier scores")
    all_samples = samples.read_text().splitlines()
    for n in budgets:
        if _done(work / f"n{n}"):
            continue
        d = work / f"n{n}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "samples.jsonl").write_text("\n".join(all_samples[:n]) + "\n")
        _run(_py("-m", "megatron_tgdpo", "pairs", "--input", str(d / "samples.jsonl"), "--output", str(d / "pairs.jsonl"),
                 "--stats-output", str(d / "pair_stats.jsonl")), log=logs / f"dpo{n}_pairs.log",
             what=f"seed {seed}: pairs from {n} prompts")
        _prepare(args, d / "pairs.jsonl", d / "data", fmt="preference", log=logs / f"dpo{n}_prepare.log",
                 what=f"seed {seed}: DPO data ({n} prompts)")
        _run(_py("-m", "megatron_tgdpo.train", "--loss-type", "dpo", "--data-path", str(d / "data"), "--ref-load",
                 str(sft), "--micro-batch-size", "16", "--global-batch-size", "16", "--seq-length",
                 str(args.seq_length), "--lr", "3e-4", "--min-lr", "3e-5", "--train-epochs", str(args.dpo_epochs),
                 "--beta", str(args.beta), "--seed", str(seed), "--log-interval", "10", "--eval-iters", "0",
                 "--no-tensorboard", "--save", str(d / "checkpoints"), "--log-dir", str(d / "log")),
             log=logs / f"dpo{n}.log", what=f"seed {seed}: DPO on pairs of {n} prompts ({n * args.samples_per_prompt} samples)")
        _mark(d)
    return models


def _ppo(args, out: Path, seed: int, sft: Path, prompts: dict[str, Path], *, name: str,
         reward_model: Optional[Path]) -> Path:
    work = out / f"seed{seed}" / name
    if _done(work):
        return work
    reward = ["--reward", "sparse"] if reward_model is None else [
        "--reward", "dense-dpo+sparse", "--reward-model-load", str(reward_model),
        "--dense-reward-scale", str(args.dense_reward_scale)]
    eval_iters = math.ceil(args.heldout_prompts / args.prompts_per_iter)
    log_dir = work / "log"
    if log_dir.exists():  # an interrupted run: start it again from scratch (its log would be appended to)
        import shutil

        shutil.rmtree(log_dir)
    _run(_py("-m", "megatron_tgdpo.ppo", "--prompts", str(prompts["rl"]), "--eval-prompts", str(prompts["heldout"]),
             *reward, "--ref-load", str(sft), "--data-path", str(out / "sft" / "data"), "--beta", str(args.beta),
             "--kl-coef", str(args.kl_coef), "--global-batch-size", str(args.prompts_per_iter),
             "--samples-per-prompt", str(args.samples_per_prompt), "--micro-batch-size",
             str(args.prompts_per_iter * args.samples_per_prompt // 4), "--ppo-mini-batches", "2",
             "--ppo-epochs", "2", "--seq-length", str(args.seq_length), "--max-new-tokens", str(args.max_new_tokens),
             "--train-iters", str(args.ppo_iters), "--lr", str(args.ppo_lr), "--lr-decay-style", "constant",
             "--critic-lr", str(args.critic_lr), "--eval-iters", str(eval_iters), "--eval-interval",
             str(args.eval_every), "--seed", str(seed), "--log-interval", str(args.eval_every), "--no-tensorboard",
             "--log-dir", str(log_dir)),
         log=out / "logs" / f"seed{seed}" / f"{name}.log",
         what=f"seed {seed}: {name} ({args.ppo_iters} iterations x {args.prompts_per_iter * args.samples_per_prompt} samples)")
    _mark(work)
    return work


def _evaluate_checkpoints(args, out: Path, checkpoints: dict[str, Path], *, result: Path, log: Path,
                          what: str) -> dict[str, dict]:
    if not result.is_file():
        _run(_py("-m", "megatron_tgdpo.ppo.compare", "evaluate", "--prompts", str(out / "prompts" / "heldout.jsonl"),
                 "--max-new-tokens", str(args.max_new_tokens), "--output", str(result),
                 *[f"{name}={path}" for name, path in checkpoints.items()]), log=log, what=what)
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _heldout(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "log" / "heldout.jsonl").read_text().splitlines() if line.strip()]
    return {r["rollout_samples"]: r for r in rows}


def _stats(values: list[float]) -> tuple[float, float]:
    return fmean(values), (pstdev(values) if len(values) > 1 else 0.0)


def report(args, out: Path, results: dict) -> str:
    seeds = sorted(results["seeds"])
    k = args.samples_per_prompt
    rm_samples = args.reward_model_prompts * k
    # matched budgets: every DPO budget that a PPO evaluation hits, plus 0 and the PPO total
    ppo_points = sorted(set.intersection(*[set(_heldout(Path(results["seeds"][s]["sparse_ppo"]))) for s in seeds]))
    budgets = sorted({0, ppo_points[-1]} | ({n * k for n in args.dpo_prompts} & set(ppo_points)))

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        mean, std = _stats(values)
        return f"{mean:.3f} ± {std:.3f}"

    lines = [(f"held-out {args.task} score (positional, greedy; mean ± std over seeds {', '.join(map(str, seeds))}; "
              f"{args.heldout_prompts} prompts) and exact match, against sampled responses used"),
             "",
             "| samples | SFT | DPO | sparse PPO | RTO (dense DPO + sparse) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for n in budgets:
        row = [str(n)]
        sft = [results["seeds"][s]["sft"]["score"] for s in seeds] if n == 0 else []
        row.append(cell(sft))
        dpo = [results["seeds"][s]["dpo"][str(n // k)]["score"] for s in seeds
               if n % k == 0 and str(n // k) in results["seeds"][s]["dpo"]]
        row.append(cell(dpo))
        for name in ("sparse_ppo", "rto"):
            vals = [_heldout(Path(results["seeds"][s][name])).get(n, {}).get("score") for s in seeds]
            row.append(cell([v for v in vals if v is not None]))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| final | exact match | score |", "| --- | ---: | ---: |"]
    final = ppo_points[-1]
    for label, getter in (
        ("SFT", lambda s: results["seeds"][s]["sft"]),
        (f"DPO ({max(args.dpo_prompts) * k} samples)", lambda s: results["seeds"][s]["dpo"][str(max(args.dpo_prompts))]),
        (f"sparse PPO ({final} samples)", lambda s: _heldout(Path(results["seeds"][s]["sparse_ppo"]))[final]),
        (f"RTO ({final} rollout + {rm_samples} reward-model samples)",
         lambda s: _heldout(Path(results["seeds"][s]["rto"]))[final]),
    ):
        rows = [getter(s) for s in seeds]
        lines.append(f"| {label} | {cell([r['exact_match'] for r in rows])} | {cell([r['score'] for r in rows])} |")
    # sample efficiency: the first evaluation at which RTO's mean reaches sparse PPO's final mean
    sparse_final = fmean(_heldout(Path(results["seeds"][s]["sparse_ppo"]))[final]["score"] for s in seeds)
    reached = None
    for n in ppo_points:
        if fmean(_heldout(Path(results["seeds"][s]["rto"]))[n]["score"] for s in seeds) >= sparse_final:
            reached = n
            break
    lines += ["", f"sparse PPO's final mean score {sparse_final:.3f} ({final} samples); RTO's mean first reaches it at "
              + (f"{reached} rollout samples ({reached + rm_samples} counting its reward model's)" if reached is not None
                 else "no evaluated point") + "."]
    return "\n".join(lines)


def plot(args, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seeds = sorted(results["seeds"])
    k = args.samples_per_prompt
    rm = args.reward_model_prompts * k
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, label, color in (("sparse_ppo", "sparse PPO", "tab:blue"), ("rto", "RTO (dense DPO + sparse)", "tab:red")):
        curves = [_heldout(Path(results["seeds"][s][name])) for s in seeds]
        xs = sorted(set.intersection(*[set(c) for c in curves]))
        ys = np.array([[c[x]["score"] for x in xs] for c in curves])
        mean, std = ys.mean(0), ys.std(0)
        ax.plot(xs, mean, color=color, label=f"{label} ({len(seeds)} seeds)")
        ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15)
        if name == "rto":
            ax.plot(np.array(xs) + rm, mean, color=color, linestyle=":",
                    label=f"RTO shifted by its reward model's {rm} samples")
    dpo_x = [n * k for n in sorted(args.dpo_prompts)]
    dpo = np.array([[results["seeds"][s]["dpo"][str(n)]["score"] for n in sorted(args.dpo_prompts)] for s in seeds])
    ax.errorbar(dpo_x, dpo.mean(0), yerr=dpo.std(0), color="tab:green", marker="o", capsize=3, label="DPO (on-policy pairs)")
    sft = fmean(results["seeds"][s]["sft"]["score"] for s in seeds)
    ax.axhline(sft, color="gray", linestyle="--", label="SFT")
    ax.set_xlabel("sampled responses used")
    ax.set_ylabel(f"held-out {args.task} score (greedy)")
    ax.set_title(f"{args.task}: held-out score vs samples (tiny Llama, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if args.reward_model_prompts not in args.dpo_prompts:
        args.dpo_prompts = sorted(set(args.dpo_prompts) | {args.reward_model_prompts})
    prompts = _prompts(args, out)
    sft = _sft(args, out, prompts)
    results: dict = {"settings": vars(args), "seeds": {}}
    for seed in args.seeds:
        seed_start = time.monotonic()
        dpo = _dpo(args, out, seed, sft, prompts)
        scores = _evaluate_checkpoints(args, out, {"sft": sft, **{str(n): path for n, path in dpo.items()}},
                                       result=out / f"seed{seed}" / "dpo" / "heldout.json",
                                       log=out / "logs" / f"seed{seed}" / "evaluate_dpo.log",
                                       what=f"seed {seed}: held-out scores of SFT and DPO models")
        sparse = _ppo(args, out, seed, sft, prompts, name="sparse_ppo", reward_model=None)
        rto = _ppo(args, out, seed, sft, prompts, name=f"rto_rm{args.reward_model_prompts}",
                   reward_model=dpo[args.reward_model_prompts])
        results["seeds"][seed] = {"sft": scores["sft"], "dpo": {k: v for k, v in scores.items() if k != "sft"},
                                  "sparse_ppo": str(sparse), "rto": str(rto)}
        _say(f"seed {seed}: finished in {(time.monotonic() - seed_start) / 60:.1f} min")
    table = report(args, out, results)
    tag = f"rm{args.reward_model_prompts}"  # one report per RTO reward model (the rest is shared)
    (out / f"table_{tag}.md").write_text(table + "\n")
    (out / f"results_{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(args, results, out / f"rto_curve_{tag}.png")
    if args.image:
        plot(args, results, Path(args.image))
    print(table, flush=True)
    _say(f"all done in {(time.monotonic() - start) / 60:.1f} min; {out / f'table_{tag}.md'}, "
         f"{out / f'rto_curve_{tag}.png'}")
    return 0


# ----------------------------------------------------------------------------------------------
# evaluate: greedy held-out scores of checkpoints, one process
# ----------------------------------------------------------------------------------------------


def evaluate(prompts_path: str, checkpoints: dict[str, str], *, max_new_tokens: int) -> dict[str, dict]:
    """{name: {"score", "exact_match", "response_length"}}; call inside an initialised process group."""
    from megatron_tgdpo.data.tokenizer import load_tokenizer
    from megatron_tgdpo.generation import SamplingConfig, generate, prompts, sources
    from megatron_tgdpo.models import llama
    from megatron_tgdpo.tasks import get_task

    out = {}
    for name, path in checkpoints.items():
        arch, _ = sources.model_arch(path, model="tiny")
        found = sources.default_tokenizer(path)
        tokenizer = load_tokenizer(found.path, chat_template=found.chat_template)
        records = prompts.read_prompt_file(prompts_path)
        ids = [prompts.encode_prompt(r.messages, tokenizer) for r in records]
        chunks = llama.build_model(arch, llama.transformer_config(arch, llama.ParallelLayout()))
        sources.load_weights(path, chunks)
        generated = generate(chunks, ids, sampling=SamplingConfig(temperature=0.0),
                             eos_ids=prompts.stop_token_ids(tokenizer), max_new_tokens=max_new_tokens, seed=0,
                             micro_batch_size=256, vocab_limit=tokenizer.vocab_size)
        scores, exact, lengths = [], [], []
        for g in generated:
            fields = records[g.prompt_index].fields
            text = tokenizer.decode(g.tokens[:-1] if g.finish_reason == "eos" else g.tokens)
            task = get_task(fields["task"])
            scores.append(task.score(text, fields["answer"]))
            exact.append(float(task.exact_match(text, fields["answer"])))
            lengths.append(len(g.tokens))
        out[name] = {"score": fmean(scores), "exact_match": fmean(exact), "response_length": fmean(lengths),
                     "checkpoint": str(path)}
        print(f"{name}: score {out[name]['score']:.4f} exact {out[name]['exact_match']:.4f}", flush=True)
    return out


def _evaluate_main(argv: Sequence[str]) -> int:
    from megatron_tgdpo import distributed
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    p = argparse.ArgumentParser(prog="python -m megatron_tgdpo.ppo.compare evaluate")
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("checkpoints", nargs="+", help="name=path")
    args = p.parse_args(argv)
    quiet_library_warnings()
    distributed.init_process_group(distributed.read_launch_env())
    try:
        distributed.init_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=0)
        named = dict(item.split("=", 1) for item in args.checkpoints)
        result = evaluate(args.prompts, named, max_new_tokens=args.max_new_tokens)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        distributed.destroy()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:
        return _evaluate_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
