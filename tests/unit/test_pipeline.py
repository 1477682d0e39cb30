"""The replication pipeline's logic without training: resumable stages, prompt files and SFT data,
trainer flags, tables, and the command line's configuration (the end-to-end run: tests/e2e/test_replicate.py)."""
from __future__ import annotations

import json
import math
import random

import pytest

from megatron_tgdpo.pipeline.config import PipelineConfig, TrainSettings, preset
from megatron_tgdpo.pipeline.prompts import noisy_answer, read_prompts, write_prompt_files, write_sft_data
from megatron_tgdpo.pipeline.report import aggregate, format_alpha_table, format_main_table
from megatron_tgdpo.pipeline.stages import PipelineError, Stage, StageRunner, fingerprint
from megatron_tgdpo.pipeline.training import model_name, preference_flags, sft_flags
from megatron_tgdpo.tasks.prompts import is_heldout

# ------------------------------------------------------------------------------------------ stages


class Counter:
    def __init__(self):
        self.calls = []

    def stage(self, tmp_path, name, spec, *, fail=False, check=None):
        out = tmp_path / f"{name}.txt"

        def run():
            self.calls.append(name)
            if fail:
                raise ValueError("boom")
            out.write_text(json.dumps(spec))

        return Stage(name, spec, [out], run, check=check or (lambda: None))


def test_stage_runs_once_then_skips_until_its_spec_or_output_changes(tmp_path):
    log, counter = [], Counter()
    runner = StageRunner(tmp_path, log=log.append)
    first = runner.run(counter.stage(tmp_path, "a", {"x": 1}))
    assert first == fingerprint({"x": 1}) and counter.calls == ["a"]
    assert runner.run(counter.stage(tmp_path, "a", {"x": 1})) == first and counter.calls == ["a"]
    assert runner.timings["a"]["skipped"] and log[-1].startswith("[skip] a")
    runner.run(counter.stage(tmp_path, "a", {"x": 2}))  # a setting changed
    assert counter.calls == ["a", "a"] and any("settings or inputs changed" in line for line in log)
    (tmp_path / "a.txt").unlink()  # the output went missing
    runner.run(counter.stage(tmp_path, "a", {"x": 2}))
    assert counter.calls == ["a"] * 3
    broken = counter.stage(tmp_path, "a", {"x": 2}, check=lambda: "corrupt")  # its check fails: rerun, then refuse
    with pytest.raises(PipelineError, match="unusable: corrupt"):
        runner.run(broken)
    assert not runner.marker_path("a").exists()


def test_a_changed_upstream_stage_reruns_what_reads_it(tmp_path):
    counter = Counter()
    runner = StageRunner(tmp_path, log=lambda _m: None)

    def chain(setting):
        up = runner.run(counter.stage(tmp_path, "up", {"setting": setting}))
        runner.run(counter.stage(tmp_path, "down", {"up": up}))

    chain(1)
    chain(1)
    assert counter.calls == ["up", "down"]
    chain(2)
    assert counter.calls == ["up", "down", "up", "down"]


def test_failed_stage_leaves_no_marker_and_reruns(tmp_path):
    counter = Counter()
    runner = StageRunner(tmp_path, log=lambda _m: None)
    with pytest.raises(PipelineError, match="stage a failed: ValueError: boom"):
        runner.run(counter.stage(tmp_path, "a", {}, fail=True))
    assert runner.marker(None or "a") is None
    runner.run(counter.stage(tmp_path, "a", {}))
    assert counter.calls == ["a", "a"]


def test_run_together_runs_only_pending_stages_and_keeps_what_finished_before_a_failure(tmp_path):
    runner = StageRunner(tmp_path, log=lambda _m: None)
    stages = [Stage(n, {"n": n}, [tmp_path / f"{n}.txt"], lambda: None) for n in "abc"]
    batches = []

    def work(pending):
        batches.append([s.name for s in pending])
        for stage in pending:
            if stage.name == "c" and len(batches) == 1:
                raise RuntimeError("c crashed")
            stage.outputs[0].write_text("ok")

    with pytest.raises(PipelineError, match="c crashed"):
        runner.run_together(stages, work)
    assert runner.marker("a") and runner.marker("b") and runner.marker("c") is None
    runner.run_together(stages, work)
    assert batches == [["a", "b", "c"], ["c"]]
    assert set(runner.run_together(stages, work)) == {"a", "b", "c"} and len(batches) == 2


# ------------------------------------------------------------------------------------------ data


def test_prompt_files_are_disjoint_and_from_the_right_side_of_the_split(tmp_path):
    out = {name: tmp_path / f"{name}.jsonl" for name in ("sft", "pref", "heldout")}
    counts = write_prompt_files(task="addition", task_params={"num_digits": 2}, sft=60, pref=40, heldout=20, seed=3,
                                out=out)
    assert counts == {"sft": 60, "pref": 40, "heldout": 20}
    prompts = {name: {r["prompt"] for r in read_prompts(path)} for name, path in out.items()}
    assert not (prompts["sft"] & prompts["pref"]) and not (prompts["heldout"] & (prompts["sft"] | prompts["pref"]))
    assert all(is_heldout(p, task="addition", split_seed=0, heldout_fraction=0.1) for p in prompts["heldout"])
    assert not any(is_heldout(p, task="addition", split_seed=0, heldout_fraction=0.1) for p in prompts["sft"])


