#!/usr/bin/env python
"""Soak test for preemption: one training run driven to completion through repeated SIGKILLs of the
whole job and SIGTERMs to every worker's process group, requeued each time with ``--load``.

Not run in CI (10-25 minutes on two cores). What it does:

1. an uninterrupted reference run of ``--iters`` iterations;
2. the same run as a requeue loop (``--load <save> --save <save>``, as the sbatch examples do): each
   attempt is a fresh ``torchrun`` job that is either SIGKILLed as a whole (launcher, workers and their
   helpers, at once) at a random moment — a random time after launch, while training, or while a
   checkpoint is being written — or stopped by SIGTERM sent to every worker's process group (as SLURM
   does) in one of four windows, taken in turn: start-up (a random time in the first ``--startup-window``
   seconds after the workers' stop handlers are installed: imports, flags, data, models, loading), the
   start of the checkpoint writer's helper process, training, or a checkpoint write; until ``--kills``
   kills and ``--terms`` stops have been spent (an event the job did not live to see is tried again on
   the next attempt); the last attempt runs to the end and, unless ``--no-teardown-term``, gets a SIGTERM
   once its final checkpoint is reported saved (the teardown window);
3. checks: after every attempt no process of the job is left; every SIGTERM stop exits 75 on each
   worker and leaves ``<save>/REQUEUE`` naming the newest checkpoint (or, landing after the final save,
   finishes with 0), with no traceback in its output; the final attempt exits 0; the final metrics
   trajectory (for each iteration, the attempt that logged it last) equals the reference bit for bit,
   and so does every iteration any attempt logged.

    python tools/soak_preemption.py --work /tmp/soak            # 20 kills, 8 stops, 120 iterations
    python tools/soak_preemption.py --work /tmp/soak-short --iters 24 --kills 3 --terms 4   # ~5 minutes

Every attempt imports the code afresh: run it on a tree nobody edits meanwhile (a copy of the checkout
works: the jobs run from the directory this file is in).

Exit status 0 when every check passed, 1 otherwise; a summary is printed either way.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this file is in, installed or not

from megatron_tgdpo.testing import TIMING_METRICS, TrainingJob  # noqa: E402

EXIT_REQUEUE = 75
KILL_MOMENTS = ("saving", "training", "launch")  # assigned in turn, so each gets a third of the kills
TERM_MOMENTS = ("startup", "helper", "training", "saving")  # likewise for the SIGTERM stops


# ----------------------------------------------------------------------------------------------
# one job
# ----------------------------------------------------------------------------------------------


class Job(TrainingJob):
    """A torchrun launch of the trainer (``testing.TrainingJob``: its own session, every process found by
    an inherited token, orphans included)."""

    def __init__(self, flags: list[str], out: Path, nproc: int):
        super().__init__(flags, out=out, nproc=nproc, cwd=ROOT)
        self.started = time.monotonic()

    def running(self) -> bool:
        return self.proc.poll() is None

    def handlers_installed(self, nproc: int) -> bool:
        """Every worker exists and catches SIGTERM (its stop handler is installed)."""
        workers = self.workers()
        return len(workers) == nproc and all(catches_sigterm(w.pid) for w in workers)

    def helper_starting(self) -> bool:
        """A worker has started a spawned helper (the checkpoint writer's Manager)."""
        import psutil

        for worker in self.workers():
            with contextlib.suppress(psutil.NoSuchProcess):
                if any("spawn_main" in " ".join(c.cmdline()) for c in worker.children()):
                    return True
        return False

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def catches_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            caught = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def worker_traceback(output: str) -> bool:
    """A traceback other than torchrun's own report that a worker exited non-zero (ChildFailedError, which
    it prints for every exit 75 too)."""
    blocks = output.split("Traceback (most recent call last):")[1:]
    return any("ChildFailedError" not in block.split("\n\n")[0][:4000] for block in blocks)


def worker_exit_codes(output: str) -> dict[int, int]:
    """rank -> exit code from torchrun's failure summary."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", output)
    return {int(rank): int(code) for rank, code in found}


def read_metrics(log_dir: Path) -> dict[int, dict]:
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {r["iteration"]: {k: v for k, v in r.items() if k not in TIMING_METRICS} for r in rows}


# ----------------------------------------------------------------------------------------------
# the soak
# ----------------------------------------------------------------------------------------------


@dataclass
class Attempt:
    index: int
    event: str  # "kill:<moment>", "term:<moment>" or "final" / "final:teardown"
    resumed_at: int = 0
    logged: dict[int, dict] = field(default_factory=dict)
    exit_code: Optional[int] = None
    worker_codes: dict[int, int] = field(default_factory=dict)
    marker: Optional[dict] = None
    newest: Optional[str] = None
    survivors: list[str] = field(default_factory=list)
    fired: bool = True  # the event happened (False: the job ended first)
    traceback: bool = False  # "Traceback" in the job's output
    note: str = ""


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work).resolve()
        self.save = self.work / "save"
        self.rng = random.Random(args.seed)
        self.attempts: list[Attempt] = []

    def flags(self, log_dir: Path, *extra: str) -> list[str]:
        a = self.args
        return ["--model", "tiny", "--loss-type", "dpo", "--micro-batch-size", "2", "--global-batch-size", "8",
                "--seq-length", "64", "--lr", "2e-3", "--seed", str(a.seed), "--eval-iters", "0",
                "--no-tensorboard", "--train-iters", str(a.iters), "--data-cache-dir", str(self.work / "data"),
                "--log-dir", str(log_dir), *extra]

    # ---- waiting for moments -----------------------------------------------------------------
    def _until(self, job: Job, condition: Callable[[], bool], timeout: float = 1200.0, poll: float = 0.02) -> bool:
        """True when ``condition`` holds while the job still runs; False when the job ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if not job.running():
                return False
            time.sleep(poll)
        raise RuntimeError(f"attempt timed out after {timeout:.0f} s; see {job.out_path}")

    def _tmp_dirs(self) -> set[tuple[str, int]]:
        """(name, inode) of every ``iter_*.tmp``: a save re-creates a stale one of the same name."""
        found = set()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.save):
                if entry.name.startswith("iter_") and entry.name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        found.add((entry.name, entry.inode()))
        return found

    def _wait_for_save_in_progress(self, job: Job, which: int) -> bool:
        """Block until the ``which``-th checkpoint write of this job is under way (its .tmp exists)."""
        seen = self._tmp_dirs()  # left by killed attempts: not this job's
        for _ in range(which):
            if not self._until(job, lambda: bool(self._tmp_dirs() - seen), poll=0.005):
                return False
            seen |= self._tmp_dirs()
        return True

    def _wait_for_progress(self, job: Job, log_dir: Path, start: int) -> bool:
        return self._until(job, lambda: max(read_metrics(log_dir), default=start) > start, poll=0.05)

    # ---- one attempt -----------------------------------------------------------------------------
    def run_attempt(self, index: int, event: str) -> Attempt:
        log_dir = self.work / f"attempt-{index:03d}"
        attempt = Attempt(index, event)
        start = self.newest_iteration()
        attempt.resumed_at = start
        job = Job(self.flags(log_dir, "--load", str(self.save), "--save", str(self.save),
                             "--save-interval", str(self.args.save_interval), "--keep-last", "3"),
                  log_dir.with_suffix(".out"), self.args.nproc)
        try:
            if event == "final":
                attempt.exit_code = job.wait(1800)
            elif event == "final:teardown":  # SIGTERM once the final checkpoint is reported saved
                final = f"saved {self.save / f'iter_{self.args.iters:07d}'}"
                attempt.fired = self._until(job, lambda: final in job.output, poll=0.01)
                if attempt.fired:
                    attempt.fired = len(job.signal_worker_groups(signal.SIGTERM, missing_ok=True)) > 0
                attempt.exit_code = job.wait(1200)
                attempt.worker_codes = worker_exit_codes(job.output)
            elif event.startswith("term:"):
                attempt.fired = self._wait_for_term_moment(job, event.split(":", 1)[1], log_dir, start, attempt)
                if attempt.fired:
                    attempt.fired = len(job.signal_worker_groups(signal.SIGTERM, missing_ok=True)) == self.args.nproc
                attempt.exit_code = job.wait(1200)
                attempt.worker_codes = worker_exit_codes(job.output)
                marker = self.save / "REQUEUE"
                attempt.marker = json.loads(marker.read_text()) if marker.is_file() else None
            else:
                moment = event.split(":", 1)[1]
                if moment == "launch":  # often still starting up or loading the checkpoint
                    delay = self.rng.uniform(1.0, 20.0)
                    attempt.fired = self._until(job, lambda: time.monotonic() - job.started > delay, poll=0.05)
                elif moment == "training":
                    attempt.fired = self._wait_for_progress(job, log_dir, start)
                    if attempt.fired:
                        time.sleep(self.rng.uniform(0.0, 4.0))
                else:  # during the 1st..3rd checkpoint write of this attempt
                    which = self.rng.randint(1, 3)
                    attempt.fired = self._wait_for_save_in_progress(job, which)
                    if attempt.fired:
                        time.sleep(self.rng.uniform(0.0, 0.2))
                        attempt.note = f"during write {which}: {sorted(n for n, _ in self._tmp_dirs())}"
                if attempt.fired:
                    attempt.fired = job.running()
                job.kill_all()
                attempt.exit_code = job.wait(60)
            attempt.survivors = job.survivors()
        finally:
            job.kill_all()
            job.wait(30)
        attempt.traceback = worker_traceback(job.output)
        attempt.logged = read_metrics(log_dir)
        attempt.newest = self.newest_name()
        return attempt

    def _wait_for_term_moment(self, job: Job, moment: str, log_dir: Path, start: int, attempt: Attempt) -> bool:
        """Block until the window ``moment`` of this attempt is reached; False when the job ended first."""
        if moment == "startup":  # imports, flags, data, models, checkpoint loading
            if not self._until(job, lambda: job.handlers_installed(self.args.nproc), poll=0.001):
                return False
            delay = self.rng.uniform(0.0, self.args.startup_window)
            attempt.note = f"{delay:.1f} s after the stop handlers were installed"
            deadline = time.monotonic() + delay
            return self._until(job, lambda: time.monotonic() >= deadline, poll=0.01)
        if moment == "helper":  # the checkpoint writer's helper process is starting
            return self._until(job, job.helper_starting, poll=0.002)
        if moment == "training":
            if not self._wait_for_progress(job, log_dir, start):
                return False
            time.sleep(self.rng.uniform(0.0, 2.0))
            return job.running()
        which = self.rng.randint(1, 2)  # during the 1st or 2nd checkpoint write of this attempt
        if not self._wait_for_save_in_progress(job, which):
            return False
        time.sleep(self.rng.uniform(0.0, 0.2))
        attempt.note = f"during write {which}: {sorted(n for n, _ in self._tmp_dirs())}"
        return job.running()

    def newest_name(self) -> Optional[str]:
        """The checkpoint a requeued job would resume from (checksums verified, as the trainer does)."""
        sys.path.insert(0, str(ROOT))  # this tree's megatron_tgdpo, as the jobs (run from ROOT) use
        from megatron_tgdpo import checkpointing

        logging.getLogger(checkpointing.__name__).setLevel(logging.ERROR)  # skipped ones are expected here
        latest = checkpointing.find_latest(self.save, verify="checksums") if self.save.is_dir() else None
        return latest.name if latest else None

    def newest_iteration(self) -> int:
        name = self.newest_name()
        return int(name.split("_")[1]) if name else 0

    # ---- the whole soak --------------------------------------------------------------------------
    def plan(self) -> list[str]:
        kills = [f"kill:{KILL_MOMENTS[i % len(KILL_MOMENTS)]}" for i in range(self.args.kills)]
        terms = [f"term:{TERM_MOMENTS[i % len(TERM_MOMENTS)]}" for i in range(self.args.terms)]
        events = kills + terms
        self.rng.shuffle(events)
        return events

    def reference(self) -> dict[int, dict]:
        log_dir = self.work / "reference"
        job = Job(self.flags(log_dir), self.work / "reference.out", self.args.nproc)
        code = job.wait(3600)
        job.kill_all()
        if code != 0:
            raise SystemExit(f"the reference run failed ({code}); see {job.out_path}")
        return read_metrics(log_dir)

    def run(self) -> int:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        t0 = time.monotonic()
        say(f"reference run: {self.args.iters} iterations ...")
        reference = self.reference()
        say(f"  done in {time.monotonic() - t0:.0f} s")
        events = self.plan()
        retries = 0
        while events and self.newest_iteration() < self.args.iters:
            attempt = self.run_attempt(len(self.attempts) + 1, events[0])
            self.attempts.append(attempt)
            say(self.describe(attempt))
            if attempt.fired:
                events.pop(0)
            elif (retries := retries + 1) > self.args.kills + self.args.terms:
                break  # the jobs keep ending on their own: report it
        final = self.run_attempt(len(self.attempts) + 1, "final:teardown" if self.args.teardown_term else "final")
        self.attempts.append(final)
        say(self.describe(final))
        return self.report(reference, time.monotonic() - t0)

    def describe(self, a: Attempt) -> str:
        got = f"{min(a.logged)}..{max(a.logged)}" if a.logged else "none"
        text = (f"attempt {a.index:>3} {a.event:<15} from iteration {a.resumed_at:>3}: logged {got:<9} "
                f"exit {a.exit_code}")
        if a.event.startswith(("term", "final:")):
            text += f" workers {a.worker_codes} REQUEUE {a.marker and a.marker.get('iteration')}"
        if a.traceback:
            text += " TRACEBACK"
        if not a.fired:
            text += " (the job ended before the event)"
        if a.survivors:
            text += f" SURVIVORS {a.survivors}"
        return text + (f" [{a.note}]" if a.note else "") + f" newest {a.newest}"

    def report(self, reference: dict[int, dict], elapsed: float) -> int:
        problems: list[str] = []
        history: dict[int, dict] = {}
        mismatched: list[tuple[int, int]] = []
        for a in self.attempts:
            history.update(a.logged)
            mismatched += [(a.index, it) for it, row in a.logged.items() if row != reference.get(it)]
            if a.survivors:
                problems.append(f"attempt {a.index}: processes survived: {a.survivors}")
        kills = [a for a in self.attempts if a.event.startswith("kill") and a.fired]
        terms = [a for a in self.attempts if a.event.startswith("term") and a.fired]
        for a in terms:
            finished = a.exit_code == 0 and a.newest == f"iter_{self.args.iters:07d}" and a.marker is None
            if finished:  # the signal landed after the final save: a clean finish
                continue
            if a.worker_codes != {r: EXIT_REQUEUE for r in range(self.args.nproc)}:
                problems.append(f"attempt {a.index}: SIGTERM stop exited {a.worker_codes}, not 75 on every worker")
            newest = int(a.newest.split("_")[1]) if a.newest else 0
            if not a.marker or a.marker.get("iteration") != newest:
                problems.append(f"attempt {a.index}: REQUEUE {a.marker} does not name the newest checkpoint "
                                f"{a.newest}")
        for a in self.attempts:
            if a.traceback and not a.event.startswith("kill"):
                problems.append(f"attempt {a.index} ({a.event}): a traceback in attempt-{a.index:03d}.out")
        for a in self.attempts[:-1]:
            if not a.fired:  # nothing was sent: the job should still have been running
                problems.append(f"attempt {a.index} ended on its own with exit {a.exit_code} "
                                f"(see attempt-{a.index:03d}.out)")
        final = self.attempts[-1]
        if final.exit_code != 0:
            problems.append(f"the final attempt ({final.event}) exited {final.exit_code}")
        if sorted(history) != list(range(1, self.args.iters + 1)):
            problems.append(f"the final history holds iterations {sorted(history)[:3]}..., not 1..{self.args.iters}")
        wrong = [it for it, row in history.items() if row != reference.get(it)]
        if wrong:
            problems.append(f"final history differs from the reference at iterations {wrong[:10]}")
        if mismatched:
            problems.append(f"logged values differ from the reference at (attempt, iteration) {mismatched[:10]}")
        if len(kills) < self.args.kills or len(terms) < self.args.terms:
            problems.append(f"only {len(kills)} kills and {len(terms)} SIGTERM stops happened before the run "
                            "finished (raise --iters if it ran out of iterations)")
        leftovers = sorted(os.listdir(self.save))
        run_total = sum(len(a.logged) for a in self.attempts)
        moments = {m: sum(a.event == f"kill:{m}" for a in kills) for m in KILL_MOMENTS}
        windows = {m: sum(a.event == f"term:{m}" for a in terms) for m in TERM_MOMENTS}
        say("")
        say("=" * 78)
        say(f"soak summary ({elapsed / 60:.1f} min): {self.args.iters} iterations, {len(self.attempts)} attempts "
            f"({len(self.attempts) - 1} requeues), {self.args.nproc} workers each")
        say(f"  SIGKILL of the whole job:   {len(kills)} (during a checkpoint write {moments['saving']}, while "
            f"training {moments['training']}, at a random time after launch {moments['launch']})")
        say(f"  SIGTERM to worker groups:   {len(terms)} (start-up {windows['startup']}, helper start "
            f"{windows['helper']}, training {windows['training']}, during a checkpoint write {windows['saving']}; "
            f"exit codes {[a.worker_codes or a.exit_code for a in terms]})")
        if final.event == "final:teardown":
            say(f"  SIGTERM in the teardown:    {'sent' if final.fired else 'not sent (the job ended first)'}, "
                f"after the final save; exit {final.exit_code}")
        say(f"  iterations run:             {run_total} ({run_total - len(history)} redone)")
        say(f"  save directory at the end:  {leftovers}")
        say(f"  result:                     {'PASS' if not problems else 'FAIL'}: final trajectory "
            f"{'equals' if not wrong and history else 'DIFFERS FROM'} the uninterrupted run bit for bit "
            f"({len(history)} iterations compared; {run_total} logged rows checked)")
        for p in problems:
            say(f"  problem: {p}")
        return 0 if not problems else 1


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/megatron_tgdpo_soak", help="scratch directory (emptied first)")
    parser.add_argument("--iters", type=int, default=120)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--terms", type=int, default=8)
    parser.add_argument("--startup-window", type=float, default=12.0,
                        help="seconds after the stop handlers are installed in which a start-up SIGTERM lands")
    parser.add_argument("--no-teardown-term", dest="teardown_term", action="store_false",
                        help="let the final attempt finish without a SIGTERM after its final save")
    parser.add_argument("--save-interval", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return Soak(parser.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
