"""Process start-up from torchrun or SLURM variables."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

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


def test_single_process_needs_no_port():
    """A world of one starts torch.distributed without a TCP rendezvous: its MASTER_PORT (held here by
    another socket, as when another job owns the default 29500) is never bound."""
    code = ("import torch, torch.distributed as dist\n"
            "from megatron_tgdpo import distributed\n"
            "launch = distributed.read_launch_env()\n"
            "assert launch.launcher == 'single' and launch.master_port == 0, launch\n"
            "distributed.init_process_group(launch)\n"
            "t = torch.ones(1); dist.all_reduce(t); assert dist.get_world_size() == 1 and t.item() == 1.0\n"
            "distributed.destroy()\n"
            "print('ok')\n")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
