"""What the whole suite shares (imported by tests as ``suite``; ``tests/conftest.py`` applies the markers):
where the repository is, how a test loads a command from ``tools/``, how a test runs independent
commands side by side (``side_by_side``: the suite's budget is two cores, and a short command keeps one
busy), and the markers that let a contributor run it in parts.

Markers (registered in ``pytest.ini``), given here by directory so that no test file has to repeat them:

    multirank   tests/distributed/  functions on forked gloo ranks (``megatron_tgdpo.testing.run_on_ranks``)
    e2e         tests/e2e/          commands run as a user runs them, in child processes
    gpu         tests/gpu/          needs CUDA (skipped without it)
    slow        the tests in SLOW below: what ``pytest -m "not slow"`` leaves out

Two workers (``pytest -n 2``, pytest-xdist; the README's and CI's command): much of a test's time is one
process waiting, for a command to import torch and megatron-core or for one rank while another computes,
so one worker leaves the second core idle about 40 % of the time. ``tests/conftest.py`` hands the workers
whole work units (``work_unit``: a test file, so its module fixtures are computed once, or the files that
share a session fixture, ``SESSION_GROUPS``), the longest first (``FIRST``, then the units with a slow test),
so the run does not end on one long test with the other worker idle. A worker's own torch threads are its
share of the cores, and the ports its jobs take come from a block of its own
(``megatron_tgdpo.testing.free_port``). ``pytest tests/unit/test_x.py::case`` without ``-n`` starts no
worker; without pytest-xdist installed, ``-n`` is an unknown option: leave it out and the tests run one
at a time.

Helpers that start ranks or commands (``run_on_ranks``, ``run_train``, ``run_command``, ``torchrun``,
``read_metrics``) live in ``megatron_tgdpo.testing``: the benchmarks use them too.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Callable, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

DIRECTORY_MARKERS = {"distributed": "multirank", "e2e": "e2e", "gpu": "gpu"}

#: The longest tests, as node ids: a file, a test (all its cases) or one case. The figure after each is
#: its CPU seconds (the test process and every process it waited for; module fixtures counted in the
#: first test that uses them), measured one directory at a time with ``-p no:randomly``: on 2 idle cores
#: a test takes about as long as its CPU time (forked ranks share the two cores). The whole suite took
#: ~880 CPU s; ``pytest -m "not slow"`` took 114-119 CPU s, collection included, and 2 min 5 s of wall
#: time on 2 nearly idle cores (load ~1); it still runs every subsystem (README, Testing). A case whose module fixture is shared stays
#: fast when the fixture is: listing it would only move the fixture's cost to the next test.
SLOW: tuple[str, ...] = (
    # unit: the data-preparation CLI in worker processes
    "tests/unit/test_data_sft.py::test_cli_format_sft",  # 17.7
    "tests/unit/test_data_hostile.py::test_cli_error_mode_in_worker_processes_exits_1_without_traceback",  # 8.0
    "tests/unit/test_convert_roundtrip.py::test_cli_exits_non_zero_with_a_message",  # 3.2 (the other CLI test stays)
    "tests/unit/test_memory_local_layers.py::test_estimate_per_layer_matches_what_a_local_layer_saves",  # ~10 (2 ranks, loaded machine: 30)
    # distributed: the second and later layouts of one check (the first stays), kill-and-resume runs
    "tests/distributed/test_train_parallel.py::test_parallel_layout_matches_single_rank[cp2]",  # 8.9 (4 fixture)
    "tests/distributed/test_train_parallel.py::test_parallel_layout_matches_single_rank[tp2cp2]",  # 13.2
    "tests/distributed/test_train_parallel.py::test_parallel_layout_matches_single_rank[tp2pp2]",  # 8.1
    "tests/distributed/test_train_parallel.py::test_parallel_layout_matches_single_rank[tp2-sp]",  # 6.7
    "tests/distributed/test_train_parallel.py::test_parallel_layout_matches_single_rank[pp2-vpp2]",  # 2.7
    "tests/distributed/test_train_parallel.py::test_parallel_layout_matches_single_rank[pp2]",  # 2.6
    "tests/distributed/test_train_parallel.py::test_parallel_layout_matches_single_rank[tp2]",  # 3.9
    "tests/distributed/test_train_parallel.py::test_bf16_tracks_fp32",  # 9.1
    "tests/distributed/test_train_parallel.py::test_tgdpo_alpha_zero_is_dpo_step_for_step",  # 3.5
    "tests/distributed/test_fused_training.py",  # 45.6 (the fused head alone: test_fused_head.py)
    "tests/distributed/test_ppo.py::test_kill_and_resume_is_bit_identical",  # 13.8 + 12.8
    "tests/distributed/test_ppo.py::test_ppo_at_tp2_pp2_and_dp2_equals_one_rank[tp2-sp]",  # 10.8
    "tests/distributed/test_ppo.py::test_ppo_at_tp2_pp2_and_dp2_equals_one_rank[dp2-distopt]",  # 2.9
    "tests/distributed/test_ppo.py::test_ppo_at_tp2_pp2_and_dp2_equals_one_rank[pp2]",  # 2.3
    "tests/distributed/test_reward_model.py::test_reward_model_layouts_match_single_rank[pp2]",  # 6.6 (tp2 stays)
    "tests/distributed/test_reward_model.py::test_packed_sequences_match_padded_rows",  # one more 1-rank run
    "tests/distributed/test_ppo_learned_reward.py",  # ~12: a reward model saved, read and a PPO iteration
    "tests/distributed/test_reward_guidance.py::test_tgdpo_guided_by_a_reward_model_logs_the_hand_weights[pp2]",  # 18 loaded (tp2 stays)
    "tests/unit/test_reward_model_loss.py::test_loss_equals_trl_reward_trainer_loss",  # importing trl: 5-40 s
    "tests/distributed/test_packed_training.py::test_packed_run_killed_after_a_save_resumes_bit_identically",  # 11.4
    "tests/distributed/test_packed_training.py::test_packed_training_matches_unpacked[tp2cp2]",  # 10.6
    "tests/distributed/test_packed_training.py::test_packed_training_matches_unpacked[cp2]",  # 7.5 (4 fixture)
    "tests/distributed/test_packed_training.py::test_packed_training_matches_unpacked[tp2-sp]",  # 4.6
    "tests/distributed/test_packed_training.py::test_packed_training_matches_unpacked[pp2]",  # 2.4
    "tests/distributed/test_packed_training.py::test_packed_training_matches_unpacked[pp2-vpp2]",  # 2.2
    "tests/distributed/test_packed_training.py::test_packed_training_matches_unpacked[dp2-distopt]",  # 2.1
    "tests/distributed/test_shared_prompt.py::test_shared_prompt_equals_unshared_rows[pp2-vpp2]",  # 10.4
    "tests/distributed/test_shared_prompt.py::test_shared_prompt_equals_unshared_rows[tp2-sp]",  # 9.5
    "tests/distributed/test_shared_prompt.py::test_shared_prompt_equals_unshared_rows[cp2-tp2-sp]",  # ~16 (4 ranks)
    "tests/distributed/test_shared_prompt.py::test_shared_prompt_equals_unshared_rows[cp2]",  # ~10
    "tests/distributed/test_shared_prompt.py::test_a_rejected_response_seeing_its_chosen_one_is_caught[2]",  # ~10
    "tests/distributed/test_shared_prompt.py::test_training_with_shared_prompts_matches_unshared",  # ~16 (10.7 before its CP 2 run)
    "tests/distributed/test_resume.py",  # 35.4: SIGKILL and SIGTERM mid-run at 4 ranks
    "tests/distributed/test_rng_and_resume.py",  # 10.8
    # 8.7 (the pp2 case stays: a toy algorithm through the real loop, checkpointed and resumed)
    "tests/distributed/test_runtime_algorithm.py::test_toy_algorithm_trains_checkpoints_and_resumes_bit_identically[tp2]",
    "tests/distributed/test_ecosystem_roundtrip.py",  # 12.0: train, export, reload in transformers
    "tests/distributed/test_sft_parallel.py::test_sft_layouts_match_single_rank[tp2]",  # 5.6 (3 fixture)
    "tests/distributed/test_sft_parallel.py::test_sft_layouts_match_single_rank[cp2]",  # 4.2
    "tests/distributed/test_logprob_cache.py::test_context_data_pipeline_parallel_caches_close_to_single_rank",  # 3.9
    # frozen models in the policy's schedule: the cp2-packed case stays
    "tests/distributed/test_frozen_scoring.py::test_frozen_models_in_the_policy_schedule_equal_separate_passes[pp2-packed]",
    "tests/distributed/test_frozen_scoring.py::test_frozen_models_in_the_policy_schedule_equal_separate_passes[pp2-vpp2-rows]",
    "tests/distributed/test_frozen_scoring.py::test_frozen_models_in_the_policy_schedule_equal_separate_passes[tp2-sp-rows]",
    # 3.8
    "tests/distributed/test_logprob_cache.py::test_tensor_parallel_cache_bit_exact_online_and_close_to_single_rank",
    "tests/distributed/test_generation.py::test_greedy_equals_argmax_of_uncached_logits[tp2-sp]",  # 5.5 (layout run)
    "tests/distributed/test_generation.py::test_greedy_of_converted_hf_model_equals_transformers[tp2-sp]",
    "tests/distributed/test_generation.py::test_greedy_and_sampling_are_identical_across_layouts[tp2-sp]",
    "tests/distributed/test_generation.py::test_greedy_of_converted_hf_model_equals_transformers[pp2-vpp2]",  # 2.5
    "tests/distributed/test_generation.py::test_greedy_and_sampling_are_identical_across_layouts[pp2-vpp2]",
    "tests/distributed/test_convert_parity.py::test_logprobs_match_transformers[tp2]",  # 2.0 (layout run)
    "tests/distributed/test_convert_parity.py::test_logprobs_match_transformers[pp2]",  # 2.0 (layout run)
    "tests/distributed/test_convert_parity.py::test_torch_dist_checkpoint_exports_to_hf",  # (tp2 and pp2 runs)
    "tests/distributed/test_fused_head.py::test_fused_head_matches_plain_head[tp2-sp-bf16]",  # 2.1
    "tests/distributed/test_fused_head.py::test_fused_head_matches_plain_head[tp2-sp-tied]",  # 1.7
    "tests/distributed/test_gpt_parallel.py::test_tensor_parallel_matches_single_rank[4-False]",  # 2.5
    # e2e: multi-stage and multi-rank command-line runs
    "tests/e2e/test_cli.py::test_dpo_then_tgdpo_through_torchrun",  # 57.9
    "tests/e2e/test_quiet_console.py",  # 70.0 + 15.7
    "tests/e2e/test_generate_cli.py::test_samples_file_and_data_parallel_run_agree",  # 28.4
    "tests/e2e/test_bench_step_run.py",  # 7.4
    # reliability: training jobs signalled, killed, damaged and resumed (the disk-space and unwritable-metrics
    # checks, in-process and ~2 s each, stay)
    "tests/e2e/test_reliability.py::test_second_job_on_the_same_save_is_refused_naming_the_holder",  # 12.0
    "tests/e2e/test_reliability.py::test_sigkill_of_the_launcher_leaves_no_worker_or_helper",  # (shared run)
    "tests/e2e/test_reliability.py::test_sigterm_to_every_worker_group_saves_and_exits_for_requeue",  # 28.3
    "tests/e2e/test_reliability.py::test_load_of_one_iteration_directory_resumes_exactly_it",  # 31.8
    "tests/e2e/test_reliability.py::test_sigusr1_to_every_worker_group_stops_the_same_way",  # (shared run)
    "tests/e2e/test_reliability.py::test_damaged_newest_checkpoint_is_skipped_and_the_resume_is_bit_exact",  # 32.7
    "tests/e2e/test_reliability.py::test_every_checkpoint_damaged_is_refused_and_nothing_is_deleted",  # 9.4
    "tests/e2e/test_reliability.py::test_a_nan_step_is_skipped_and_changes_no_weight",  # 32.0
    # 29.1
    "tests/e2e/test_reliability.py::test_nan_on_every_step_stops_with_exit_1_and_no_checkpoint_after_the_last_good_step",
    "tests/e2e/test_reliability.py::test_load_on_a_file_is_refused",  # 8.5 + 8.7: two one-process jobs
    "tests/e2e/test_reliability.py::test_unwritable_save_and_log_dir_are_refused_before_any_compute",
    "tests/e2e/test_reliability.py::test_a_damaged_checkpoint_is_reported_once_per_run",  # 74: its own 2-rank run
    # checkpoint trust through the real command line (the in-process checks of the same files stay)
    "tests/e2e/test_checkpoint_trust.py::test_load_skips_a_checkpoint_with_a_payload_and_resumes_the_older_one",  # 8.2
    "tests/e2e/test_checkpoint_trust.py::test_ref_and_guidance_load_refuse_a_payload",  # 4 x 7-9
    "tests/e2e/test_checkpoint_trust.py::test_trust_checkpoint_loads_a_legitimate_checkpoint",  # 7.6
    "tests/e2e/test_checkpoint_trust.py::test_a_cache_of_another_run_is_a_flag_error_not_a_traceback",  # 8
    "tests/e2e/test_sampler_stop_ids.py",  # 12.9: a converted model, the pipeline worker and the command
    # the real model (SmolLM2-135M, tests/realmodel/): minutes each, also marked realmodel
    "tests/realmodel/test_smollm2_generate.py",
    "tests/realmodel/test_smollm2_source.py",
    "tests/realmodel/test_smollm2_training.py",
    "tests/realmodel/test_smollm2_pipeline.py",  # every pipeline stage on the real model, then its resume
    # the whole smoke pipeline, then its resume (64.6: the session fixture smoke_replication, tests/e2e/conftest.py)
    "tests/e2e/test_replicate.py",
    # the controls and cross-fitting, resumed from a copy of smoke_replication's work directory
    "tests/e2e/test_replicate_controls.py",
    "tests/e2e/test_replicate_credit.py",  # the credit preset at smoke sizes: one seed with its own data, then its resume
    "tests/e2e/test_sft_data_training.py",  # 34.8: prepare, train and refuse through the CLI
)


#: Work units for two workers (``pytest -n 2``, pytest-xdist; ``tests/conftest.py`` sets it up): a test file
#: runs whole on one worker, so its module fixtures are computed once, and the files that share a session
#: fixture run on one worker together, as the group named here (a directory's entry covers its files).
SESSION_GROUPS: dict[str, str] = {
    "tests/realmodel/": "realmodel",  # smollm2, hf_model, hf_tokenizer: tests/realmodel/conftest.py
    "tests/e2e/test_replicate.py": "smoke_replication",  # tests/e2e/conftest.py
    "tests/e2e/test_replicate_controls.py": "smoke_replication",
}

#: The longest work units (a file or a group above), longest first: the workers take these before any
#: other, then the other units with a slow test, then the rest, so that the suite ends on short tests
#: rather than on one worker running a long one alone. The figure after each is its seconds in a two-worker
#: run of the whole suite on a shared machine (load ~10, so about three times an idle machine's; all ten:
#: 73 % of the suite's 5808 test-seconds).
FIRST: tuple[str, ...] = (
    "realmodel",  # 918
    "tests/e2e/test_signal_windows.py",  # 870
    "tests/e2e/test_reliability.py",  # 681
    "smoke_replication",  # 438
    "tests/e2e/test_quiet_console.py",  # 269
    "tests/distributed/test_ppo.py",  # 236
    "tests/e2e/test_wheel_install.py",  # 225
    "tests/e2e/test_replicate_credit.py",  # 221
    "tests/e2e/test_cli.py",  # 212
    "tests/e2e/test_checkpoint_trust.py",  # 148
)


def work_unit(nodeid: str) -> str:
    """The work unit of test ``nodeid`` under ``pytest -n 2``: its session group or its file."""
    file = nodeid.split("::")[0]
    for prefix, group in SESSION_GROUPS.items():
        if file == prefix or (prefix.endswith("/") and file.startswith(prefix)):
            return group
    return file


def schedule_rank(unit: str, *, slow: bool) -> int:
    """Where work unit ``unit`` goes in the workers' queue (lower first): its place in FIRST, then the
    units with a slow test, then the rest (each kept in collection order by a stable sort)."""
    return FIRST.index(unit) if unit in FIRST else len(FIRST) + (0 if slow else 1)


def load_tool(name: str) -> ModuleType:
    """``tools/NAME.py`` imported as module ``NAME`` (once: later calls return the same module)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def side_by_side(*calls: Callable[[], T]) -> list[T]:
    """``calls`` in threads, as many at once as the machine has cores (two at least); their results in
    order (or the first exception raised). For independent child processes (``subprocess.run``): a short
    command spends most of its time importing torch and megatron-core on one core, so two of them take
    about the time of one on the suite's two cores."""
    with ThreadPoolExecutor(max_workers=min(len(calls), max(2, os.cpu_count() or 2))) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def slow_entry_matches(entry: str, nodeid: str) -> bool:
    """Whether the SLOW entry names test ``nodeid``: the same id, a test's case, or a file's test."""
    return nodeid == entry or nodeid.startswith(entry + ("[" if "::" in entry else "::"))
