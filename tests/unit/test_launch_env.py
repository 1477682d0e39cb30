"""Process start-up from torchrun or SLURM variables."""
from __future__ import annotations

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