def test_sft_data_noise(tmp_path):
    out = {name: tmp_path / f"{name}.jsonl" for name in ("sft", "pref", "heldout")}
    write_prompt_files(task="sort", task_params={}, sft=200, pref=2, heldout=2, seed=1, out=out)
    clean = write_sft_data(out["sft"], tmp_path / "clean.jsonl", noise=0.0, seed=1)
    noisy = write_sft_data(out["sft"], tmp_path / "noisy.jsonl", noise=0.25, seed=1)
    assert clean == {"records": 200, "noisy": 0} and 30 <= noisy["noisy"] <= 70
    answers = {r["prompt"]: r["answer"] for r in read_prompts(out["sft"])}
    wrong = 0
    for record in read_prompts(tmp_path / "noisy.jsonl"):
        expected = answers[record["prompt"]].split()
        got = record["response"].split()
        assert len(got) == len(expected) and sum(a != b for a, b in zip(got, expected)) <= 1
        wrong += got != expected
    assert wrong == noisy["noisy"]
    rng = random.Random(0)
    assert all(noisy_answer(" 1 2 3", rng) != " 1 2 3" for _ in range(50))


# ------------------------------------------------------------------------------------------ flags


def _pairs(flags: list[str]) -> dict[str, str | None]:
    out, i = {}, 0
    while i < len(flags):
        takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        out[flags[i]] = flags[i + 1] if takes_value else None
        i += 2 if takes_value else 1
    return out


def test_trainer_flags_of_each_model(tmp_path):
    cfg = PipelineConfig(beta=0.2, simpo_beta=2.5, ipo_beta=0.4)
    sft = sft_flags(cfg, seed=3, data=tmp_path / "d", save=tmp_path / "s", log_dir=tmp_path / "l")
    assert sft[sft.index("--loss-type") + 1] == "sft" and "--ref-load" not in sft and sft[sft.index("--seed") + 1] == "3"

    def flags(method, **kw):
        out = preference_flags(cfg, method, seed=3, data=tmp_path / "p", sft=tmp_path / "sft", save=tmp_path / method,
                               log_dir=tmp_path / "l", **kw)
        return _pairs(out)

    dpo = flags("dpo")
    assert dpo["--ref-load"] == str(tmp_path / "sft") and dpo["--beta"] == "0.2" and "--guidance-load" not in dpo
    tg = flags("tgdpo", guidance=tmp_path / "dpo", alpha=2.0)
    assert tg["--guidance-load"] == str(tmp_path / "dpo") and tg["--alpha"] == "2.0" and tg["--beta"] == "0.2"
    assert flags("simpo")["--beta"] == "2.5" and flags("ipo")["--beta"] == "0.4"
    assert {k: v for k, v in dpo.items() if k not in ("--loss-type", "--save", "--beta")} == \
        {k: v for k, v in tg.items() if k not in ("--loss-type", "--save", "--beta", "--guidance-load", "--alpha")}
    with pytest.raises(ValueError):
        flags("tgdpo")
    assert model_name("tgdpo", 0.5) == "tgdpo-a0.5" and model_name("tgdpo", 2.0) == "tgdpo-a2"


def test_config_problems_and_presets():
    assert PipelineConfig().problems() == [] and preset("smoke").problems() == [] and preset("demo").problems() == []
    bad = PipelineConfig(methods=("tgdpo", "sft"), num_samples=1, seeds=(1, 1),
                         preference=TrainSettings(10, 1e-4, 1e-5, global_batch_size=30, micro_batch_size=4))
    text = "\n".join(bad.problems())
    for needle in ("tgdpo needs dpo", "num_samples must be >= 2", "seeds must be distinct", "not divisible"):
        assert needle in text
    assert PipelineConfig(alpha=1.0, alphas=(0.5, 1.0, 2.0)).tgdpo_alphas() == (1.0, 0.5, 2.0)


def test_replicate_flags_build_the_configuration():
    from megatron_tgdpo.replicate import build_parser, config_from_args

    args = build_parser().parse_args(["--seeds", "3", "--alphas", "0.5,1,2", "--pref-lr", "2e-4", "--task", "sort",
                                      "--methods", "sft,dpo,tgdpo"])
    cfg = config_from_args(args)
    assert cfg.seeds == (1, 2, 3) and cfg.alphas == (0.5, 1.0, 2.0) and cfg.task == "sort" and cfg.task_params == {}
    assert cfg.preference.lr == 2e-4 and cfg.preference.min_lr == pytest.approx(2e-5)
    assert cfg.methods == ("sft", "dpo", "tgdpo")
    assert config_from_args(build_parser().parse_args(["--seed-list", "7,9"])).seeds == (7, 9)
    # The full preset (the default) trains padded rows, as docs/results.md was measured; packed, it is the defaults.
    assert config_from_args(build_parser().parse_args(["--pack-sequences"])) == PipelineConfig()


