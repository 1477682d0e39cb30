"""A stop signal at any moment of a run, through the real command line: never lost, never a traceback.

One process (``python -m megatron_tgdpo.train``, a world of one, as ``srun`` starts a task) in a session
of its own; SIGTERM goes to its whole process group, as SLURM signals every task: the worker, the
checkpoint writer's helper, the spawn resource tracker and the file writers it forks.

* 20 moments spread evenly from the first statement of the command (the moment its stop handler is
  installed, read from ``/proc/<pid>/status``) to the exit of an uninterrupted run, which covers the
  imports, start-up, loading, training, saving and teardown; plus three moments taken from events
  (the helper process appears, a checkpoint is being written, the final checkpoint is reported saved).
  By default 10 of the 20 run (``CI_MOMENTS``: both ends and every other moment between, so no stretch
  of the timeline longer than 1/9 of it goes untested, and the events cover the short windows); the
  other 10 are skipped unless ``MEGATRON_TGDPO_ALL_SIGNAL_MOMENTS=1`` is set.
  Every run ends with exit 75 and a fresh ``<save>/REQUEUE`` (a stale one is put there first), or with a
  clean finish (0, no marker); its logged steps and its newest checkpoint equal the uninterrupted run's
  bit for bit; the resumed run (same ``--log-dir``: the redone steps' rows replace the stopped run's)
  ends with every row and the final checkpoint equal to the uninterrupted run's. A resume is run once
  per distinct starting checkpoint: every stopped run's checkpoint is byte-compared with the
  uninterrupted run's at that iteration, so resuming another with the same bytes is the same
  computation.
* A log directory on a full file system (a tmpfs, mounted when the tests run as root): the run trains,
  saves, exits 0 and warns exactly once.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from megatron_tgdpo.testing import TIMING_METRICS, TrainingJob

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ITERS = 3
EVEN_MOMENTS = 20
# The moments run by default: the first (the handler just installed) and the last (the run's exit), and
# between them one moment in two, evenly spaced at 1/9 of the timeline.
CI_MOMENTS = tuple(round(k * (EVEN_MOMENTS - 1) / 9) for k in range(10))
ALL_MOMENTS = os.environ.get("MEGATRON_TGDPO_ALL_SIGNAL_MOMENTS", "") not in ("", "0")
RUN_TIMEOUT = 600.0
BASE = ["--model", "tiny", "--loss-type", "dpo", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--seq-length", "64", "--lr", "3e-3", "--lr-decay-style", "inverse-square-root", "--seed", "11",
        "--eval-iters", "0", "--no-tensorboard", "--train-iters", str(ITERS), "--save-interval", "1"]
STALE = {"stale": "left by an earlier run"}


# ----------------------------------------------------------------------------------------------
# jobs
# ----------------------------------------------------------------------------------------------


def _catches_sigterm(pid: int) -> bool:
    """The process has a handler for SIGTERM (its stop handler is installed)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            caught = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught >> (signal.SIGTERM - 1) & 1)


class Run(TrainingJob):
    """One trainer process; ``handled_at``: seconds from launch to its stop handler being installed."""

    def __init__(self, work: Path, name: str, *extra, output: str = ".out"):
        self.work, self.name = work, name
        self.save, self.log_dir = work / f"{name}-save", work / f"{name}-log"
        flags = [*BASE, "--data-cache-dir", work / "data", "--save", self.save, "--log-dir", self.log_dir, *extra]
        self.launched = time.monotonic()
        super().__init__(flags, out=work / f"{name}{output}", nproc=0, cwd=ROOT)
        self.handled_at: Optional[float] = None
        self.signalled_at: Optional[float] = None

    def wait_until(self, condition: Callable[[], bool], poll: float = 0.001) -> bool:
        """True once ``condition`` holds while the process runs; False if it exited first."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while self.proc.poll() is None:
            if condition():
                return True
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no progress in {RUN_TIMEOUT:.0f} s\n{self.output[-3000:]}")
            time.sleep(poll)
        return False

    def wait_for_handler(self) -> None:
        if self.wait_until(lambda: _catches_sigterm(self.proc.pid), poll=0.0005):
            self.handled_at = time.monotonic() - self.launched

    def term_group(self) -> bool:
        """SIGTERM to the job's process group; False when it had exited already."""
        if self.proc.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.signalled_at = time.monotonic() - self.launched
            return True
        return False

    def finish(self) -> dict:
        try:
            code = self.proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"{self.name}: still running after {RUN_TIMEOUT:.0f} s\n{self.output[-3000:]}")
        survivors = self.survivors(within=10.0)
        self.kill_all()
        marker = self.save / "REQUEUE"
        return dict(code=code, output=self.output, rows=_rows(self.log_dir), save=self.save,
                    marker=json.loads(marker.read_text()) if marker.is_file() else None, survivors=survivors,
                    elapsed=time.monotonic() - self.launched, handled_at=self.handled_at,
                    signalled_at=self.signalled_at, log_dir=self.log_dir)


