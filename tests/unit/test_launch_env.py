"""Process start-up from torchrun or SLURM variables."""
from __future__ import annotations

import multiprocessing
import os
import socket

import pytest

from megatron_tgdpo.distributed import first_slurm_host, read_launch_env


@pytest.mark.parametrize(
    "nodelist,first",
    [("gpu012", "gpu012"), ("gpu[012-015,020]", "gpu012"), ("node[7,9]", "node7"), ("a-b[001-002],c", "a-b001"),
     ("cpu7,gpu[1-2]", "cpu7")],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_torchrun_variables_win():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 1, "h", 1234, "torchrun")


def test_slurm_srun():
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                           "SLURM_JOB_NODELIST": "gpu[100-101]"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 16, 5, "gpu100", "slurm")


def test_slurm_master_addr_override():
    env = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[1-2]",
                           "MASTER_ADDR": "10.0.0.5"})
    assert env.master_addr == "10.0.0.5"


def test_single_process_default():
    assert read_launch_env({}).world_size == 1


def _start_single_process(port: int, conn) -> None:
    """In a forked child: a one-process launch with ``MASTER_PORT=port`` (held by the parent); report
    what torch.distributed saw, or the error."""
    try:
        import torch
        import torch.distributed as dist

        from megatron_tgdpo import distributed

        for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
            os.environ.pop(var, None)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        launch = distributed.read_launch_env()
        distributed.init_process_group(launch, timeout_minutes=1)
        tensor = torch.ones(1)
        dist.all_reduce(tensor)
        conn.send(("ok", launch.launcher, launch.master_port, dist.get_world_size(), tensor.item()))
        distributed.destroy()
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def test_single_process_needs_no_port():
    """A world of one starts torch.distributed without a TCP rendezvous: its MASTER_PORT (held here by
    another socket, as when another job owns the default 29500) is never bound."""
    ctx = multiprocessing.get_context("fork")  # torch is imported already: the child starts in ~0.1 s
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_start_single_process, args=(held.getsockname()[1], child))
        proc.start()
        child.close()
        try:
            assert parent.poll(120), "the one-process start hung"
            result = parent.recv()
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert result == ("ok", "single", 0, 1, 1.0), result
