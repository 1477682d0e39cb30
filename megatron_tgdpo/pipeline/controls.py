"""TGDPO's controls, cross-fitted and reward-model guidance as pipeline methods (``--methods ...,tgdpo-shuffled,...``).

Each is TGDPO at the main alpha, from the same SFT model, on the same pairs, schedule and seed; only the
token weights differ (``megatron_tgdpo.guidance``, ``docs/guidance.md``):

* ``tgdpo-shuffled``: TGDPO's own weights (guidance: the seed's DPO model) permuted within each response
  (``--token-weight shuffled``): the same weights per response, no token credit. If it matches TGDPO, the
  token-level assignment is not what helps.
* ``tgdpo-constant``: DPO with every rejected token weighted by one constant and chosen tokens by 1
  (``--token-weight constant-rejected``). The constant is TGDPO's mean rejected-token weight: the mean of
  ``weights/rejected_mean`` over the rows of the main TGDPO run's ``metrics.jsonl`` (each row the mean
  over the rejected response tokens of the steps it logs). TGDPO's weights depend only on the frozen
  guidance and reference models and the data, not on the policy, so this is the mean the run applied.
  If it matches TGDPO, the up-weighting of rejected responses alone explains TGDPO.
* ``tgdpo-crossfit``: the pairs are split in two halves by their position in the prepared set (A: even,
  B: odd); a DPO model is trained on each half (from the SFT model, the DPO schedule: as many steps as
  the full DPO run, so more epochs over half the data); every pair's token reward is
  ``beta * (log pi_other - log pi_sft)`` with ``pi_other`` the DPO model of the *other* half, scored once
  (``megatron_tgdpo.precompute``) and written as a score file; TGDPO then trains on all pairs with
  ``--guidance-source score-file``. The guidance never saw the pair it weights.
* ``tgdpo-rm``: a Bradley–Terry reward model (``--loss-type rm``: the SFT model with a value head) is
  trained on the seed's pairs with its own schedule (``reward_model``; the preference schedule when
  unset; stage ``rm``), and TGDPO is guided by its
  per-token value differences (``--guidance-source reward-model``, ``--guidance-scale`` 1: the reward
  model's units are those of DPO's implicit reward, so the main alpha means the same). It asks whether a
  learned sequence reward's token split guides as well as the DPO model's log-ratio does.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megatron_tgdpo.pipeline.control_methods import CONTROL_METHODS, LABELS, control_problems
from megatron_tgdpo.pipeline.stages import PipelineError, Stage, prepared_files, prepared_problem

__all__ = ["CONTROL_METHODS", "LABELS", "constant_rejected_weight", "control_problems", "crossfit_scores",
           "train_controls"]



def constant_rejected_weight(metrics: Path) -> float:
    """The mean of ``weights/rejected_mean`` over the rows of a TGDPO run's ``metrics.jsonl``."""
    values = [row["weights/rejected_mean"] for row in map(json.loads, metrics.read_text().splitlines())
              if "weights/rejected_mean" in row]
    if not values or not all(math.isfinite(v) for v in values):
        raise PipelineError(f"{metrics}: no finite weights/rejected_mean to match (was the run guided?)")
    return sum(values) / len(values)


def _without(flags: list[str], *names: str) -> list[str]:
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in names:
            skip = True
        else:
            out.append(flag)
    return out


def crossfit_scores(*, caches: dict[str, Path], halves: int, num_pairs: int, beta: float, output: Path) -> None:
    """Write the score file: pair ``i`` (half ``i % 2``) gets ``beta * (guide - ref)`` per token from the
    cache of the *other* half's guidance model (``caches``: half "A"/"B" -> log-prob cache directory)."""
    import numpy as np

    def load(path: Path) -> tuple[Any, Any, Any]:
        return tuple(np.load(path / f"{name}.npy", mmap_mode="r") for name in ("offsets", "reference", "guidance"))

    loaded = {half: load(path) for half, path in caches.items()}
    lines = []
    for index in range(num_pairs):
        other = "B" if index % halves == 0 else "A"
        offsets, ref, guide = loaded[other]
        sides = []
        for sequence in (2 * index, 2 * index + 1):
            lo, hi = int(offsets[sequence]), int(offsets[sequence + 1])
            sides.append([beta * (float(g) - float(r)) for g, r in zip(guide[lo:hi], ref[lo:hi])])
        lines.append(json.dumps({"index": index, "chosen": sides[0], "rejected": sides[1]}))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(output)