def _rows(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_METRICS}
            for line in path.read_text().splitlines()]


def _newest(save: Path) -> Optional[Path]:
    published = [p for p in save.glob("iter_???????") if (p / "tgdpo_checkpoint.json").is_file()]
    return max(published, default=None)


def _plain(value):
    """A loaded object with every tensor as (dtype, shape, bytes), containers kept: compared with ``==``,
    equal means bit-identical values and types."""
    import torch

    if isinstance(value, torch.Tensor):
        raw = value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        return ("tensor", str(value.dtype), tuple(value.shape), raw)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return (type(value).__name__, value)


def _tensor_bytes(checkpoint: Path) -> dict[str, object]:
    """The state of a checkpoint: the bytes of its tensor files, and the values of its common state
    (``common.pt``: the scheduler and optimizer settings; its pickle bytes depend on which strings the
    writing process happened to share, so a resumed run writes other bytes for the same values). The
    metadata files name the save directory and differ between runs by design."""
    import torch

    state: dict[str, object] = {p.name: p.read_bytes() for p in sorted(checkpoint.glob("*.distcp"))}
    state["common.pt"] = _plain(torch.load(checkpoint / "common.pt", map_location="cpu", weights_only=True))
    return state


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("signal-windows")


@pytest.fixture(scope="module")
def baseline(work: Path) -> dict:
    """The uninterrupted run: its rows, every checkpoint's bytes, and its timeline."""
    run = Run(work, "baseline")
    run.wait_for_handler()
    result = run.finish()
    assert result["code"] == 0, result["output"][-3000:]
    assert result["handled_at"] is not None
    assert [r["iteration"] for r in result["rows"]] == list(range(1, ITERS + 1))
    result["checkpoints"] = {int(p.name[5:]): _tensor_bytes(p) for p in result["save"].glob("iter_???????")}
    assert sorted(result["checkpoints"]) == list(range(1, ITERS + 1))
    return result


def _stopped_run(work: Path, name: str, fire: Callable[[Run], bool]) -> dict:
    run = Run(work, name)
    run.save.mkdir(parents=True)
    (run.save / "REQUEUE").write_text(json.dumps(STALE))  # a previous run's: must not survive this one
    run.wait_for_handler()
    fired = fire(run) if run.handled_at is not None else False
    result = run.finish()
    result["fired"] = fired
    return result


_RESUMED: dict[int, dict] = {}  # newest checkpoint iteration a stopped run left -> its resumed run


def _resume(work: Path, stopped: dict, start: int) -> dict:
    if start not in _RESUMED:
        run = Run(work, Path(stopped["log_dir"]).name.removesuffix("-log"), "--load", stopped["save"],
                  output="-resumed.out")
        _RESUMED[start] = run.finish()
    return _RESUMED[start]


def _check(stopped: dict, baseline: dict, work: Path) -> None:
    out = stopped["output"]
    where = (f"signalled {stopped['signalled_at']} s after launch (handler at {stopped['handled_at']} s; the "
             f"uninterrupted run took {baseline['elapsed']:.1f} s)\n{out[-3000:]}")
    assert "Traceback" not in out, where
    assert not stopped["survivors"], f"{stopped['survivors']} {where}"
    assert stopped["code"] in (0, 75), f"exit {stopped['code']}: {where}"
    assert stopped["marker"] != STALE, f"the stale REQUEUE survived: {where}"
    for row in stopped["rows"]:  # what it trained is the uninterrupted trajectory
        assert row == baseline["rows"][row["iteration"] - 1], where
    newest = _newest(stopped["save"])
    start = int(newest.name[5:]) if newest else 0
    if newest is not None:
        assert _tensor_bytes(newest) == baseline["checkpoints"][start], f"{newest} differs: {where}"
    if stopped["code"] == 0:  # finished: a clean finish, nothing to requeue
        assert stopped["marker"] is None and start == ITERS, where
        return
    assert stopped["fired"], f"exit 75 without a signal: {where}"
    assert stopped["marker"] is not None and stopped["marker"]["reason"] == "SIGTERM", where
    assert stopped["marker"]["iteration"] == start, f"REQUEUE {stopped['marker']}: {where}"
    assert "stopping" in out and "exit code 75 = requeue" in out, where
    resumed = _resume(work, stopped, start)
    rout = resumed["output"]
    assert resumed["code"] == 0 and "Traceback" not in rout, rout[-3000:]
    assert resumed["rows"] == baseline["rows"], "the resumed log is not the uninterrupted run's, row for row"
    final = _newest(resumed["save"])
    assert final is not None and final.name == f"iter_{ITERS:07d}", rout[-3000:]
    assert _tensor_bytes(final) == baseline["checkpoints"][ITERS], "the final checkpoint differs"
    assert resumed["marker"] is None  # cleared when the resumed run started


