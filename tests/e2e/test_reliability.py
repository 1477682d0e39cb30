"""Reliability through the real command line: preemption, launcher death, the save lock, damaged
checkpoints, non-finite steps, unusable paths and full disks.

Jobs are ``python -m torch.distributed.run --nproc-per-node 2 -m megatron_tgdpo.train`` (gloo, the tiny
model, the built-in data), or ``python -m megatron_tgdpo.train`` alone where one process shows the
property (a configuration refused at start). Each starts in its own session, and torchrun puts every
worker in a session of its own; so :class:`Job` marks its processes with an environment variable that
every descendant inherits and, when the test is done with the job, pass or fail, kills every process
carrying it (the checkpoint writer's helpers included, even once orphaned).

One chain of jobs on one ``--save`` directory shows most of the properties, because every run costs
~10 s of start-up on two cores:

1. ``reference``: an uninterrupted run (``inverse-square-root`` LR: the schedule, like the data order,
   does not depend on ``--train-iters``, so a long run is the reference for any shorter one). While it
   trains, a second job on its ``--save`` is refused; then its launcher is SIGKILLed while the workers
   write a checkpoint.
2. ``sigterm``: a new job on that ``--save`` (the stale lock is taken over), SIGTERM to every worker's
   process group -> exit 75 on each worker, ``REQUEUE``, a published checkpoint.
3. ``sigusr1``: ``--load <save>/iter_0000002`` while newer ones exist resumes exactly that one;
   SIGUSR1 to every worker's process group stops it the same way.
4. ``resumed``: random bytes inside a ``.distcp`` file of the newest checkpoint: it is skipped with the
   reason, the previous one is loaded, and the run to the end matches the reference bit for bit.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
import torch

from megatron_tgdpo.testing import TIMING_METRICS, TrainingJob, run_on_ranks

ROOT = Path(__file__).resolve().parents[2]
ITERS = 14  # the chain's runs; stops land around iteration 3-8
SAVE_EVERY = 2
EXIT_REQUEUE = 75
START_TIMEOUT = 240.0  # seconds to the first logged step (start-up is ~10 s on 2 quiet cores)

BASE = ["--model", "tiny", "--loss-type", "dpo", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--seq-length", "64", "--lr", "3e-3", "--lr-decay-style", "inverse-square-root", "--seed", "11",
        "--eval-iters", "0", "--no-tensorboard"]


# ----------------------------------------------------------------------------------------------
# jobs
# ----------------------------------------------------------------------------------------------


class Job(TrainingJob):
    """One launch of the trainer (``testing.TrainingJob``), its output in ``<work>/<name>.out``, killed
    at the end of the module whatever happens."""

    def __init__(self, work: Path, name: str, flags: list[str], *, nproc: int = 2, env: Optional[dict] = None):
        self.name = name
        super().__init__(flags, out=work / f"{name}.out", nproc=nproc, cwd=ROOT, env=env)
        self.returncode: Optional[int] = None
        _LIVE.append(self)

    # ---- looking -------------------------------------------------------------------------------
    def tail(self, chars: int = 4000) -> str:
        return f"--- {self.name} output (last {chars} chars) ---\n{self.output[-chars:]}"

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            self.returncode = self.proc.returncode
            raise AssertionError(f"{self.name} exited early with {self.proc.returncode}\n{self.tail()}")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = START_TIMEOUT,
                 poll: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self._check_running()
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what} within {timeout:.0f} s\n{self.tail()}")
            time.sleep(poll)

    def wait_for_iteration(self, log_dir: Path, iteration: int, timeout: float = START_TIMEOUT) -> int:
        """Block until ``metrics.jsonl`` logs ``iteration`` (or later); returns the newest logged."""
        self.wait_for(lambda: _last_iteration(log_dir) >= iteration, f"iteration {iteration}", timeout)
        return _last_iteration(log_dir)

    # ---- acting --------------------------------------------------------------------------------
    def signal_worker_groups(self, sig: signal.Signals) -> list[int]:
        """``sig`` to every worker's process group; every worker must be there to receive it."""
        workers = self.workers()
        assert len(workers) == max(self.nproc, 1), f"{self.name}: workers {workers}"
        return super().signal_worker_groups(sig)

    def wait(self, timeout: float = START_TIMEOUT) -> int:
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name}: still running after {timeout:.0f} s\n{self.tail()}") from None
        return self.returncode

    def kill(self) -> None:
        """SIGKILL every process of the job; collect the launcher."""
        self.kill_all()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


