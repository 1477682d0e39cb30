"""``python -m megatron_tgdpo.ppo.compare``: sparse-reward PPO vs RTO (dense DPO token reward + sparse) vs
DPO on a verifier task, held-out score against the number of sampled responses used, several seeds.

    python -m megatron_tgdpo.ppo.compare --output runs/rto_compare            # defaults: reverse, 3 seeds
    python -m megatron_tgdpo.ppo.compare --output runs/rto_compare --seeds 1 --ppo-iters 20   # a quick look

The comparison runs on the pipeline's fingerprinted stages (``pipeline/stages.py``): each stage runs
once per setting and is skipped while its outputs check out, so an interrupted comparison continues
and a changed setting reruns exactly what depends on it (markers in ``<output>/stages``). Stages:

1. ``prompts``: SFT prompts, RL prompts (train split), held-out prompts (``megatron_tgdpo.tasks``);
2. ``sft.data``, ``sft``: SFT on prompt + answer (``megatron_tgdpo.train --loss-type sft``), shared by
   every seed — deliberately short, so that the model has partial skill and room to improve;
3. per seed:

   * ``seed<N>.dpo.samples``: the SFT model samples ``--samples-per-prompt`` responses to the first
     ``max(--dpo-prompts)`` RL prompts (the pipeline's sampling worker, ``pipeline/sample.py``) and
     the verifier scores them; ``seed<N>.dpo.n<n>``: best-vs-worst pairs from the first *n* prompts
     train one DPO model per *n* in ``--dpo-prompts`` (budget: *n* x samples-per-prompt responses);
   * ``seed<N>.heldout``: greedy held-out scores of the SFT and DPO models (the same worker, scored by
     the pipeline's evaluator, ``pipeline/evaluate.py``);
   * ``seed<N>.sparse_ppo`` (``--reward sparse``) and ``seed<N>.rto_rm<n>`` (``--reward
     dense-dpo+sparse`` with the DPO model of ``--reward-model-prompts`` prompts as the token reward):
     same prompt stream, same seed, same number of rollouts, held-out score every ``--eval-every``
     iterations;
   * with ``--sparse-reward learned``: ``seed<N>.rm.n<n>``, a Bradley-Terry reward model trained on the
     very pairs of that DPO model, is the sequence reward of both PPO runs (``sparse_ppo_learned``,
     ``rto_rm<n>_learned``; normalised with its score statistics, clipped; their critics start from it),
     so both are charged the same preference samples; with ``--vary-sft`` each seed has its own SFT
     model (``seed<N>.sft``);
4. the report: a table of held-out score (mean and standard deviation over seeds) at matched sample
   budgets, written to ``<output>/table_rm<n>.md`` and ``results_rm<n>.json``, and the curve
   ``<output>/rto_curve_rm<n>.png`` (``n``: ``--reward-model-prompts``; rerunning with another ``n``
   reuses everything but the RTO runs, e.g. to ask whether a better reward model helps).

Sample accounting: a PPO point at *N* rollout samples has sampled *N* responses; a DPO point at *N* has
sampled *N* responses to build its pairs; RTO additionally used the samples of its DPO reward model,
reported separately (its curve is plotted against its own rollouts, and shifted by the reward model's
samples as a dotted line). With ``--sparse-reward learned`` sparse PPO used those same samples for its reward
model. Defaults follow RTO's official recipe (``--kl-coef 0.01``, ``--dense-reward-clip 0.05``,
``--ppo-loss-averaging sequence``; ``docs/rto.md``).

Every training and sampling job is a single-process subprocess (CPU or one GPU); logs are in
``<output>/logs``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from statistics import fmean
from typing import Any, Callable, Optional, Sequence

from megatron_tgdpo.pipeline.launch import run_logged
from megatron_tgdpo.pipeline.stages import PipelineError, Stage, StageRunner, prepared_files, prepared_problem, scored_problem

CHAT_TEMPLATE = "plain"  # the built-in tokenizer's
DPO_SAMPLING_BATCH = 64  # prompts per forward when sampling for DPO (x --samples-per-prompt rows)
HELDOUT_BATCH = 256  # rows per forward of the held-out (greedy) evaluation


def _builtin_tokenizer() -> str:
    from megatron_tgdpo.data.builtin import SYNTHETIC_DIR

    return str(SYNTHETIC_DIR / "tokenizer.model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_tgdpo.ppo.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/rto_compare", help="working and results directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--task", default="reverse", help="a verifier task of megatron_tgdpo.tasks")
    p.add_argument("--tokenizer", default=None, help="default: the built-in data set's")
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
    p.add_argument("--kl-coef", type=float, default=0.01, help="RTO's official value (docs/rto.md)")
    p.add_argument("--dense-reward-clip", type=float, default=0.05,
                   help="per-token clip of RTO's dense reward (RTO's official value; 0: off)")
    p.add_argument("--ppo-loss-averaging", choices=("token", "sequence"), default="sequence",
                   help="PPO's loss averaging (sequence: RTO's official code)")
    p.add_argument("--sparse-reward", choices=("verifier", "learned"), default="verifier",
                   help="learned: sparse PPO and RTO alike take their sequence score from a Bradley-Terry reward "
                        "model trained on the pairs of RTO's DPO reward model (--reward-model-prompts), so both "
                        "are charged the same preference data; verifier: the task's exact scorer")
    p.add_argument("--rm-epochs", type=float, default=8.0,
                   help="--sparse-reward learned: the reward model's epochs over its pairs (8 at --rm-lr 1e-3 reach "
                        "~0.76 pairwise accuracy on the 480-prompt pairs; 2 at 3e-4 stayed at chance, 0.52)")
    p.add_argument("--rm-lr", type=float, default=1e-3,
                   help="--sparse-reward learned: the reward model's peak learning rate (cosine to a tenth)")
    p.add_argument("--vary-sft", action="store_true",
                   help="one SFT model per seed (seeded by it) instead of one shared by every seed")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (and the dense reward's)")
    p.add_argument("--dense-reward-scale", type=float, default=0.5,
                   help="0.5 x beta 0.1 = the KL coefficient: without the sparse score the optimum is the DPO model")
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--image", default=None, help="also write the curve here (e.g. docs/img/rto_curve_rm480.png)")
    return p


# ----------------------------------------------------------------------------------------------
# child processes
# ----------------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {text}", flush=True)


def command(name: str, *args: str) -> list[str]:
    """The command line of one package command run as a process of its own: the one place that names
    them (``train``: the trainer; ``ppo``: PPO; ``sample``: the pipeline's sampling worker)."""
    if name == "sample":  # an internal worker, not a user command
        return [sys.executable, "-m", "megatron_tgdpo.pipeline.sample", *args]
    return [sys.executable, "-m", "megatron_tgdpo", name, *args]


def _run(cmd: Sequence[str], *, log: Path, what: str) -> None:
    """One subprocess, its output to ``log`` (``pipeline.launch.run_logged``: raises PipelineError with
    the log's tail on failure)."""
    start = time.monotonic()
    run_logged(cmd, log=log, what=what)
    _say(f"{what}: done in {time.monotonic() - start:.0f}s")


# ----------------------------------------------------------------------------------------------
# what the stages check
# ----------------------------------------------------------------------------------------------


def _checkpoint_problem(save: Path) -> Optional[str]:
    """Why ``save`` holds no complete checkpoint (its newest iteration), or None."""
    from megatron_tgdpo import checkpointing

    found = checkpointing.iteration_dirs(save)
    if not found:
        return f"{save}: no checkpoint"
    return checkpointing.problem(found[-1][1])


def _heldout_problem(run_dir: Path) -> Optional[str]:
    path = run_dir / "log" / "heldout.jsonl"
    return None if path.is_file() and path.read_text().strip() else f"{path}: no held-out results"


# ----------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------


class Comparison:
    """The stages of one output directory (see the module docstring); ``seed(n)`` returns that seed's
    entry of the results."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.runner = StageRunner(out, log=_say)
        self.fp: dict[str, str] = {}  # stage name -> fingerprint, for the stages that read it
        self.tokenizer = str(Path(args.tokenizer).resolve()) if args.tokenizer else _builtin_tokenizer()
        # Stages record the tokenizer by its files' bytes, not its path: a comparison resumes from any
        # checkout or install (the built-in tokenizer moves with the package), and an edited file reruns.
        from megatron_tgdpo.data.tokenizer import TokenizerError, tokenizer_content_hash

        try:
            self.tokenizer_hash = tokenizer_content_hash(self.tokenizer)
        except TokenizerError as exc:
            raise PipelineError(f"--tokenizer: {exc}") from None

    def _rel(self, values: Sequence[str]) -> list[str]:
        """Flags as a spec: paths relative to the output directory, so a moved directory still resumes."""
        return [str(v).replace(str(self.out), "<output>") for v in values]

    def _stage(self, name: str, spec: dict[str, Any], outputs: list[Path], run: Callable[[], None],
               check: Callable[[], Optional[str]] = lambda: None, *, inputs: Sequence[str] = ()) -> str:
        spec = {**spec, "inputs": {i: self.fp[i] for i in inputs}}
        self.fp[name] = self.runner.run(Stage(name, spec, outputs, run, check=check))
        return self.fp[name]

    def _prepare(self, inputs: Path, prefix: Path, *, fmt: str) -> None:
        """``prepare_data``'s tokenization of ``inputs`` (plain template, prompts of >= 4 tokens)."""
        from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data

        prepare_preference_data(PrepareConfig(
            inputs=(str(inputs),), output_prefix=str(prefix), tokenizer=self.tokenizer, chat_template=CHAT_TEMPLATE,
            max_seq_length=self.args.seq_length, min_prompt_tokens=4, workers=1, kind=fmt))

    def _sample(self, jobs: list[dict[str, Any]], *, log: Path, what: str) -> None:
        """Sampling jobs (``pipeline/sample.py``'s format) in one worker process."""
        spec = log.with_suffix(".jobs.json")
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps(jobs, indent=1))
        _run(command("sample", str(spec)), log=log, what=what)

    # ---- shared by every seed ----------------------------------------------------------------
    @property
    def prompt_files(self) -> dict[str, Path]:
        return {name: self.out / "prompts" / f"{name}.jsonl" for name in ("sft", "rl", "heldout")}

    def prompts(self) -> None:
        from megatron_tgdpo.tasks import get_task, make_prompts, write_jsonl_atomic

        args, files = self.args, self.prompt_files

        def write() -> None:
            task = get_task(args.task)
            write_jsonl_atomic(files["sft"], make_prompts(task, num=args.sft_prompts, seed=101, split="train"))
            write_jsonl_atomic(files["rl"], make_prompts(task, num=args.rl_prompts, seed=102, split="train"))
            write_jsonl_atomic(files["heldout"], make_prompts(task, num=args.heldout_prompts, seed=103,
                                                              split="heldout"))

        self._stage("prompts", {"task": args.task, "sft": args.sft_prompts, "rl": args.rl_prompts,
                                "heldout": args.heldout_prompts, "seeds": [101, 102, 103]},
                    list(files.values()), write)

    def sft_stage(self, seed: Optional[int]) -> str:
        """The SFT stage a seed's runs start from: one per seed with --vary-sft, else the shared one."""
        return f"seed{seed}.sft" if self.args.vary_sft and seed is not None else "sft"

    def sft(self, seed: Optional[int] = None) -> Path:
        args, work = self.args, self.out / "sft"
        data, prefix, ckpt = work / "sft.jsonl", work / "data", work / "checkpoints"
        stage = self.sft_stage(seed)
        sft_seed = 1 if stage == "sft" else seed
        if stage != "sft":
            ckpt = self.out / f"seed{seed}" / "sft" / "checkpoints"

        def prepare() -> None:
            records = [json.loads(line) for line in self.prompt_files["sft"].read_text().splitlines()]
            work.mkdir(parents=True, exist_ok=True)
            data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["answer"]}) + "\n"
                                    for r in records))
            self._prepare(data, prefix, fmt="sft")

        self._stage("sft.data", {"tokenizer": self.tokenizer_hash, "seq_length": args.seq_length},
                    [data, *prepared_files(prefix)], prepare, lambda: prepared_problem(prefix), inputs=["prompts"])
        flags = ["--loss-type", "sft", "--data-path", str(prefix), "--model", "tiny", "--micro-batch-size", "32",
                 "--global-batch-size", "32", "--seq-length", str(args.seq_length), "--lr", "3e-3", "--min-lr", "3e-4",
                 "--lr-warmup-fraction", "0.05", "--train-iters", str(args.sft_iters), "--seed", str(sft_seed),
                 "--log-interval", "50", "--eval-iters", "0", "--no-tensorboard", "--save", str(ckpt), "--log-dir",
                 str(ckpt.parent / "log")]
        self._stage(stage, {"flags": self._rel(flags)}, [ckpt, ckpt.parent / "log"],
                    lambda: _run(command("train", *flags), log=self.out / "logs" / f"{stage}.log",
                                 what=f"SFT ({args.sft_iters} iterations, seed {sft_seed})"),
                    lambda: _checkpoint_problem(ckpt), inputs=["sft.data"])
        return ckpt

    # ---- one seed ----------------------------------------------------------------------------
    def budgets(self) -> list[int]:
        return sorted(set(self.args.dpo_prompts) | {self.args.reward_model_prompts})

    def dpo(self, seed: int, sft: Path) -> dict[int, Path]:
        """One DPO model per budget; returns {prompts: checkpoint}."""
        args, tag = self.args, f"seed{seed}"
        work, logs = self.out / tag / "dpo", self.out / "logs" / tag
        budgets = self.budgets()
        subset, samples = work / "prompts.jsonl", work / "samples.jsonl"

        def sample() -> None:
            lines = self.prompt_files["rl"].read_text().splitlines()[:max(budgets)]
            work.mkdir(parents=True, exist_ok=True)
            subset.write_text("\n".join(lines) + "\n")
            self._sample([{"load": str(sft), "input": str(subset), "output": str(samples), "temperature": 1.0,
                           "num_samples": args.samples_per_prompt, "max_new_tokens": args.max_new_tokens,
                           "seed": seed, "micro_batch_size": DPO_SAMPLING_BATCH * args.samples_per_prompt}],
                         log=logs / "dpo_sample.log", what=f"seed {seed}: SFT samples for DPO ({len(lines)} prompts)")
            from megatron_tgdpo.pipeline.evaluate import score_file

            score_file(samples)

        self._stage(f"{tag}.dpo.samples", {"prompts": max(budgets), "k": args.samples_per_prompt,
                                           "max_new_tokens": args.max_new_tokens, "seed": seed},
                    [subset, samples], sample, lambda: scored_problem([samples]),
                    inputs=["prompts", self.sft_stage(seed)])
        models = {}
        for n in budgets:
            models[n] = self._dpo_model(seed, n, sft, samples)
        return models

    def _dpo_model(self, seed: int, n: int, sft: Path, samples: Path) -> Path:
        args, tag = self.args, f"seed{seed}"
        d, logs = self.out / tag / "dpo" / f"n{n}", self.out / "logs" / tag
        ckpt = d / "checkpoints"
        flags = ["--loss-type", "dpo", "--data-path", str(d / "data"), "--ref-load", str(sft), "--micro-batch-size",
                 "16", "--global-batch-size", "16", "--seq-length", str(args.seq_length), "--lr", "3e-4", "--min-lr",
                 "3e-5", "--train-epochs", str(args.dpo_epochs), "--beta", str(args.beta), "--seed", str(seed),
                 "--log-interval", "10", "--eval-iters", "0", "--no-tensorboard", "--save", str(ckpt), "--log-dir",
                 str(d / "log")]

        def run() -> None:
            from megatron_tgdpo.tasks.pairs import build_pairs
            from megatron_tgdpo.tasks.jsonl import write_jsonl_atomic
            from megatron_tgdpo.tasks.samples import load_sample_records

            d.mkdir(parents=True, exist_ok=True)
            (d / "samples.jsonl").write_text("\n".join(samples.read_text().splitlines()[:n]) + "\n")
            pairs, stats = build_pairs(load_sample_records(d / "samples.jsonl", require_scores=True))
            if not pairs:
                raise PipelineError(f"seed {seed}: no pairs from the samples of {n} prompts\n{stats.summary()}")
            write_jsonl_atomic(d / "pairs.jsonl", pairs)
            write_jsonl_atomic(d / "pair_stats.jsonl", [stats.as_dict()])
            _say(f"seed {seed}: {len(pairs)} pairs from {n} prompts")
            self._prepare(d / "pairs.jsonl", d / "data", fmt="preference")
            _run(command("train", *flags), log=logs / f"dpo{n}.log",
                 what=f"seed {seed}: DPO on pairs of {n} prompts ({n * args.samples_per_prompt} samples)")

        outputs = [d / "samples.jsonl", d / "pairs.jsonl", d / "pair_stats.jsonl", *prepared_files(d / "data"),
                   ckpt, d / "log"]
        self._stage(f"{tag}.dpo.n{n}", {"prompts": n, "tokenizer": self.tokenizer_hash, "flags": self._rel(flags)}, outputs,
                    run, lambda: _checkpoint_problem(ckpt), inputs=[self.sft_stage(seed), f"{tag}.dpo.samples"])
        return ckpt

    def reward_model(self, seed: int, sft: Path) -> tuple[Path, float, float]:
        """A Bradley-Terry reward model on the very pairs of the DPO model of --reward-model-prompts;
        returns (checkpoint, score mean, score std) (the statistics over those pairs, for normalising)."""
        args, tag, n = self.args, f"seed{seed}", self.args.reward_model_prompts
        pairs = self.out / tag / "dpo" / f"n{n}" / "data"
        d = self.out / tag / "rm" / f"n{n}"
        ckpt = d / "checkpoints"
        num_pairs = len((pairs.parent / "pairs.jsonl").read_text().splitlines())
        flags = ["--loss-type", "rm", "--data-path", str(pairs), "--eval-data-path", str(pairs), "--ref-load", str(sft),
                 "--micro-batch-size", "16", "--global-batch-size", "16", "--seq-length", str(args.seq_length),
                 "--lr", str(args.rm_lr), "--min-lr", str(args.rm_lr / 10), "--train-epochs", str(args.rm_epochs), "--seed",
                 str(seed), "--log-interval", "10", "--eval-iters", str(math.ceil(num_pairs / 16)), "--no-tensorboard", "--save", str(ckpt),
                 "--log-dir", str(d / "log")]

        def problem() -> Optional[str]:
            return _checkpoint_problem(ckpt) or _heldout_problem(d)

        self._stage(f"{tag}.rm.n{n}", {"flags": self._rel(flags)}, [ckpt, d / "log"],
                    lambda: _run(command("train", *flags), log=self.out / "logs" / tag / f"rm{n}.log",
                                 what=f"seed {seed}: reward model on the pairs of {n} prompts"),
                    problem, inputs=[self.sft_stage(seed), f"{tag}.dpo.n{n}"])
        rows = [json.loads(line) for line in (d / "log" / "heldout.jsonl").read_text().splitlines() if line.strip()]
        last = rows[-1]
        _say(f"seed {seed}: reward model pairwise accuracy {last['accuracy']:.3f} on its pairs, score mean "
             f"{last['score_mean']:+.3f} std {last['score_std']:.3f}")
        return ckpt, float(last["score_mean"]), max(float(last["score_std"]), 1e-6)

    def heldout(self, seed: int, checkpoints: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Greedy held-out scores of ``checkpoints`` (name -> checkpoint), from one sampling worker:
        {name: {"score", "exact_match", "response_length", "checkpoint"}}."""
        args, tag = self.args, f"seed{seed}"
        work = self.out / tag / "dpo"
        files = {name: work / "heldout" / f"{name}.jsonl" for name in checkpoints}
        result = work / "heldout.json"

        def run() -> None:
            from megatron_tgdpo.pipeline.evaluate import score_file
            from megatron_tgdpo.tasks.samples import load_sample_records

            self._sample([{"load": str(path), "input": str(self.prompt_files["heldout"]), "output": str(files[name]),
                           "temperature": 0.0, "num_samples": 1, "max_new_tokens": args.max_new_tokens, "seed": 0,
                           "micro_batch_size": HELDOUT_BATCH} for name, path in checkpoints.items()],
                         log=self.out / "logs" / tag / "evaluate_dpo.log",
                         what=f"seed {seed}: held-out scores of SFT and DPO models")
            scores = {}
            for name, path in checkpoints.items():
                summary = score_file(files[name])
                # Response length counts the stop token, as PPO's held-out evaluation does.
                lengths = [s["num_tokens"] + (s["finish_reason"] == "eos")
                           for item in load_sample_records(files[name]) for s in item.samples]
                scores[name] = {"score": summary["mean_score"], "exact_match": summary["exact_match"],
                                "response_length": fmean(lengths), "checkpoint": str(path)}
                _say(f"seed {seed}: {name}: score {scores[name]['score']:.4f} exact {scores[name]['exact_match']:.4f}")
            result.write_text(json.dumps(scores, indent=2) + "\n")

        models = {name: self.fp[self.sft_stage(seed) if name == "sft" else f"{tag}.dpo.n{name}"] for name in checkpoints}
        self._stage(f"{tag}.heldout", {"models": models, "max_new_tokens": args.max_new_tokens},
                    [work / "heldout", result], run, inputs=["prompts"])
        return json.loads(result.read_text())

    def ppo(self, seed: int, sft: Path, *, name: str, reward_model: Optional[int],
            learned: Optional[tuple[Path, float, float]] = None) -> Path:
        """A PPO run (``reward_model``: the budget of RTO's DPO reward model; None: sparse PPO; ``learned``:
        the Bradley-Terry reward model and its score statistics, the sparse reward of either)."""
        args, tag = self.args, f"seed{seed}"
        work = self.out / tag / name
        rm = None if reward_model is None else self.out / tag / "dpo" / f"n{reward_model}" / "checkpoints"
        reward = ["--reward", "sparse"] if rm is None else [
            "--reward", "dense-dpo+sparse", "--reward-model-load", str(rm),
            "--dense-reward-scale", str(args.dense_reward_scale), "--dense-reward-clip", str(args.dense_reward_clip)]
        if learned is not None:
            reward += ["--learned-reward-load", str(learned[0]), "--learned-reward-mean", repr(learned[1]),
                       "--learned-reward-std", repr(learned[2])]
        eval_iters = math.ceil(args.heldout_prompts / args.prompts_per_iter)
        flags = ["--prompts", str(self.prompt_files["rl"]), "--eval-prompts", str(self.prompt_files["heldout"]),
                 *reward, "--ref-load", str(sft), "--data-path", str(self.out / "sft" / "data"), "--beta",
                 str(args.beta), "--kl-coef", str(args.kl_coef), "--ppo-loss-averaging", args.ppo_loss_averaging,
                 "--global-batch-size", str(args.prompts_per_iter),
                 "--samples-per-prompt", str(args.samples_per_prompt), "--micro-batch-size",
                 str(args.prompts_per_iter * args.samples_per_prompt // 4), "--ppo-mini-batches", "2",
                 "--ppo-epochs", "2", "--seq-length", str(args.seq_length), "--max-new-tokens", str(args.max_new_tokens),
                 "--train-iters", str(args.ppo_iters), "--lr", str(args.ppo_lr), "--lr-decay-style", "constant",
                 "--critic-lr", str(args.critic_lr), "--eval-iters", str(eval_iters), "--eval-interval",
                 str(args.eval_every), "--seed", str(seed), "--log-interval", str(args.eval_every), "--no-tensorboard",
                 "--log-dir", str(work / "log")]
        inputs = ["prompts", self.sft_stage(seed), "sft.data"] + ([f"{tag}.dpo.n{reward_model}"] if rm is not None else [])
        if learned is not None:
            inputs.append(f"{tag}.rm.n{args.reward_model_prompts}")
        self._stage(f"{tag}.{name}", {"flags": self._rel(flags)}, [work / "log"],
                    lambda: _run(command("ppo", *flags), log=self.out / "logs" / tag / f"{name}.log",
                                 what=f"seed {seed}: {name} ({args.ppo_iters} iterations x "
                                      f"{args.prompts_per_iter * args.samples_per_prompt} samples)"),
                    lambda: _heldout_problem(work), inputs=inputs)
        return work

    def seed(self, seed: int, sft: Optional[Path]) -> dict[str, Any]:
        if self.args.vary_sft:
            sft = self.sft(seed)
        dpo = self.dpo(seed, sft)
        scores = self.heldout(seed, {"sft": sft, **{str(n): path for n, path in dpo.items()}})
        learned = self.reward_model(seed, sft) if self.args.sparse_reward == "learned" else None
        suffix = "_learned" if learned is not None else ""
        sparse = self.ppo(seed, sft, name=f"sparse_ppo{suffix}", reward_model=None, learned=learned)
        rto = self.ppo(seed, sft, name=f"rto_rm{self.args.reward_model_prompts}{suffix}",
                       reward_model=self.args.reward_model_prompts, learned=learned)
        out = {"sft": scores["sft"], "dpo": {k: v for k, v in scores.items() if k != "sft"},
               "sparse_ppo": str(sparse), "rto": str(rto)}
        if learned is not None:
            out["reward_model"] = {"checkpoint": str(learned[0]), "score_mean": learned[1], "score_std": learned[2]}
        return out


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _heldout(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "log" / "heldout.jsonl").read_text().splitlines() if line.strip()]
    return {r["rollout_samples"]: r for r in rows}


def _stats(values: list[float]) -> tuple[float, float]:
    from megatron_tgdpo.pipeline.statistics import sample_sd

    return fmean(values), (sample_sd(values) if len(values) > 1 else 0.0)


def _paired_lines(finals: dict[str, list[dict]], *, baseline: str, only: Optional[str] = None) -> list[str]:
    """Each method's (or ``only``'s) final score and exact match minus the baseline's, paired by seed
    (statistics.py)."""
    from megatron_tgdpo.pipeline.statistics import compare

    short = baseline.split(" (")[0]
    lines = ["", f"paired difference to {baseline}, by seed: mean [95% t interval] wins/ties/losses; * where the "
             "interval excludes 0 (significant)", "", f"| final - {short} | exact match | score |", "| --- | ---: | ---: |"]
    for label, rows in finals.items():
        if label == baseline or label == "SFT" or (only is not None and not label.startswith(only)):
            continue
        cells = [compare([r[key] - b[key] for r, b in zip(rows, finals[baseline])]).describe()
                 for key in ("exact_match", "score")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return lines


def report(args, out: Path, results: dict) -> str:
    seeds = sorted(results["seeds"])
    k = args.samples_per_prompt
    rm_samples = args.reward_model_prompts * k
    learned = args.sparse_reward == "learned"
    # matched budgets: every DPO budget that a PPO evaluation hits, plus 0 and the PPO total
    ppo_points = sorted(set.intersection(*[set(_heldout(Path(results["seeds"][s]["sparse_ppo"]))) for s in seeds]))
    budgets = sorted({0, ppo_points[-1]} | ({n * k for n in args.dpo_prompts} & set(ppo_points)))

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        mean, std = _stats(values)
        return f"{mean:.3f} ± {std:.3f}"

    reward = (f"both PPO runs rewarded by a Bradley-Terry reward model trained on the {rm_samples} samples' pairs "
              "(normalised, clipped), each charged those samples" if learned else "sparse reward: the exact verifier")
    lines = [(f"held-out {args.task} score (positional, greedy; mean ± sample SD over seeds {', '.join(map(str, seeds))}; "
              f"{args.heldout_prompts} prompts) and exact match, against sampled responses used; {reward}; "
              f"KL {args.kl_coef}, dense clip {args.dense_reward_clip or 'off'}, {args.ppo_loss_averaging}-averaged "
              f"losses" + ("; one SFT model per seed" if args.vary_sft else "")),
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
    finals: dict[str, list[dict]] = {}
    final = ppo_points[-1]
    for label, getter in (
        ("SFT", lambda s: results["seeds"][s]["sft"]),
        (f"DPO ({max(args.dpo_prompts) * k} samples)", lambda s: results["seeds"][s]["dpo"][str(max(args.dpo_prompts))]),
        (f"sparse PPO ({final} rollout" + (f" + {rm_samples} reward-model samples)" if learned else " samples)"),
         lambda s: _heldout(Path(results["seeds"][s]["sparse_ppo"]))[final]),
        (f"RTO ({final} rollout + {rm_samples} reward-model samples)",
         lambda s: _heldout(Path(results["seeds"][s]["rto"]))[final]),
    ):
        rows = [getter(s) for s in seeds]
        lines.append(f"| {label} | {cell([r['exact_match'] for r in rows])} | {cell([r['score'] for r in rows])} |")
        finals[label] = rows
    lines += _paired_lines(finals, baseline=next(name for name in finals if name.startswith("DPO")))
    lines += _paired_lines(finals, baseline=next(name for name in finals if name.startswith("sparse PPO")), only="RTO")
    # sample efficiency: the first evaluation at which RTO's mean reaches sparse PPO's final mean
    sparse_final = fmean(_heldout(Path(results["seeds"][s]["sparse_ppo"]))[final]["score"] for s in seeds)
    start = fmean(results["seeds"][s]["sft"]["score"] for s in seeds)  # where both PPO runs start
    reached = None
    for n in ppo_points:
        if n > 0 and fmean(_heldout(Path(results["seeds"][s]["rto"]))[n]["score"] for s in seeds) >= sparse_final:
            reached = n
            break
    if sparse_final <= start:  # sample efficiency means nothing when training lowered the score
        efficiency = (f"sparse PPO's final mean score {sparse_final:.3f} ({final} samples) is not above the start "
                      f"({start:.3f}): no sample-efficiency comparison.")
    else:
        efficiency = (f"sparse PPO's final mean score {sparse_final:.3f} ({final} samples); RTO's mean first reaches it "
                      "at " + (f"{reached} rollout samples ({reached + rm_samples} counting its reward model's)"
                               if reached is not None else "no evaluated point") + ".")
    lines += ["", efficiency + (f" Both runs are charged the same {rm_samples} preference samples." if learned else "")]
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
        mean, std = ys.mean(0), (ys.std(0, ddof=1) if len(seeds) > 1 else np.zeros_like(ys[0]))  # sample SD
        ax.plot(xs, mean, color=color, label=f"{label} ({len(seeds)} seeds)")
        ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15)
        if name == "rto":
            ax.plot(np.array(xs) + rm, mean, color=color, linestyle=":",
                    label=f"RTO shifted by its reward model's {rm} samples")
    dpo_x = [n * k for n in sorted(args.dpo_prompts)]
    dpo = np.array([[results["seeds"][s]["dpo"][str(n)]["score"] for n in sorted(args.dpo_prompts)] for s in seeds])
    ax.errorbar(dpo_x, dpo.mean(0), yerr=dpo.std(0, ddof=1) if len(dpo) > 1 else None, color="tab:green", marker="o", capsize=3, label="DPO (on-policy pairs)")
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
    comparison = Comparison(args, out)
    args.tokenizer = comparison.tokenizer  # recorded in the results' settings
    comparison.prompts()
    sft = comparison.sft() if not args.vary_sft else None  # else one per seed, in comparison.seed
    results: dict = {"settings": vars(args), "seeds": {}}
    for seed in args.seeds:
        seed_start = time.monotonic()
        results["seeds"][seed] = comparison.seed(seed, sft)
        _say(f"seed {seed}: finished in {(time.monotonic() - seed_start) / 60:.1f} min")
    table = report(args, out, results)
    tag = f"rm{args.reward_model_prompts}" + ("_learned" if args.sparse_reward == "learned" else "")
    # one report per RTO reward model and sparse reward (the rest is shared)
    (out / f"table_{tag}.md").write_text(table + "\n")
    (out / f"results_{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(args, results, out / f"rto_curve_{tag}.png")
    if args.image:
        plot(args, results, Path(args.image))
    print(table, flush=True)
    _say(f"all done in {(time.monotonic() - start) / 60:.1f} min; {out / f'table_{tag}.md'}, "
         f"{out / f'rto_curve_{tag}.png'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