# ------------------------------------------------------------------------------------------ tables


def test_tables_show_mean_and_spread_over_seeds():
    seeds = [{"sft": {"greedy_score": 0.5, "greedy_exact": 0.1}, "dpo": {"greedy_score": 0.6, "win_vs_dpo": 0.5},
              "tgdpo-a0.5": {"greedy_score": 0.7, "win_vs_dpo": 0.6}},
             {"sft": {"greedy_score": 0.7, "greedy_exact": 0.3}, "dpo": {"greedy_score": 0.6, "win_vs_dpo": 0.5},
              "tgdpo-a0.5": {"greedy_score": 0.5, "win_vs_dpo": 0.4}}]
    agg = aggregate(seeds)
    mean, spread, n = agg["sft"]["greedy_score"]
    assert (mean, n) == (pytest.approx(0.6), 2) and spread == pytest.approx(math.sqrt(0.02))
    table = format_main_table(agg, ["sft", "dpo", "tgdpo-a0.5"])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["model", "greedy", "score"] and len(lines) == 5
    assert lines[2].startswith("SFT") and "0.600 ± 0.141" in lines[2] and lines[4].startswith("TGDPO (alpha 0.5)")
    one = format_main_table(aggregate(seeds[:1]), ["sft"])
    assert "±" not in one and "0.500" in one
    alpha = format_alpha_table(agg, (0.5,)).splitlines()
    assert alpha[2].startswith("0 (= DPO)") and alpha[3].startswith("0.5")


def test_paired_differences_to_dpo():
    from megatron_tgdpo.pipeline.report import differences, format_difference_table

    seeds = [{"dpo": {"greedy_score": 0.8, "sampled_exact": 0.5}, "tgdpo-a1": {"greedy_score": 0.9, "sampled_exact": 0.4}},
             {"dpo": {"greedy_score": 0.6, "sampled_exact": 0.3}, "tgdpo-a1": {"greedy_score": 0.7, "sampled_exact": 0.4}}]
    diffs = aggregate(differences(seeds))
    assert diffs["tgdpo-a1"]["greedy_score"][:2] == (pytest.approx(0.1), pytest.approx(0.0, abs=1e-12))
    assert diffs["tgdpo-a1"]["sampled_exact"][0] == pytest.approx(0.0) and "dpo" not in diffs
    table = format_difference_table(diffs, ["tgdpo-a1"])
    assert table.splitlines()[2].startswith("TGDPO (alpha 1)") and "+0.100 ± 0.000" in table


def test_pretrained_base_makes_sft_optional():
    assert any("sft is needed" in p for p in preset("smollm2").problems())  # no base: SFT stays required
    assert preset("smollm2", base="/some/model").problems() == []
    assert any("sft_noise" in p for p in preset("smollm2", base="/m", methods=("sft", "dpo"), sft_noise=0.3).problems())


def test_task_params_and_data_seed_flags():
    from megatron_tgdpo.replicate import build_parser, config_from_args

    args = build_parser().parse_args(["--task", "reverse", "--task-params", "min_length=12,max_length=24",
                                      "--vary-data-seed"])
    cfg = config_from_args(args)
    assert cfg.task == "reverse" and cfg.task_params == {"min_length": 12, "max_length": 24} and cfg.vary_data_seed
    assert config_from_args(build_parser().parse_args([])).vary_data_seed is False
    for bad in ("min_length", "min_length=x", "1x=3"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--task-params", bad])
    # Parameters the task does not have, or values it refuses, are configuration problems, not tracebacks.
    unknown = PipelineConfig(task="sort", task_params={"num_digits": 3}).problems()
    assert any("no parameter 'num_digits'" in p for p in unknown)
    assert any("min_length" in p for p in PipelineConfig(task="sort", task_params={"min_length": 9,
                                                                                    "max_length": 4}).problems())


def test_each_seed_draws_its_own_data_when_asked(tmp_path):
    from megatron_tgdpo.pipeline.run import Replication

    cfg = preset("smoke", seeds=(1, 2), vary_data_seed=True)
    replication = Replication(cfg, tmp_path, log=lambda m: None)
    files = {}
    for seed in (1, 2):
        replication.shared_data(seed=seed)
        assert replication.data_dir == tmp_path.resolve() / f"seed{seed}" / "data"
        files[seed] = {name: path.read_text() for name, path in replication.prompt_files.items()}
    for name in ("sft", "pref", "heldout"):
        assert files[1][name] != files[2][name]
    # Data seed N is the shared data set of --data-seed N: the same prompts, byte for byte.
    shared = Replication(preset("smoke", data_seed=2), tmp_path / "shared", log=lambda m: None)
    shared.shared_data()
    assert {name: path.read_text() for name, path in shared.prompt_files.items()} == files[2]
    # Held-out prompts stay disjoint from the same seed's training prompts.
    heldout = {json.loads(line)["prompt"] for line in files[1]["heldout"].splitlines()}
    train = {json.loads(line)["prompt"] for name in ("sft", "pref") for line in files[1][name].splitlines()}
    assert heldout and not heldout & train