_LIVE: list[Job] = []


@pytest.fixture(scope="module", autouse=True)
def _kill_every_job_at_the_end() -> Iterator[None]:
    yield
    while _LIVE:
        _LIVE.pop().kill()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


def _flags(work: Path, name: str, *extra) -> list[str]:
    return [*BASE, "--data-cache-dir", work / "data", "--log-dir", work / name, "--train-iters", ITERS, *extra]


def _metrics(log_dir: Path) -> dict[int, dict]:
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {r["iteration"]: r for r in rows}


def _last_iteration(log_dir: Path) -> int:
    return max(_metrics(log_dir), default=0)


def _training_values(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_METRICS}


def _assert_bit_identical_to(reference: dict, metrics: dict[int, dict]) -> None:
    """Every iteration ``metrics`` logged equals the uninterrupted reference run's, bit for bit."""
    for it, row in metrics.items():
        assert _training_values(row) == _training_values(reference["metrics"][it]), f"iteration {it}"


def _worker_exit_codes(output: str) -> dict[int, int]:
    """rank -> exit code from torchrun's failure summary (torchrun itself exits 1 for any failure)."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", output)
    return {int(rank): int(code) for rank, code in found}


def _iter_dirs(save: Path) -> list[str]:
    return sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))


def _damage(checkpoint: Path, seed: int) -> Path:
    """Random bytes over part of the largest ``.distcp`` file: same size, other content."""
    victim = max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    rng = random.Random(seed)
    with open(victim, "r+b") as fh:
        fh.seek(size // 3)
        fh.write(rng.randbytes(min(4096, size // 3)))
    assert victim.stat().st_size == size
    return victim


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------
# the chain: reference + lock + launcher SIGKILL -> SIGTERM -> SIGUSR1 -> damaged newest
# ----------------------------------------------------------------------------------------------


def _writes_in_progress(save: Path) -> list[Path]:
    """``iter_*.tmp`` directories that already hold a ``.distcp`` file: the writer processes are at work."""
    return [d for d in save.glob("iter_*.tmp") if any(d.glob("*.distcp"))]


@pytest.fixture(scope="module")
def reference(work: Path) -> dict:
    """An uninterrupted run (the reference trajectory), a second job refused on its ``--save``, and a
    SIGKILL of its launcher while the workers write a checkpoint (the moment with the most processes)."""
    save = work / "save"
    job = Job(work, "reference", _flags(work, "reference", "--train-iters", 1000, "--save", save,
                                        "--save-interval", 5))
    job.wait_for_iteration(work / "reference", ITERS)
    workers = job.workers()
    rank0 = next(w for w in workers if w.environ().get("RANK") == "0")
    # Pause the first job while the second starts (two cores): it still holds the lock.
    for w in workers:
        os.killpg(w.pid, signal.SIGSTOP)
    try:
        second = Job(work, "second", [*BASE, "--data-cache-dir", work / "data", "--train-iters", 4,
                                      "--save", save, "--log-dir", work / "second"], nproc=0)
        second_code = second.wait()
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGCONT)
    job.wait_for(lambda: bool(_writes_in_progress(save)), "checkpoint write", poll=0.002)
    helpers = [child for w in workers for child in w.children()]  # writer helpers and forked writers
    os.kill(job.proc.pid, signal.SIGKILL)
    during = [d.name for d in _writes_in_progress(save)]
    job.proc.wait(10)
    survivors = job.survivors(within=10.0)
    trained = _last_iteration(work / "reference")
    # The chain below starts from an empty save directory (it would resume the killed job's checkpoints).
    for leftover in save.glob("iter_*"):
        shutil.rmtree(leftover)
    (save / "latest_checkpointed_iteration.txt").unlink(missing_ok=True)
    return dict(metrics=_metrics(work / "reference"), save=save, rank0_pid=rank0.pid, second_code=second_code,
                second_output=second.output, trained=trained, during=during, helpers=helpers,
                survivors=survivors, work=work)


def test_second_job_on_the_same_save_is_refused_naming_the_holder(reference):
    out = reference["second_output"]
    assert reference["second_code"] == 2, out[-3000:]
    assert "is in use by another job" in out, out[-3000:]
    assert f"host {socket.gethostname()}" in out and f"pid {reference['rank0_pid']}" in out, out[-3000:]
    assert not (reference["work"] / "second" / "metrics.jsonl").exists()  # refused before any step


def test_sigkill_of_the_launcher_leaves_no_worker_or_helper(reference):
    assert reference["trained"] > ITERS and reference["during"]  # killed while training, mid-write
    assert reference["helpers"], "expected the checkpoint writer's helper processes under the workers"
    assert not reference["survivors"], f"alive 10 s after the launcher's SIGKILL: {reference['survivors']}"


@pytest.fixture(scope="module")
def sigterm(reference) -> dict:
    """A new job on the same ``--save`` (the dead job's lock is stale), SIGTERMed while it trains."""
    work, save = reference["work"], reference["save"]
    stale = json.loads((save / ".megatron_tgdpo.lock").read_text())  # still names the killed job
    job = Job(work, "sigterm", _flags(work, "sigterm", "--load", save, "--save", save, "--save-interval", SAVE_EVERY))
    job.wait_for_iteration(work / "sigterm", 3)
    job.signal_worker_groups(signal.SIGTERM)
    code = job.wait()
    return dict(code=code, output=job.output, metrics=_metrics(work / "sigterm"), save=save, work=work,
                dirs=_iter_dirs(save), marker=_read_marker(save), stale=stale)


def _read_marker(save: Path) -> Optional[dict]:
    path = save / "REQUEUE"
    return json.loads(path.read_text()) if path.is_file() else None


def _assert_preemption_stop(stage: dict, signame: str) -> int:
    """Exit 75 on every worker, REQUEUE naming the iteration, that checkpoint published; returns it."""
    out = stage["output"]
    assert stage["code"] != 0, out[-3000:]
    assert _worker_exit_codes(out) == {0: EXIT_REQUEUE, 1: EXIT_REQUEUE}, out[-3000:]
    stopped = max(stage["metrics"])
    assert f"stopping after iteration {stopped} ({signame})" in out, out[-3000:]
    assert stage["marker"] is not None and stage["marker"]["iteration"] == stopped, stage["marker"]
    assert stage["marker"]["reason"] == signame
    assert stage["dirs"][-1] == f"iter_{stopped:07d}", stage["dirs"]
    assert not [d for d in stage["dirs"] if d.endswith(".tmp")], stage["dirs"]
    newest = stage["save"] / stage["dirs"][-1]
    assert (newest / "tgdpo_checkpoint.json").is_file()  # published: the metadata is written last
    assert "BrokenPipeError" not in out  # the writer's helper survived the signal
    return stopped


def test_sigterm_to_every_worker_group_saves_and_exits_for_requeue(sigterm, reference):
    assert sigterm["stale"]["pid"] == reference["rank0_pid"]  # the lock file named the killed job
    assert min(sigterm["metrics"]) == 1  # it started (the stale lock was taken over) from iteration 0
    assert f"no checkpoint in {sigterm['save']} yet" in sigterm["output"]
    stopped = _assert_preemption_stop(sigterm, "SIGTERM")
    assert stopped < ITERS, "the run ended before the signal: make it longer"
    _assert_bit_identical_to(reference, sigterm["metrics"])


@pytest.fixture(scope="module")
def sigusr1(sigterm) -> dict:
    """Resume exactly ``iter_0000002`` (newer ones exist), then SIGUSR1 once it is past the SIGTERM stop."""
    work, save = sigterm["work"], sigterm["save"]
    first = save / "iter_0000002"
    job = Job(work, "sigusr1", _flags(work, "sigusr1", "--load", first, "--save", save, "--save-interval", SAVE_EVERY))
    job.wait_for_iteration(work / "sigusr1", max(sigterm["metrics"]) + 1)
    job.signal_worker_groups(signal.SIGUSR1)
    code = job.wait()
    return dict(code=code, output=job.output, metrics=_metrics(work / "sigusr1"), save=save, work=work,
                dirs=_iter_dirs(save), marker=_read_marker(save), loaded=first)


def test_load_of_one_iteration_directory_resumes_exactly_it(sigusr1, sigterm):
    assert f"iter_{max(sigterm['metrics']):07d}" in sigterm["dirs"]  # a newer checkpoint existed
    assert f"resumed from {sigusr1['loaded']} (iteration 2, 16 samples consumed)" in sigusr1["output"]
    assert min(sigusr1["metrics"]) == 3


def test_sigusr1_to_every_worker_group_stops_the_same_way(sigusr1, reference):
    stopped = _assert_preemption_stop(sigusr1, "SIGUSR1")
    assert stopped < ITERS, "the run ended before the signal: make it longer"
    _assert_bit_identical_to(reference, sigusr1["metrics"])


@pytest.fixture(scope="module")
def resumed(sigusr1) -> dict:
    """Damage the newest checkpoint, then resume from the save root to the end."""
    work, save = sigusr1["work"], sigusr1["save"]
    newest = save / sigusr1["dirs"][-1]
    victim = _damage(newest, seed=1)
    job = Job(work, "resumed", _flags(work, "resumed", "--load", save, "--save", save, "--save-interval", SAVE_EVERY))
    code = job.wait()
    return dict(code=code, output=job.output, metrics=_metrics(work / "resumed"), save=save, work=work,
                victim=victim, damaged=newest, before=sigusr1["dirs"])


def test_damaged_newest_checkpoint_is_skipped_and_the_resume_is_bit_exact(resumed, reference):
    out = resumed["output"]
    assert resumed["code"] == 0, out[-3000:]
    assert f"skipping {resumed['damaged']}: {resumed['victim']}: crc32 differs from tgdpo_checkpoint.json" in out, \
        out[-3000:]
    previous = [d for d in resumed["before"] if d < resumed["damaged"].name][-1]
    start = int(previous.split("_")[1])
    assert f"resumed from {resumed['save'] / previous} (iteration {start}," in out, out[-3000:]
    assert sorted(resumed["metrics"]) == list(range(start + 1, ITERS + 1))
    _assert_bit_identical_to(reference, resumed["metrics"])
    assert not (resumed["save"] / "REQUEUE").exists()  # cleared when the run started


def test_a_damaged_checkpoint_is_reported_once_per_run(resumed):
    out = resumed["output"]
    assert out.count(f"skipping {resumed['damaged']}:") == 1, out[-3000:]


def test_every_checkpoint_damaged_is_refused_and_nothing_is_deleted(resumed):
    work, save = resumed["work"], resumed["save"]
    dirs = _iter_dirs(save)
    for i, name in enumerate(dirs):
        _damage(save / name, seed=100 + i)
    before = _tree(save)
    job = Job(work, "all-damaged", _flags(work, "all-damaged", "--load", save), nproc=0)
    code = job.wait()
    out = job.output
    assert code == 2, out[-3000:]
    assert f"{save}: none of its {len(dirs)} checkpoints is intact" in out, out[-3000:]
    assert all(f"skipping {save / d}:" in out for d in dirs), out[-3000:]
    assert _tree(save) == before  # nothing deleted, nothing written
    assert _metrics(work / "all-damaged") == {}  # no step


# ----------------------------------------------------------------------------------------------
# non-finite steps (NaN injected from outside the product: a sitecustomize on PYTHONPATH)
# ----------------------------------------------------------------------------------------------

NAN_HOOK = '''\
"""Test hook: megatron_tgdpo.algorithms.preference.preference_loss_sums returns NaN losses on the steps
named by TGDPO_TEST_NAN_STEPS ("3,5" or "4-": from step 4 on), counting TGDPO_TEST_CALLS_PER_STEP calls
(this rank's micro-batches) per step."""
import dataclasses
import importlib.abc
import importlib.util
import os
import sys

TARGET = "megatron_tgdpo.algorithms.preference"


def _nan_step(step):
    spec = os.environ["TGDPO_TEST_NAN_STEPS"]
    if spec.endswith("-"):
        return step >= int(spec[:-1])
    return step in {int(s) for s in spec.split(",")}


def _patch(module):
    import torch

    original, calls = module.preference_loss_sums, [0]
    per_step = int(os.environ["TGDPO_TEST_CALLS_PER_STEP"])

    def preference_loss_sums(*args, **kwargs):
        out = original(*args, **kwargs)
        step = calls[0] // per_step + 1
        calls[0] += 1
        if not _nan_step(step):
            return out
        nan = torch.tensor(float("nan"))
        metrics = dict(out.metrics)
        total, count = metrics["loss"]
        metrics["loss"] = (total * nan, count)
        return dataclasses.replace(out, losses=out.losses * nan, metrics=metrics)

    module.preference_loss_sums = preference_loss_sums


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("TGDPO_TEST_NAN_STEPS"):
    sys.meta_path.insert(0, _Finder())
'''


def _nan_env(work: Path, steps: str) -> dict:
    hook = work / "nan-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(NAN_HOOK)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    # 8 pairs per step / (2 per micro-batch x 2 data-parallel ranks) = 2 loss calls per rank and step
    # (padded rows: --no-pack-sequences; packing makes the number of micro-batches vary by step)
    return {"PYTHONPATH": path, "TGDPO_TEST_NAN_STEPS": steps, "TGDPO_TEST_CALLS_PER_STEP": "2"}


def _model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a torch_dist checkpoint (not the optimizer state), read in this process."""
    from megatron_tgdpo.convert.torch_dist import TorchDistCheckpoint

    ckpt = TorchDistCheckpoint(checkpoint)
    return {key: ckpt.read_box(key, (0,) * len(shape), shape).clone()
            for key, (shape, _) in ckpt.tensors().items() if not key.startswith("optimizer.")}


def test_a_nan_step_is_skipped_and_changes_no_weight(work):
    save = work / "nan-save"
    job = Job(work, "nan", [*BASE, "--data-cache-dir", work / "data", "--log-dir", work / "nan", "--train-iters", 5,
                            "--save", save, "--save-interval", 1, "--no-pack-sequences"], env=_nan_env(work, "3,5"))
    code = job.wait()
    assert code == 0, job.tail()
    metrics = _metrics(work / "nan")
    assert {it: r["skipped"] for it, r in metrics.items()} == {1: 0, 2: 0, 3: 1, 4: 0, 5: 1}
    assert metrics[3]["loss"] == "nan" and metrics[4]["loss"] != "nan"
    assert "iteration 3: non-finite loss" in job.output
    # No checkpoint while steps are being skipped (iteration 3); the run's final one (5) is written.
    assert _iter_dirs(save) == ["iter_0000001", "iter_0000002", "iter_0000004", "iter_0000005"]
    weights = {d: _model_tensors(save / d) for d in _iter_dirs(save)}
    for name, tensors in weights.items():
        assert all(torch.isfinite(t).all() for t in tensors.values()), f"{name} holds non-finite weights"
    assert any(not torch.equal(weights["iter_0000004"][k], weights["iter_0000002"][k]) for k in weights["iter_0000002"])
    for key, value in weights["iter_0000004"].items():  # the skipped step 5 changed nothing
        assert torch.equal(weights["iter_0000005"][key], value), key


def test_nan_on_every_step_stops_with_exit_1_and_no_checkpoint_after_the_last_good_step(work):
    save = work / "nan-streak-save"
    job = Job(work, "nan-streak", [*BASE, "--data-cache-dir", work / "data", "--log-dir", work / "nan-streak",
                                   "--train-iters", 10, "--save", save, "--save-interval", 1,
                                   "--skip-nonfinite-steps", 2, "--no-pack-sequences"], env=_nan_env(work, "3-"))
    code = job.wait()
    out = job.output
    codes = _worker_exit_codes(out)
    # Both ranks raise; torchrun may SIGTERM the second while it exits (that is torchrun's error path).
    assert code != 0 and 1 in codes.values() and set(codes.values()) <= {1, -signal.SIGTERM}, out[-3000:]
    assert "error: 3 consecutive steps had a non-finite loss or gradient norm (last at iteration 5)" in out
    assert "stopping without saving" in out
    assert {it: r["skipped"] for it, r in _metrics(work / "nan-streak").items()} == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    assert _iter_dirs(save) == ["iter_0000001", "iter_0000002"]


# ----------------------------------------------------------------------------------------------
# paths refused at start
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refused(work) -> dict:
    """Two one-process jobs refused at start, run side by side (each uses one core while it imports)."""
    target = work / "not-a-checkpoint.pt"
    target.write_bytes(b"\0" * 16)
    blocker = work / "a-regular-file"
    blocker.write_text("x")
    data = work / "untouched-data"
    load_file = Job(work, "load-file", _flags(work, "load-file", "--load", target), nproc=0)
    unwritable = Job(work, "unwritable", [*BASE, "--data-cache-dir", data, "--train-iters", 2,
                                          "--save", blocker / "save", "--log-dir", blocker / "logs"], nproc=0)
    return dict(load_file=load_file, target=target, unwritable=unwritable, blocker=blocker, data=data)


def test_load_on_a_file_is_refused(refused):
    job = refused["load_file"]
    assert job.wait() == 2, job.tail()
    assert f"--load {refused['target']}: is a file" in job.output


def test_unwritable_save_and_log_dir_are_refused_before_any_compute(refused):
    job, blocker, data = refused["unwritable"], refused["blocker"], refused["data"]
    assert job.wait() == 2, job.tail()
    out = job.output
    assert f"--save {blocker / 'save'}: not writable" in out, out[-3000:]
    assert f"--log-dir {blocker / 'logs'}: not writable" in out, out[-3000:]
    assert not data.exists()  # the data set was not even prepared


# ----------------------------------------------------------------------------------------------
# full disks (in-process: the free-space function, the writer or the metrics file patched)
# ----------------------------------------------------------------------------------------------


def _argv(work: Path, name: str, *extra) -> list[str]:
    return [*map(str, BASE), "--data-cache-dir", str(work / "data"), "--log-dir", str(work / name), *map(str, extra)]


def _train_expecting_checkpoint_error(argv: list[str], patch: Callable[[], None]) -> str:
    from megatron_tgdpo import checkpointing, train
    from megatron_tgdpo.config import parse_args

    patch()
    try:
        train.run(parse_args(argv))
    except checkpointing.CheckpointError as exc:
        return str(exc)
    return "no error"


def _free_space_gone_after_first_save() -> None:
    from megatron_tgdpo.checkpointing import saving

    real, calls = saving._free_bytes, [0]

    def free_bytes(path):
        calls[0] += 1
        return real(path) if calls[0] == 1 else 1000  # the second save finds 1000 bytes free

    saving._free_bytes = free_bytes


def test_save_is_refused_before_writing_when_space_is_short(work):
    save = work / "short-save"
    argv = _argv(work, "short", "--train-iters", 2, "--save", save, "--save-interval", 1)
    errors = run_on_ranks(2, _train_expecting_checkpoint_error, argv, _free_space_gone_after_first_save,
                          model_parallel=False)
    assert all("not enough space to save" in e and "the previous checkpoint is kept" in e for e in errors), errors
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000001"]


def _writer_fails_with_enospc() -> None:
    """The real writer runs, then the disk 'fills': one file cut short and ENOSPC raised."""
    from megatron.core import dist_checkpointing

    from megatron_tgdpo.checkpointing import saving

    real_save = dist_checkpointing.save

    def save(sharded, directory, *args, **kwargs):
        real_save(sharded, directory, *args, **kwargs)
        victim = max(Path(directory).glob("*.distcp"), key=lambda p: p.stat().st_size)
        with open(victim, "r+b") as fh:
            fh.truncate(victim.stat().st_size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(victim))

    dist_checkpointing.save = save
    saving._free_bytes = lambda path: 10 * 2**20  # what is left once the write failed


def test_a_failing_write_reports_no_space_and_leaves_no_partial_directory(work):
    save = work / "enospc-save"
    argv = _argv(work, "enospc", "--train-iters", 1, "--save", save)
    errors = run_on_ranks(2, _train_expecting_checkpoint_error, argv, _writer_fails_with_enospc,
                          model_parallel=False)
    for e in errors:
        assert "saving" in e and "no space left on device" in e.lower() and "partial directory was removed" in e, e
    leftovers = [p.name for p in save.iterdir() if p.name.startswith("iter_")]
    assert leftovers == [], leftovers


class _FullDiskFile:
    """A metrics file on a full disk: every write fails."""

    def __init__(self, name: str):
        self.name = name

    def write(self, _text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        pass


def _train_with_unwritable_metrics(argv: list[str]) -> tuple[int, str]:
    from megatron_tgdpo import monitoring, train
    from megatron_tgdpo.config import parse_args

    real_init = monitoring.MetricsLogger.__init__

    def init(self, **kwargs):
        real_init(self, **kwargs)
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = _FullDiskFile(self.jsonl.name)

    monitoring.MetricsLogger.__init__ = init
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        code = train.run(parse_args(argv))
    return code, console.getvalue()


def test_unwritable_metrics_file_is_warned_once_and_training_goes_on(work):
    results = run_on_ranks(2, _train_with_unwritable_metrics, _argv(work, "metrics-full", "--train-iters", 3),
                           model_parallel=False)
    assert [code for code, _ in results] == [0, 0]
    console = results[0][1]
    assert console.count("warning: cannot write metrics") == 1, console
    assert "No space left on device" in console
    assert "iter      3/3" in console  # every step ran and was shown