@pytest.mark.parametrize("moment", [
    pytest.param(m, marks=pytest.mark.skipif(not ALL_MOMENTS and m not in CI_MOMENTS,
                                             reason="set MEGATRON_TGDPO_ALL_SIGNAL_MOMENTS=1 for all 20 moments"))
    for m in range(EVEN_MOMENTS)])
def test_sigterm_at_evenly_spread_moments(moment: int, baseline: dict, work: Path):
    span = baseline["elapsed"] - baseline["handled_at"]

    def fire(run: Run) -> bool:
        at = time.monotonic() + span * moment / (EVEN_MOMENTS - 1)
        run.wait_until(lambda: time.monotonic() >= at)
        return run.term_group()

    _check(_stopped_run(work, f"moment-{moment:02d}", fire), baseline, work)


def _children(run: Run) -> list:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(run.proc.pid).children(recursive=True)
    return []


def _helper_starting(run: Run) -> bool:
    import psutil

    for child in _children(run):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "spawn_main" in " ".join(child.cmdline()):
                return True
    return False


def _writing(run: Run) -> bool:
    return any(run.save.glob("iter_*.tmp/*.distcp"))


def _final_saved(run: Run) -> bool:
    return f"saved {run.save / f'iter_{ITERS:07d}'}" in run.output


@pytest.mark.parametrize("event", ["helper-start", "checkpoint-write", "after-final-save"])
def test_sigterm_at_events(event: str, baseline: dict, work: Path):
    condition = {"helper-start": _helper_starting, "checkpoint-write": _writing,
                 "after-final-save": _final_saved}[event]

    def fire(run: Run) -> bool:
        return run.wait_until(lambda: condition(run)) and run.term_group()

    stopped = _stopped_run(work, event, fire)
    assert stopped["fired"], f"{event}: the run ended before the event\n{stopped['output'][-3000:]}"
    _check(stopped, baseline, work)
    if event == "helper-start":  # stopped before the first step: nothing saved
        assert stopped["code"] == 75 and stopped["marker"]["saved"] is False and not stopped["rows"]
    elif event == "after-final-save":
        assert stopped["code"] == 0


# ----------------------------------------------------------------------------------------------
# a full log disk
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tiny_tmpfs(where: Path, pages: int) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4}k", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}): the full-disk test "
                    "needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_log_disk_warns_once_and_the_run_exits_0(work: Path):
    with _tiny_tmpfs(work / "tiny-fs", pages=4) as fs:
        # Leave one free page: the start-up probe fits, then metrics.jsonl fills it after a few rows.
        filler, block = fs / "filler", b"\0" * 4096
        with contextlib.suppress(OSError), open(filler, "wb") as fh:
            for _ in range(3):
                fh.write(block)
                fh.flush()
        stat = os.statvfs(fs)
        assert stat.f_bavail == 1, f"{stat.f_bavail} free pages"
        log_dir = fs / "log"
        log_dir.mkdir()
        save = work / "full-log-save"
        job = TrainingJob([*BASE, "--data-cache-dir", work / "data", "--save", save, "--log-dir", log_dir,
                           "--train-iters", 12, "--save-interval", 12, "--eval-iters", 1],
                          out=work / "full-log.out", nproc=0, cwd=ROOT)
        code = job.proc.wait(RUN_TIMEOUT)
        job.kill_all()
        out = job.output
        lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    assert code == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.count("warning: cannot write metrics") == 1, out[-3000:]
    assert "No space left on device" in out
    assert 0 < len(lines) < 12 and json.loads(lines[0])["iteration"] == 1  # then the disk was full
    assert "iter     12/12" in out  # every step ran
    assert (save / "iter_0000012" / "tgdpo_checkpoint.json").is_file()  # and the run saved
