"""Run a function on N gloo ranks, forked from the current (already-imported) process.

Used by the test-suite and by benchmarks that want a multi-rank CPU run without ``torchrun``:
forking costs ~0.1 s per rank because torch and megatron-core are already imported in the parent,
where one ``torchrun`` per test costs 6-10 s.

    results = run_on_ranks(2, my_fn, x, tensor_model_parallel_size=2)

Each rank starts gloo on a fresh loopback port, sets up megatron-core parallel state with the given
sizes, calls ``fn(*args, **kwargs)`` and ships the (picklable) return value back. If any rank raises,
the parent raises :class:`RankFailure` that carries every failing rank's traceback. Each rank is put in
its own process group and the whole group is killed afterwards, so helpers that megatron-core spawns
(the checkpoint writer's multiprocessing manager) never outlive the test.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import traceback
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megatron_tgdpo import distributed

__all__ = ["TIMING_METRICS", "RankFailure", "TrainingJob", "free_port", "quiet_env", "read_metrics", "run_command",
           "run_on_ranks", "run_train", "simulate_ddp", "torchrun", "user_env"]


class RankFailure(AssertionError):
    """One or more ranks failed; the message holds each failing rank's traceback."""


_PRELOADED = False
_GRACE_AFTER_FAILURE = 5.0  # seconds the other ranks get to report once one rank has failed


# Loopback ports for the jobs a test starts. A port picked as free is closed again before the job binds it,
# so another process can take it in between. The kernel hands out ports for bind(0) and outgoing connections
# only inside net.ipv4.ip_local_port_range (32768-60999 by default), and every gloo rank binds several such
# ports while it starts: a port below that range is safe from them. Under pytest-xdist each worker takes
# its ports from a block of its own, so two workers never pick the same port at the same time.
_PORT_BLOCKS = range(20000, 29000, 500)  # 18 blocks, clear of torch's default MASTER_PORT 29500
_port_lock = threading.Lock()
_port_next: dict[int, int] = {}


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on the loopback interface now, for a job's ``MASTER_PORT``: the next free one of this
    process's block (pytest-xdist worker ``gwN``: block N + 1; any other process: block 0), or the kernel's
    choice where the machine's ephemeral range leaves no room below it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    start = _PORT_BLOCKS[index % len(_PORT_BLOCKS)]
    size = _PORT_BLOCKS.step
    if start + size > _ephemeral_low():
        return distributed.free_port()
    with _port_lock:
        # Start at an offset of this process's own, so that two sessions on one machine rarely meet.
        offset = _port_next.get(start, os.getpid() % size)
        for step in range(size):
            port = start + (offset + step) % size
            if _bindable(port):
                _port_next[start] = (offset + step + 1) % size
                return port
    return distributed.free_port()


def _preload() -> None:
    """Import the heavy modules once in the parent so that every forked rank inherits them
    (megatron-core's import alone takes 4-10 s on 2 cores; paid per rank otherwise)."""
    global _PRELOADED
    if not _PRELOADED:
        import megatron.core.dist_checkpointing  # noqa: F401

        import megatron_tgdpo.train  # noqa: F401 - pulls in megatron-core, models, data, losses, ops

        _PRELOADED = True


def _rank_main(rank: int, world_size: int, port: int, conn, fn, args, kwargs, parallel: dict) -> None:
    os.setpgrp()  # so the parent can kill this rank and everything it spawned in one call
    status: tuple[str, Any]
    try:
        import torch

        torch.set_num_threads(1)
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        from megatron_tgdpo import distributed

        distributed.init_process_group(distributed.read_launch_env())
        if parallel is not None:
            distributed.init_model_parallel(**parallel)
        status = ("ok", fn(*args, **kwargs))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        status = ("error", traceback.format_exc())
    # Plain pickle, not multiprocessing's: with torch.multiprocessing imported, the latter sends tensors
    # as shared-memory handles that the parent would fetch from this (by then exited) process.
    try:
        payload = pickle.dumps(status)
    except Exception:  # noqa: BLE001 - an unpicklable result is a failure too
        payload = pickle.dumps(("error", f"rank {rank}: result could not be pickled:\n{traceback.format_exc()}"))
    conn.send_bytes(payload)
    conn.close()
    # Never exit on our own: a rank that finished (or failed) early would tear down its gloo
    # connections while slower ranks are still completing start-up or a collective with it. The
    # parent kills this rank's whole process group once every rank has reported (or failed).
    while True:
        signal.pause()


