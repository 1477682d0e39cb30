"""tools/bench_step.py and tools/gpu_check.py: flags, the variant and stage plans, the length
distribution, the synthesized data set (accepted by the runtime's data resolution) and the report
arithmetic (tests/e2e/test_bench_step_run.py runs the tool). The GPU check is only planned here: its
``--dry-run`` is the end-to-end rehearsal (docs/performance.md)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from suite import load_tool


# ---- gpu_check ------------------------------------------------------------------------------


def test_gpu_plan_covers_every_stage_and_fits_the_budget(monkeypatch, tmp_path):
    gc = load_tool("gpu_check")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    # A wheelhouse is never committed: a checkout holding one, as on a machine without network access.
    root = tmp_path / "checkout"
    (root / ".whl").mkdir(parents=True)
    (root / ".whl" / "megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    monkeypatch.setattr(gc, "ROOT", root)
    args = gc.parse_args([])
    assert args.out == str(tmp_path / "out") and args.budget_s == gc.GPU_BUDGET_S == 480
    assert not args.work_dir.startswith(args.out)  # the 1B guidance checkpoint must not come back from $OUT
    stages = {s.name: s for s in gc.plan_stages(args)}
    assert list(stages) == ["wheels", "versions", "pytest-gpu", "bench-logprobs", "bench-step", "estimate-memory",
                            "parity-cpu-ranks"]
    wheels = stages["wheels"]
    assert wheels.only_if_mcore_missing and "--no-index" in wheels.argv and "--no-deps" in wheels.argv
    assert wheels.argv[wheels.argv.index("--target") + 1] == "/tmp/site"
    assert any(a.startswith(".whl/megatron_core-0.19.2") for a in wheels.argv)
    assert stages["pytest-gpu"].argv[-1] == "tests/gpu" and not stages["pytest-gpu"].env
    head = stages["bench-logprobs"].argv
    assert "--head" in head and head[head.index("--vocab") + 1] == "128256"
    bench = stages["bench-step"].argv
    assert "torch.distributed.run" in bench and "tools/bench_step.py" in bench
    assert bench[bench.index("--model") + 1] == "llama3.2-1b" and bench[bench.index("--seq-length") + 1] == "4096"
    assert "--bf16" in bench and "--fp8-format" not in bench and "--compare" not in bench  # every comparison
    assert bench[bench.index("--output") + 1] == str(Path(args.out) / "bench_step.json")
    assert stages["parity-cpu-ranks"].env == {"CUDA_VISIBLE_DEVICES": ""}
    # Everything but the last stage (which gets what is left) fits the ~8 minutes with room to spare.
    assert sum(s.timeout_s for s in stages.values() if s.name != "parity-cpu-ranks") <= args.budget_s
    with_fp8 = {s.name: s for s in gc.plan_stages(args, fp8=True, xdist=True)}
    fp8 = with_fp8["bench-step"].argv
    assert fp8[fp8.index("--fp8-format") + 1] == "hybrid" and "--bf16" in fp8
    assert with_fp8["parity-cpu-ranks"].argv[-2:] == ["-n", "8"]


def test_dry_run_plan_runs_the_same_stages_small_on_cpu(monkeypatch):
    gc = load_tool("gpu_check")
    monkeypatch.delenv("OUT", raising=False)
    args = gc.parse_args(["--dry-run"])
    assert args.out.endswith("runs/gpu_check_dry") and args.budget_s == gc.DRY_BUDGET_S
    gpu = [s.name for s in gc.plan_stages(gc.parse_args([]))]
    stages = {s.name: s for s in gc.plan_stages(args)}
    assert list(stages) == gpu
    assert stages["pytest-gpu"].env == {gc.ON_CPU_ENV: "1"}  # tests/gpu's parity tests run on CPU then
    bench = stages["bench-step"].argv
    assert bench[bench.index("--model") + 1] == "tiny" and "--bf16" not in bench
    assert "--head" in stages["bench-logprobs"].argv


def test_plan_flag_prints_and_runs_nothing(capsys, tmp_path):
    gc = load_tool("gpu_check")
    assert gc.main(["--plan", "--out", str(tmp_path / "never")]) == 0
    assert "bench-step" in capsys.readouterr().out
    assert not (tmp_path / "never").exists()


# ---- bench_step: flags, variants, lengths ----------------------------------------------------


def test_flags_and_variants():
    bs = load_tool("bench_step")
    args, cfg = bs.parse(["--model", "tiny", "--pipeline-model-parallel-size", "2", "--steps", "2",
                          "--synthetic-model", "hidden_size=128,ffn_hidden_size=256", "--compare", "packing"])
    assert cfg.pipeline_model_parallel_size == 2 and args.steps == 2 and args.compare == ["packing"]
    assert args.synthetic_model == {"hidden_size": 128, "ffn_hidden_size": 256}
    with pytest.raises(SystemExit):
        bs.parse(["--synthetic-model", "width=3"])
    names = [v.name for v in bs.plan_variants(bs.COMPARISONS)]
    assert names == ["tgdpo online", "tgdpo online, padded", "tgdpo online, plain head",
                     "tgdpo online, shared prompt", "dpo online", "tgdpo cached", "simpo (policy only)"]
    assert [v.name for v in bs.plan_variants(["algorithms"], "dpo")] == [
        "dpo online", "tgdpo online", "tgdpo cached", "simpo (policy only)"]
    cached = bs.variant_config(cfg, bs.Variant("c", "tgdpo", cached=True), data_path="d", guidance="g", cache="x",
                               iterations=3)
    assert (cached.logprob_cache, cached.guidance_load, cached.train_iters, cached.pack_sequences) == ("x", "g", 3, True)
    simpo = bs.variant_config(cfg, bs.Variant("s", "simpo", packed=False, fused=False), data_path="d", guidance="g",
                              cache="x", iterations=3)
    assert simpo.logprob_cache is None and simpo.guidance_load is None and not simpo.fused_logprobs


def test_length_distribution_is_ultrafeedback_like():
    bs = load_tool("bench_step")
    lengths = bs.draw_lengths(20000, seed=3)
    prompt, chosen, rejected = lengths.T
    assert prompt.min() >= 50 and prompt.max() <= 600 and 130 <= np.median(prompt) <= 170
    for side in (chosen, rejected):
        assert side.min() >= 100 and side.max() <= 1200 and 380 <= np.median(side) <= 520
    assert np.median(chosen) > np.median(rejected) and (chosen != rejected).mean() > 0.95
    assert (prompt + np.maximum(chosen, rejected)).max() <= 1800
    small = bs.draw_lengths(100, scale=0.0625, seed=3)
    assert small.min() >= 1 and small.max() <= 75
    fitted, cut = bs.fit_lengths(np.array([[50, 40, 30], [5, 3, 2], [200, 10, 90]]), 64)
    assert cut == 2 and fitted.tolist() == [[24, 40, 30], [5, 3, 2], [1, 10, 63]]


def test_synthesized_set_is_a_prepared_set_the_runtime_accepts(tmp_path):
    from megatron_tgdpo.config import parse_args
    from megatron_tgdpo.data import PreferenceDataset
    from megatron_tgdpo.runtime import setup

    bs = load_tool("bench_step")
    summary = bs.synthesize(tmp_path / "pairs", num_pairs=12, scale=0.1, seq_length=192, seed=5,
                            tokenizer=str(bs.DEFAULT_TOKENIZER))
    assert summary["pairs"] == 12 and summary["pairs_cut_to_seq_length"] == 0
    data = setup.resolve_data(parse_args(["--data-path", str(tmp_path / "pairs"), "--train-iters", "1"]))
    dataset = PreferenceDataset(data.train_prefix, verify_sha256=True)
    assert len(dataset) == 12 and data.vocab_size == 38
    expected = bs.draw_lengths(12, scale=0.1, seed=5)
    assert dataset.lengths.tolist() == expected.tolist()
    item = dataset[3]
    assert all(len(item[k]) == n for k, n in zip(("prompt", "chosen", "rejected"), expected[3]))
    copied = bs.copy_pairs(tmp_path / "copy", str(tmp_path / "pairs"), num_pairs=15, seq_length=16, tokenizer=None)
    again = PreferenceDataset(tmp_path / "copy")
    assert len(again) == 15 and copied["pairs_cut_to_seq_length"] > 0
    assert (again.lengths[:, 0] + again.lengths[:, 1:].max(axis=1)).max() <= 16
    np.testing.assert_array_equal(again[14]["chosen"], dataset[2]["chosen"][: again.lengths[14, 1]])


def _rank(elapsed, computed, real, peak, growth, cuda=False):
    step = {"elapsed_s": elapsed, "cpu_s": elapsed, "computed_tokens": computed, "real_tokens": real,
            "micro_batches": 2, "longest_row": 64, "max_tokens_per_micro_batch": 128, "sequence_padding": 1,
            "row_padding": computed - real - 1, "updated": True, "loop_flops": 1e9, "useful_flops": 5e8}
    method = "torch.cuda.max_memory_allocated" if cuda else "VmHWM"
    return {"describe": "d", "arch_name": "a", "parameters": 1, "passes_per_token": 5.0, "world_size": 2, "te": False,
            "build_s": 1.0, "steps": [step], "losses": [0.69], "estimates": {"at_seq_length": {"bytes": 150},
                                                                           "at_longest_row": {"bytes": 120}},
            "memory": {"peak_bytes": peak, "step_growth_bytes": growth, "method": method}}


def test_merge_ratios_and_table():
    bs = load_tool("bench_step")
    # Two pipeline stages of one replica: tokens counted once, time and memory the worst rank's.
    merged = bs.merge_ranks([_rank(2.0, 1000, 800, 100, 10, cuda=True), _rank(3.0, 1000, 800, 200, 30, cuda=True)],
                            model_parallel=2, steps=1, peak=100.0)
    assert merged["step_time_s"] == 3.0 and merged["computed_per_real"] == 1.25 and merged["tokens_per_s"] == 1000 / 3
    assert merged["peak_memory_bytes"] == 200 and merged["step_growth_bytes"] == 30
    assert merged["estimate_error_pct"]["at_longest_row"] == pytest.approx(-40.0)
    assert merged["mfu"] == pytest.approx(1e9 / 3 / 1e12 / 2 / 100)
    variants = bs.plan_variants(bs.COMPARISONS)
    times = {"tgdpo online": 1.0, "tgdpo online, padded": 2.0, "tgdpo online, plain head": 1.1,
             "tgdpo online, shared prompt": 0.8, "dpo online": 0.8, "tgdpo cached": 0.7, "simpo (policy only)": 0.5}
    assert set(times) == {v.name for v in variants}
    results = {n: dict(merged, step_time_s=t, cpu_time_s=t) for n, t in times.items()}
    results["tgdpo online, padded"].update(computed_per_real=2.9, padding_fraction=0.655)
    results["tgdpo online, plain head"]["peak_memory_bytes"] = 400
    rt = bs.ratios(results, variants, cuda=True)
    assert rt["packing"]["step_time_packed_over_padded"] == 0.5
    assert rt["packing"]["computed_per_real_padded"] == 2.9
    assert rt["logprobs"]["memory_fused_over_plain"] == 0.5 and rt["logprobs"]["memory_measure"] == "peak_memory_bytes"
    assert rt["algorithms"]["step_time_over_tgdpo_online"]["policy_only"] == 0.5
    assert rt["sharing"]["step_time_shared_over_unshared"] == 0.8
    report = {"results": results, "variants": [dataclasses.asdict(v) for v in variants], "ratios": rt,
              "cache_build": {"seconds": 1.0, "pairs": 8, "roles": ["reference", "guidance"]},
              "data": {"pairs": 8, "source": "s", "scale": 1.0, "pairs_cut_to_seq_length": 0,
                       "stats": bs.length_stats(bs.draw_lengths(8))},
              "environment": {"device": "cuda:0", "model": "m", "parameters": 1e6, "layout": "TP 1", "device_name": "H200",
                              "te_layers": False, "torch": "t", "megatron_core": "0.19.2", "memory_method": "x"},
              "settings": {"steps": 1, "warmup": 1}}
    text = bs.format_report(report)
    assert "step time packed/padded 0.500x" in text and "est. err" in text and "MFU" in text


def test_padding_counts_a_shared_prompt_once_and_is_never_negative():
    """pad % of shared-prompt rows: positions holding no token over computed positions, a pair's prompt
    held once (plus its last token, which starts each response segment); unshared rows as before."""
    from megatron_tgdpo.data.packing import PackedPreferenceCollator

    bench = load_tool("bench_step")
    lengths = np.array([[5, 7, 3], [1, 4, 6], [9, 2, 2]], dtype=np.int64)
    items = [{k: np.arange(1, 1 + int(n), dtype=np.int32) for k, n in zip(("prompt", "chosen", "rejected"), row)}
             | {"index": i} for i, row in enumerate(lengths)]
    for share in (False, True):
        batch = PackedPreferenceCollator(pad_id=0, pad_to_multiple_of=64, share_prompt=share)(items)
        held = bench.held_tokens(batch, lengths, context_parallel_size=1)
        # unshared: every sequence's tokens; shared: the prompt once, its last token again per response
        assert held == sum(p + c + r + (min(p, 1) if share else p) for p, c, r in lengths)
        sequence_pad, row_pad = bench._padding_breakdown(batch, held)
        assert sequence_pad >= 0 and row_pad >= 0 and held + sequence_pad + row_pad == batch.num_tokens == 64