def train_controls(rep: Any, seed: int, *, pairs: Path) -> None:
    """Train this seed's control and cross-fitted models (``rep``: the ``run.Replication``); the main
    TGDPO and DPO runs are done."""
    from megatron_tgdpo.pipeline import launch
    from megatron_tgdpo.pipeline.training import preference_flags, reward_model_flags

    cfg, s, tag = rep.cfg, rep.seed_dir(seed), f"seed{seed}"
    wanted = [m for m in CONTROL_METHODS if m in cfg.methods]
    if not wanted:
        return
    main = rep.main_tgdpo
    reference, reference_stage = rep.reference(seed)
    inputs = [reference_stage, f"{tag}.pairs"]

    def tgdpo(model: str, *extra: str, data: Path = pairs, guidance: Path = s / "dpo") -> list[str]:
        return preference_flags(cfg, "tgdpo", seed=seed, data=data, sft=reference, save=s / model,
                                log_dir=s / "logs" / model, guidance=guidance, alpha=cfg.alpha) + list(extra)

    first = []
    if "tgdpo-shuffled" in wanted:
        first.append(("tgdpo-shuffled", tgdpo("tgdpo-shuffled", "--token-weight", "shuffled"), [f"{tag}.dpo"]))
    if "tgdpo-constant" in wanted:
        weight = constant_rejected_weight(s / "logs" / main / "metrics.jsonl")
        flags = _without(tgdpo("tgdpo-constant"), "--guidance-load") + [
            "--token-weight", "constant-rejected", "--rejected-weight", repr(weight)]
        first.append(("tgdpo-constant", flags, [f"{tag}.{main}"]))
    if "tgdpo-crossfit" in wanted:
        halves = _halves(rep, seed, pairs=pairs)
        for half, prefix in halves.items():
            model = f"crossfit-dpo-{half}"
            first.append((model, preference_flags(cfg, "dpo", seed=seed, data=prefix, sft=reference, save=s / model,
                                                  log_dir=s / "logs" / model), [f"{tag}.crossfit.halves"]))
    if "tgdpo-rm" in wanted:
        first.append(("rm", reward_model_flags(cfg, seed=seed, data=pairs, sft=reference, save=s / "rm",
                                               log_dir=s / "logs" / "rm"), []))
    iters = {"rm": cfg.reward_model_settings.iters}
    rep._train_stages([(f"{tag}.{model}", flags, s / model, s / "logs" / model, iters.get(model, cfg.preference.iters),
                        inputs + extra) for model, flags, extra in first])
    second = []
    if "tgdpo-crossfit" in wanted:
        scores = _crossfit_score_file(rep, seed, pairs=pairs, launch=launch)
        flags = _without(tgdpo("tgdpo-crossfit"), "--guidance-load") + [
            "--guidance-source", "score-file", "--guidance-scores", str(scores)]
        second.append(("tgdpo-crossfit", flags, [f"{tag}.crossfit.scores"]))
    if "tgdpo-rm" in wanted:
        flags = _without(tgdpo("tgdpo-rm"), "--guidance-load") + [
            "--guidance-source", "reward-model", "--guidance-load", str(s / "rm")]
        second.append(("tgdpo-rm", flags, [f"{tag}.rm"]))
    if second:
        rep._train_stages([(f"{tag}.{model}", flags, s / model, s / "logs" / model, cfg.preference.iters,
                            inputs + extra) for model, flags, extra in second])


def _halves(rep: Any, seed: int, *, pairs: Path) -> dict[str, Path]:
    s, tag = rep.seed_dir(seed), f"seed{seed}"
    out = {half: s / "crossfit" / f"pairs-{half}" for half in "AB"}
    source = s / "pairs.jsonl"

    def split() -> None:
        from megatron_tgdpo.data import read_manifest

        lines = [line for line in source.read_text().splitlines() if line.strip()]
        kept = read_manifest(str(pairs))["num_pairs"]
        if kept != len(lines):  # the halves are by prepared index = line number only when none was dropped
            raise PipelineError(f"cross-fitting: {pairs} holds {kept} of the {len(lines)} pairs of {source}; it "
                                "needs every pair kept (raise the sequence length)")
        for i, half in enumerate("AB"):
            jsonl = out[half].with_suffix(".jsonl")
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            jsonl.write_text("".join(line + "\n" for line in lines[i::2]))
            rep._prepare(jsonl, out[half], kind="preference")

    stage = Stage(f"{tag}.crossfit.halves", spec={"pairs": rep.fp[f"{tag}.pairs"]},
                  outputs=[p for half in out.values() for p in (half.with_suffix(".jsonl"), *prepared_files(half))],
                  run=split, check=lambda: next(filter(None, (prepared_problem(p) for p in out.values())), None))
    rep.fp[stage.name] = rep.runner.run(stage)
    return out


def _crossfit_score_file(rep: Any, seed: int, *, pairs: Path, launch: Any) -> Path:
    cfg, s, tag = rep.cfg, rep.seed_dir(seed), f"seed{seed}"
    reference, reference_stage = rep.reference(seed)
    work = s / "crossfit"
    output = work / "scores.jsonl"
    caches = {half: work / f"cache-{half}" for half in "AB"}

    def run() -> None:
        from megatron_tgdpo.data import read_manifest

        for half, cache in caches.items():
            model = ["--load", cfg.base] if cfg.base else ["--model", cfg.model]
            flags = [*model, "--seq-length", str(cfg.seq_length), "--data-path", str(pairs),
                     "--micro-batch-size", str(cfg.preference.micro_batch_size), "--seed", str(seed),
                     "--ref-load", str(reference), "--guidance-load", str(s / f"crossfit-dpo-{half}"),
                     "--output", str(cache), "--overwrite", "--no-tensorboard"]
            if cfg.pad_to_multiple_of != 16:
                flags += ["--pad-to-multiple-of", str(cfg.pad_to_multiple_of)]
            launch.run_module("megatron_tgdpo.precompute", flags, log=rep.work / "logs" / f"{tag}.crossfit.{half}.log",
                              threads=cfg.threads)
        crossfit_scores(caches=caches, halves=2, num_pairs=int(read_manifest(str(pairs))["num_pairs"]), beta=cfg.beta,
                        output=output)

    stage = Stage(f"{tag}.crossfit.scores",
                  spec={"dpo-A": rep.fp[f"{tag}.crossfit-dpo-A"], "dpo-B": rep.fp[f"{tag}.crossfit-dpo-B"],
                        "pairs": rep.fp[f"{tag}.pairs"], "sft": rep.fp[reference_stage], "beta": cfg.beta},
                  outputs=[output, *caches.values()], run=run)
    rep.fp[stage.name] = rep.runner.run(stage)
    return output



