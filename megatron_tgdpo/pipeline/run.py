"""The method end to end, as stages (``stages.py``); :class:`Replication` wires them.

Shared by all seeds (``<work>/data``): the prompt files (``prompts.py``) and the prepared SFT set.
Per seed (``<work>/seed<N>``):

    sft ─▶ samples (k per pref prompt, scored) ─▶ pairs (best vs worst, prepared)
        ├─▶ dpo ─▶ tgdpo-a<alpha> (guided by dpo; one per alpha)
        ├─▶ simpo, ipo
        └─▶ eval.<model> (greedy, and k samples, on the held-out prompts; scored)

With a pretrained ``base`` (``--model smollm2`` / ``--base PATH``) and no "sft" among the methods, the
base model takes the SFT model's place: it samples the pairs, is every preference model's reference
and starting point, and is scored as the "base" row; its tokenizer and own chat template (ChatML for
SmolLM2) render every prompt.

Training runs in child processes (``python -m megatron_tgdpo.train``, one rank or torchrun), sampling in
one worker process per batch of jobs (``sample.py``); the rest (prompts, scoring, pairs, preparation,
metrics, tables) runs here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_tgdpo.pipeline import launch
from megatron_tgdpo.pipeline.config import PipelineConfig
from megatron_tgdpo.pipeline.controls import CONTROL_METHODS, train_controls
from megatron_tgdpo.pipeline.evaluate import model_metrics, score_file, summary_of
from megatron_tgdpo.pipeline.prompts import write_prompt_files, write_sft_data
from megatron_tgdpo.pipeline.report import aggregate, format_alpha_table, format_comparison_table, format_main_table
from megatron_tgdpo.pipeline.stages import PipelineError, Stage, StageRunner, fingerprint, prepared_files, prepared_problem, scored_problem
from megatron_tgdpo.pipeline.training import model_name, preference_flags, sft_flags

__all__ = ["Replication", "run_replication"]

CHAT_TEMPLATE = "plain"  # the built-in tokenizer's template: prompt and response concatenated
BASE_CHAT_TEMPLATE = "auto"  # a pretrained model's own template, from its files
BASE = "base"  # the row and stage name of a pretrained starting model


def _tokenizer() -> Path:
    from megatron_tgdpo.data.builtin import SYNTHETIC_DIR

    return SYNTHETIC_DIR / "tokenizer.model"


def _checkpoint_problem(save: Path, iteration: int) -> Optional[str]:
    from megatron_tgdpo import checkpointing

    path = checkpointing.iteration_dir(save, iteration)
    if not path.is_dir():
        return f"{path}: missing"
    return checkpointing.problem(path)


class Replication:
    """One work directory, one configuration; ``run()`` returns the per-seed metrics and prints the tables."""

    def __init__(self, cfg: PipelineConfig, workdir: str | Path, *, log: Callable[[str], None] = print) -> None:
        problems = cfg.problems()
        if problems:
            raise ValueError("invalid pipeline configuration:\n  - " + "\n  - ".join(problems))
        self.cfg = cfg
        self.work = Path(workdir).resolve()
        self.log = log
        self.runner = StageRunner(self.work, log=log)
        self.data_dir = self.work / "data"
        self.fp: dict[str, str] = {}  # stage name -> fingerprint, for the stages that read it
        self.pair_stats: dict[int, dict[str, Any]] = {}  # seed -> build_pairs counts
        if cfg.base:
            # The path names the model: a different file at the same path is the user's to rerun.
            self.fp[BASE] = fingerprint({"base": str(Path(cfg.base).resolve())})

    @property
    def tokenizer(self) -> Path:
        return Path(self.cfg.base) if self.cfg.base else _tokenizer()

    @property
    def chat_template(self) -> str:
        return BASE_CHAT_TEMPLATE if self.cfg.base else CHAT_TEMPLATE

    @property
    def trains_sft(self) -> bool:
        return "sft" in self.cfg.methods

    def reference(self, seed: int) -> tuple[Path, str]:
        """The model that samples the pairs and starts (and anchors) every preference model, and the
        stage whose fingerprint stands for it: the seed's SFT model, or the pretrained base."""
        if self.trains_sft:
            return self.seed_dir(seed) / "sft", f"seed{seed}.sft"
        return Path(self.cfg.base), BASE

    def model_path(self, seed: int, model: str) -> Path:
        return Path(self.cfg.base) if model == BASE else self.seed_dir(seed) / model

    def model_stage(self, seed: int, model: str) -> str:
        return BASE if model == BASE else f"seed{seed}.{model}"

    # ---- helpers ---------------------------------------------------------------------------------
    def _rel(self, flags: list[str]) -> list[str]:
        """Flags as a spec: paths relative to the work directory, so a moved directory still resumes."""
        return [f.replace(str(self.work), "<work>") for f in flags]

    def _train_stages(self, stages: list[tuple[str, list[str], Path, Path, int, list[str]]]) -> None:
        """Training stages ``(name, flags, save, log_dir, iterations, inputs)``, in order; those not done
        run together in one worker process (``train_jobs.py``), each checked and marked on its own."""
        built, flags_of = [], {}
        for name, flags, save, log_dir, iters, inputs in stages:
            flags_of[name] = flags
            spec = {"flags": self._rel(flags), "inputs": {i: self.fp[i] for i in inputs}, "nproc": self.cfg.nproc}
            self.fp[name] = fingerprint(spec)  # known before the run: a later stage of the batch may read it
            built.append(Stage(name=name, spec=spec, outputs=[save, log_dir], run=lambda: None,
                               check=lambda save=save, iters=iters: _checkpoint_problem(save, iters)))

        def train(pending: list[Stage]) -> None:
            log = self.work / "logs" / f"{pending[0].name}{'+' if len(pending) > 1 else ''}.log"
            launch.train_jobs([flags_of[stage.name] for stage in pending], log=log, nproc=self.cfg.nproc,
                              threads=self.cfg.threads)

        self.runner.run_together(built, train)

    def _sample(self, jobs: list[dict[str, Any]], *, log_name: str) -> None:
        jobs_file = self.work / "logs" / f"{log_name}.jobs.json"
        jobs_file.parent.mkdir(parents=True, exist_ok=True)
        jobs_file.write_text(json.dumps(jobs, indent=1))
        launch.run_module("megatron_tgdpo.pipeline.sample", [str(jobs_file)], log=self.work / "logs" / f"{log_name}.log",
                          threads=self.cfg.threads)

    def _job(self, load: Path, prompts: Path, output: Path, *, temperature: float, num_samples: int,
             seed: int) -> dict[str, Any]:
        return {"load": str(load), "input": str(prompts), "output": str(output), "temperature": temperature,
                "num_samples": num_samples, "max_new_tokens": self.cfg.max_new_tokens, "seed": seed,
                "tokenizer": str(self.tokenizer), "chat_template": self.chat_template, "model": self.cfg.model}

    def _prepare(self, source: Path, prefix: Path, *, kind: str) -> dict[str, Any]:
        from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data

        # Task prompts are short; a cut arithmetic prompt would be a different question, so drop, never cut.
        return prepare_preference_data(PrepareConfig(
            inputs=(str(source),), output_prefix=str(prefix), tokenizer=str(self.tokenizer),
            chat_template=self.chat_template, max_seq_length=self.cfg.seq_length, truncation="drop",
            min_prompt_tokens=4, workers=1, kind=kind))

    # ---- shared data -----------------------------------------------------------------------------
    @property
    def prompt_files(self) -> dict[str, Path]:
        return {name: self.data_dir / f"{name}_prompts.jsonl" for name in ("sft", "pref", "heldout")}

    def shared_data(self, *, seed: Optional[int] = None) -> None:
        """The prompt files and the SFT set: once in ``<work>/data`` with ``cfg.data_seed``, or (``seed``
        given, ``cfg.vary_data_seed``) in ``<work>/seed<N>/data`` with data seed N. Later stages read them
        through ``self.data_dir`` and the ``data.*`` fingerprints, which then stand for the current seed's."""
        cfg = self.cfg
        prefix_name, data_seed = ("", cfg.data_seed) if seed is None else (f"seed{seed}.", seed)
        self.data_dir = self.work / "data" if seed is None else self.seed_dir(seed) / "data"
        files = self.prompt_files
        info: dict[str, Any] = {}
        stage = Stage(f"{prefix_name}data.prompts",
                      spec={"task": cfg.task, "params": cfg.task_params, "sft": cfg.sft_prompts, "pref": cfg.pref_prompts,
                            "heldout": cfg.heldout_prompts, "seed": data_seed},
                      outputs=list(files.values()), info=info,
                      run=lambda: info.update(write_prompt_files(
                          task=cfg.task, task_params=cfg.task_params, sft=cfg.sft_prompts, pref=cfg.pref_prompts,
                          heldout=cfg.heldout_prompts, seed=data_seed, out=files)))
        self.fp["data.prompts"] = self.runner.run(stage)
        if not self.trains_sft:
            return
        sft_jsonl, prefix = self.data_dir / "sft.jsonl", self.data_dir / "sft"
        info = {}

        def make_sft() -> None:
            info.update(write_sft_data(files["sft"], sft_jsonl, noise=cfg.sft_noise, seed=data_seed))
            self._prepare(sft_jsonl, prefix, kind="sft")

        spec = {"prompts": self.fp["data.prompts"], "noise": cfg.sft_noise, "seed": data_seed,
                "seq_length": cfg.seq_length}
        if cfg.base:  # added only with a base, so the tiny runs' specs are unchanged
            spec["base"] = self.fp[BASE]
        stage = Stage(f"{prefix_name}data.sft", spec=spec,
                      outputs=[sft_jsonl, *prepared_files(prefix)], run=make_sft, info=info,
                      check=lambda: prepared_problem(prefix))
        self.fp["data.sft"] = self.runner.run(stage)

    # ---- one seed --------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Trained models in table order (TGDPO: the main alpha, then the others)."""
        out = [] if self.trains_sft else [BASE]
        for method in self.cfg.methods:
            if method == "tgdpo":
                out += [model_name("tgdpo", a) for a in self.cfg.tgdpo_alphas()]
            else:
                out.append(method)
        return out

    def seed_dir(self, seed: int) -> Path:
        return self.work / f"seed{seed}"

    def run_seed(self, seed: int, *, curves: bool = False) -> dict[str, dict[str, Any]]:
        cfg, s = self.cfg, self.seed_dir(seed)
        tag = f"seed{seed}"
        if self.trains_sft:
            self._train_stages([(f"{tag}.sft", sft_flags(cfg, seed=seed, data=self.data_dir / "sft", save=s / "sft",
                                                         log_dir=s / "logs" / "sft"),
                                 s / "sft", s / "logs" / "sft", cfg.sft.iters,
                                 ["data.sft", *([BASE] if cfg.base else [])])])
        pairs = self._pairs(seed)
        every = cfg.curve_every if curves else 0
        reference, reference_stage = self.reference(seed)
        common = dict(seed=seed, data=pairs, sft=reference)
        inputs = [reference_stage, f"{tag}.pairs"]
        batch = []
        for model in self.models():
            if model in ("sft", BASE) or model in CONTROL_METHODS:
                continue
            method = "tgdpo" if model.startswith("tgdpo") else model
            alpha = float(model.removeprefix("tgdpo-a")) if method == "tgdpo" else None
            flags = preference_flags(cfg, method, **common, save=s / model, log_dir=s / "logs" / model,
                                     guidance=s / "dpo" if method == "tgdpo" else None, alpha=alpha,
                                     save_interval=every if model in ("dpo", self.main_tgdpo) else 0)
            batch.append((f"{tag}.{model}", flags, s / model, s / "logs" / model, cfg.preference.iters,
                          inputs + ([f"{tag}.dpo"] if method == "tgdpo" else [])))
        self._train_stages(batch)
        train_controls(self, seed, pairs=pairs)  # controls.py: they read the DPO and TGDPO runs
        self._evaluate(seed)
        results = self.metrics(seed)
        (s / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if every:
            self._curves(seed)
        return results

    @property
    def main_tgdpo(self) -> str:
        return model_name("tgdpo", self.cfg.alpha)

    def _pairs(self, seed: int) -> Path:
        cfg, s, tag = self.cfg, self.seed_dir(seed), f"seed{seed}"
        samples = s / "samples" / "pref.jsonl"
        info: dict[str, Any] = {}

        reference, reference_stage = self.reference(seed)

        def sample() -> None:
            self._sample([self._job(reference, self.prompt_files["pref"], samples, temperature=cfg.temperature,
                                    num_samples=cfg.num_samples, seed=seed)], log_name=f"{tag}.samples")
            info.update(score_file(samples))

        stage = Stage(f"{tag}.samples", spec={"sft": self.fp[reference_stage], "prompts": self.fp["data.prompts"],
                                              "k": cfg.num_samples, "temperature": cfg.temperature,
                                              "max_new_tokens": cfg.max_new_tokens, "seed": seed},
                      outputs=[samples], run=sample, info=info, check=lambda: scored_problem([samples]))
        self.fp[f"{tag}.samples"] = self.runner.run(stage)

        pairs_jsonl, prefix = s / "pairs.jsonl", s / "pairs"
        info = {}

        def build() -> None:
            from megatron_tgdpo.tasks.pairs import build_pairs
            from megatron_tgdpo.tasks.jsonl import write_jsonl_atomic
            from megatron_tgdpo.tasks.samples import load_sample_records

            pairs, stats = build_pairs(load_sample_records(samples, require_scores=True))
            info.update(stats.as_dict())
            if not pairs:
                raise PipelineError(f"no pairs from {samples}: every prompt's samples scored the same\n{stats.summary()}")
            write_jsonl_atomic(pairs_jsonl, pairs)
            self._prepare(pairs_jsonl, prefix, kind="preference")

        stage = Stage(f"{tag}.pairs", spec={"samples": self.fp[f"{tag}.samples"], "seq_length": cfg.seq_length},
                      outputs=[pairs_jsonl, *prepared_files(prefix)], run=build, info=info,
                      check=lambda: prepared_problem(prefix))
        self.fp[f"{tag}.pairs"] = self.runner.run(stage)
        self.pair_stats[seed] = info
        return prefix

    def _eval_files(self, seed: int, model: str) -> tuple[Path, Optional[Path]]:
        e = self.seed_dir(seed) / "eval"
        return e / f"{model}.greedy.jsonl", (e / f"{model}.sampled.jsonl" if self.cfg.eval_samples else None)

    def _evaluate(self, seed: int) -> None:
        cfg, s, tag = self.cfg, self.seed_dir(seed), f"seed{seed}"
        stages, jobs = [], {}
        for model in self.models():
            greedy, sampled = self._eval_files(seed, model)
            path = self.model_path(seed, model)
            jobs[f"{tag}.eval.{model}"] = [self._job(path, self.prompt_files["heldout"], greedy, temperature=0.0,
                                                     num_samples=1, seed=seed)]
            if sampled is not None:
                jobs[f"{tag}.eval.{model}"].append(self._job(path, self.prompt_files["heldout"], sampled,
                                                             temperature=cfg.temperature,
                                                             num_samples=cfg.eval_samples, seed=seed))
            stages.append(Stage(f"{tag}.eval.{model}",
                                spec={"model": self.fp[self.model_stage(seed, model)], "prompts": self.fp["data.prompts"],
                                      "k": cfg.eval_samples, "temperature": cfg.temperature,
                                      "max_new_tokens": cfg.max_new_tokens, "seed": seed},
                                outputs=[p for p in (greedy, sampled) if p is not None], run=lambda: None,
                                check=lambda g=greedy, k=sampled: scored_problem([p for p in (g, k) if p])))

        def sample(pending: list[Stage]) -> None:
            self._sample([job for stage in pending for job in jobs[stage.name]], log_name=f"{tag}.eval")
            for stage in pending:
                for path in stage.outputs:
                    score_file(path)

        self.fp.update(self.runner.run_together(stages, sample))

    def metrics(self, seed: int) -> dict[str, dict[str, Any]]:
        has_dpo = "dpo" in self.models()
        dpo_greedy, dpo_sampled = self._eval_files(seed, "dpo") if has_dpo else (None, None)
        out = {}
        for model in self.models():
            greedy, sampled = self._eval_files(seed, model)
            out[model] = model_metrics(greedy, sampled, dpo_greedy=dpo_greedy, dpo_sampled=dpo_sampled)
        return out

    # ---- curves (one seed) -----------------------------------------------------------------------
    def _curves(self, seed: int) -> None:
        from megatron_tgdpo import checkpointing

        s, tag = self.seed_dir(seed), f"seed{seed}"
        models = ["dpo", self.main_tgdpo]
        out = s / "curves"

        def run() -> None:
            jobs, files = [], {}
            for model in models:
                for iteration, path in checkpointing.iteration_dirs(s / model):
                    files[(model, iteration)] = out / model / f"iter_{iteration:07d}.jsonl"
                    jobs.append(self._job(path, self.prompt_files["heldout"], files[(model, iteration)],
                                          temperature=0.0, num_samples=1, seed=seed))
            self._sample(jobs, log_name=f"{tag}.curves")
            start = summary_of(self._eval_files(seed, "sft" if self.trains_sft else BASE)[0])
            for model in models:
                points = {0: start}
                for (name, iteration), path in files.items():
                    if name == model:
                        points[iteration] = score_file(path)
                _merge_metrics(s / "logs" / model / "metrics.jsonl", points, out / model / "metrics.jsonl")

        stage = Stage(f"{tag}.curves", spec={m: self.fp[f"{tag}.{m}"] for m in models}, outputs=[out], run=run)
        self.runner.run(stage)
        self.plot(seed, out / "curves.png")

    def plot(self, seed: int, output: Path) -> Path:
        """DPO vs TGDPO: training loss, reward margin, held-out greedy score (``megatron-tgdpo plot``, in a
        child process: matplotlib stays out of this one)."""
        curves = self.seed_dir(seed) / "curves"
        cmd = [sys.executable, "-m", "megatron_tgdpo", "plot", str(curves / "dpo" / "metrics.jsonl"),
               str(curves / self.main_tgdpo / "metrics.jsonl"), "--keys", "loss", "rewards/margin",
               "heldout/score", "heldout/exact_match", "--label", "DPO", "--label",
               f"TGDPO (alpha {self.cfg.alpha:g})", "--output", str(output), "--title",
               f"{self.cfg.task} {self.cfg.task_params}, seed {seed}: training loss, reward margin, held-out greedy score"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise PipelineError(f"plotting failed: {result.stderr.strip()}")
        return output

    # ---- everything ------------------------------------------------------------------------------
    def run(self) -> dict[int, dict[str, dict[str, Any]]]:
        if not self.cfg.vary_data_seed:
            self.shared_data()
        per_seed = {}
        for i, seed in enumerate(self.cfg.seeds):
            if self.cfg.vary_data_seed:
                self.shared_data(seed=seed)
            per_seed[seed] = self.run_seed(seed, curves=i == 0 and self.cfg.curve_every > 0)
        return per_seed

    def report(self, per_seed: dict[int, dict[str, dict[str, Any]]]) -> str:
        cfg = self.cfg
        agg = aggregate(list(per_seed.values()))
        main = [m for m in self.models() if not m.startswith("tgdpo-a") or m == self.main_tgdpo]
        seeds = ", ".join(map(str, per_seed))
        spread = " (mean ± sample SD over seeds)" if len(per_seed) > 1 else ""
        lines = [
            f"held-out: {cfg.heldout_prompts} {cfg.task} prompts {cfg.task_params}, greedy"
            + (f" and {cfg.eval_samples} samples at temperature {cfg.temperature:g}" if cfg.eval_samples else "")
            + f"; seeds {seeds}{spread}"
            + ("; each seed its own prompts and SFT data (data seed = seed)" if cfg.vary_data_seed else "")
            + f"; beta {cfg.beta:g} (DPO, TGDPO and its guidance reward)",
            format_main_table(agg, main),
        ]
        if "dpo" in self.models() and len(self.models()) > 1:
            reference = "SFT model" if self.trains_sft else "base model"
            lines += ["", f"paired difference to DPO (same seed: same {reference}, pairs and data order), over "
                      f"{len(per_seed)} seed(s); W/T/L: seeds where the model is above / equal to / below DPO",
                      format_comparison_table(list(per_seed.values()), [m for m in self.models() if m != "dpo"])]
        if cfg.alphas and "tgdpo" in cfg.methods:
            lines += ["", f"TGDPO alpha sensitivity (guidance: the DPO model of the same seed, beta {cfg.beta:g})",
                      format_alpha_table(agg, cfg.tgdpo_alphas())]
        return "\n".join(lines)

    def timings(self) -> dict[str, dict[str, Any]]:
        return self.runner.timings


def _merge_metrics(training: Path, heldout: dict[int, dict[str, Any]], output: Path) -> None:
    """Training metrics lines with ``heldout/score`` and ``heldout/exact_match`` lines at the scored
    iterations, in iteration order (``megatron-tgdpo plot`` merges consecutive lines of one iteration)."""
    rows = [json.loads(line) for line in training.read_text().splitlines() if line.strip()]
    extra = [{"iteration": it, "heldout/score": m["mean_score"], "heldout/exact_match": m["exact_match"]}
             for it, m in heldout.items()]
    merged = sorted(rows + extra, key=lambda r: (int(r["iteration"]), "heldout/score" in r))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r) + "\n" for r in merged))


def run_replication(cfg: PipelineConfig, workdir: str | Path, *, log: Callable[[str], None] = print,
                    figures: Optional[Path] = None) -> tuple[str, dict]:
    """Run (or resume) everything; returns the printed report and the per-seed metrics."""
    replication = Replication(cfg, workdir, log=log)
    per_seed = replication.run()
    report = replication.report(per_seed)
    summary = {"config": cfg.to_dict(), "per_seed": per_seed, "timings": replication.timings(),
               "pairs": replication.pair_stats}
    (replication.work / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (replication.work / "table.txt").write_text(report + "\n")
    if figures is not None and cfg.curve_every:
        figures.mkdir(parents=True, exist_ok=True)
        replication.plot(cfg.seeds[0], figures / f"curves_{cfg.task}_seed{cfg.seeds[0]}.png")
    return report, summary