def run_on_ranks(*args: Any, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked gloo ranks; return each rank's result.

    Signature: ``run_on_ranks(world_size, fn, *args, tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1, context_parallel_size=1, virtual_pipeline_model_parallel_size=None,
    model_parallel=True, seed=1234, timeout=180.0, **kwargs)``. With ``model_parallel=False`` only the
    process group is created (no megatron-core state). A start-up that loses its loopback port to
    another process (the port is free when picked, taken before the ranks bind it) is retried once.
    """
    try:
        return _run_on_ranks(*args, **kwargs)
    except RankFailure as exc:
        if "Address already in use" not in str(exc) and "EADDRINUSE" not in str(exc):
            raise
        return _run_on_ranks(*args, **kwargs)


def _run_on_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    model_parallel: bool = True,
    seed: int = 1234,
    timeout: float = 180.0,
    **kwargs: Any,
) -> list[Any]:
    _preload()
    ctx = mp.get_context("fork")
    port = free_port()
    parallel = None
    if model_parallel:
        parallel = dict(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            seed=seed,
        )
    procs, conns = [], []
    for rank in range(world_size):
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_rank_main, args=(rank, world_size, port, child_conn, fn, args, kwargs, parallel)
        )
        proc.start()
        child_conn.close()
        procs.append(proc)
        conns.append(parent_conn)

    results: list[Any] = [None] * world_size
    errors: dict[int, str] = {}
    pending = dict(enumerate(conns))
    deadline = time.monotonic() + timeout
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = (f"no result within {timeout:.0f}s (hung or deadlocked)" if not errors else
                       "did not finish: another rank failed first (see above)")
                errors.update({rank: why for rank in pending})
                break
            for conn in mp_connection.wait(list(pending.values()), timeout=remaining):
                rank = next(r for r, c in pending.items() if c is conn)
                del pending[rank]
                try:
                    kind, payload = pickle.loads(conn.recv_bytes())
                except EOFError:
                    kind, payload = "error", "process died without reporting (killed or crashed)"
                if kind == "ok":
                    results[rank] = payload
                else:
                    if not errors:  # give the others a moment to report their own failures, no more
                        deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE)
                    errors[rank] = payload
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in procs:
            proc.join(timeout=10)
    if errors:
        report = "\n".join(f"----- rank {r} -----\n{tb}" for r, tb in sorted(errors.items()))
        raise RankFailure(f"{len(errors)} of {world_size} ranks failed:\n{report}")
    return results


def simulate_ddp(param: Any, grad_dtype: Any = None) -> Any:
    """What megatron-core DDP does to a parameter, without DDP: a ``main_grad`` buffer (fp32 unless
    ``grad_dtype``), ``grad_added_to_main_grad``, and a post-hook on its AccumulateGrad node that adds
    ``param.grad`` to ``main_grad`` and clears it. Returns ``main_grad`` (tests of the fused head)."""
    import torch

    param.main_grad = torch.zeros(param.shape, dtype=grad_dtype or torch.float32)
    param.grad_added_to_main_grad = False
    accumulate = param.expand_as(param).grad_fn.next_functions[0][0]

    def hook(*_: Any) -> None:
        if param.grad is not None and not param.grad_added_to_main_grad:
            param.main_grad.add_(param.grad.data)
        param.grad = None

    accumulate.register_hook(hook)
    param._test_grad_acc = accumulate  # megatron keeps the node alive the same way (DDP.grad_accs)
    return param.main_grad


def run_train(argv: Sequence[str]) -> int:
    """``python -m megatron_tgdpo.train ARGV`` inside this process (one rank of :func:`run_on_ranks`);
    returns its exit code."""
    from megatron_tgdpo import train
    from megatron_tgdpo.config import parse_args

    return train.run(parse_args(list(argv)))


def read_metrics(log_dir: Path) -> list[dict]:
    """Every row of ``LOG_DIR/metrics.jsonl``, in order."""
    import json

    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Commands run as a user runs them: child processes with their own session and their own port
# ----------------------------------------------------------------------------------------------

def quiet_env(**extra: str) -> dict[str, str]:
    """This environment for a child command: one OpenMP thread per process (the machine's cores go to the
    ranks) and Python warnings off, so that the output checked is the command's own."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)


def user_env(**extra: str) -> dict[str, str]:
    """This environment as a user has it: Python's default warning settings and no verbose switch, so a
    library warning that reaches the console is seen."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "MEGATRON_TGDPO_VERBOSE")}
    environ.update(extra)
    return environ


def torchrun(nproc: int) -> list[str]:
    """``python -m torch.distributed.run --nproc-per-node NPROC`` on a loopback port free now: append
    ``-m module flags`` to it."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]


def run_command(args: Sequence[Any], *, cwd: Path, env: Optional[dict] = None, timeout: float = 300):
    """Run ``args`` to completion in a session of its own (a test's interrupt does not reach it; its
    children go with it); returns the ``subprocess.CompletedProcess`` with text stdout and stderr.
    ``env``: :func:`quiet_env` unless given."""
    import subprocess

    return subprocess.run([str(a) for a in args], cwd=cwd, env=quiet_env() if env is None else env,
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


# ----------------------------------------------------------------------------------------------
# Training jobs launched the way a cluster launches them (the reliability tests, tools/soak_preemption.py)
# ----------------------------------------------------------------------------------------------

#: metrics.jsonl keys that measure the machine, not the training: left out of bit-for-bit comparisons.
TIMING_METRICS = frozenset({"tokens_per_s", "real_tokens_per_s", "pairs_per_s", "tflops", "step_time_s", "mfu"})
_JOB_ENV = "MEGATRON_TGDPO_TEST_JOB"


def _job_token(proc: Any) -> Optional[str]:
    import psutil

    try:
        return proc.environ().get(_JOB_ENV)
    except psutil.Error:
        return None


def _alive(proc: Any) -> bool:
    """Running and not a zombie (a zombie has exited; only its exit status is left to collect)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TrainingJob:
    """``python -m megatron_tgdpo.train FLAGS`` under ``torchrun --nproc-per-node NPROC`` (``nproc`` 0: one
    plain process), in a session of its own, output to ``out``. Every process of the job inherits a
    token in its environment, which finds them all, orphans included (a reused pid does not carry it)."""

    def __init__(self, flags: Sequence[Any], *, out: Path, nproc: int, cwd: Path, env: Optional[dict] = None):
        import subprocess
        import sys

        self.nproc, self.out_path = nproc, Path(out)
        launcher = torchrun(nproc) if nproc > 0 else [sys.executable]
        self.token = f"{os.getpid()}-{self.out_path.name}-{time.time_ns()}"
        environ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}),
                       **{_JOB_ENV: self.token})
        with open(self.out_path, "w") as handle:
            self.proc = subprocess.Popen([*launcher, "-m", "megatron_tgdpo.train", *map(str, flags)], cwd=cwd,
                                         env=environ, stdout=handle, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def workers(self) -> list:
        """The trainer processes (``psutil.Process``): the launcher's children, or the launcher itself."""
        import psutil

        try:
            launcher = psutil.Process(self.proc.pid)
            if self.nproc == 0:
                return [launcher]
            return [p for p in launcher.children() if "megatron_tgdpo.train" in " ".join(p.cmdline())]
        except psutil.NoSuchProcess:
            return []

    def processes(self) -> list:
        """Every live process of the job: the launcher's descendants and every process carrying its token."""
        import contextlib

        import psutil

        found: dict = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            launcher = psutil.Process(self.proc.pid)
            found[launcher.pid] = launcher
            found.update((p.pid, p) for p in launcher.children(recursive=True))
        for p in psutil.process_iter():
            if p.pid not in found and _job_token(p) == self.token:
                found[p.pid] = p
        return [p for p in found.values() if _alive(p)]

    def signal_worker_groups(self, sig: signal.Signals, *, missing_ok: bool = False) -> list[int]:
        """``sig`` to the process group of every worker (as SLURM does to every task): the workers and the
        helpers they started. Returns the worker pids signalled; ``missing_ok``: a worker that has just
        exited is skipped instead of raising."""
        pids = []
        for worker in self.workers():
            try:
                os.killpg(worker.pid, sig)
            except ProcessLookupError:
                if not missing_ok:
                    raise
                continue
            pids.append(worker.pid)
        return pids

    def kill_all(self) -> None:
        """SIGKILL to every process of the job at once (what a scheduler's hard kill does)."""
        import contextlib

        import psutil

        for p in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def survivors(self, within: float = 10.0) -> list[str]:
        """The job's processes still alive ``within`` seconds from now (found by their token: orphans
        too), as ``"pid command"`` lines; empty when everything exited in time."""
        deadline = time.monotonic() + within
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in self.processes()]
