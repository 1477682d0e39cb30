"""Process start-up: torchrun or SLURM environment, backend per device, megatron-core parallel state."""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_tgdpo import compat


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from torchrun or SLURM variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int  # 0 for a single process: it needs no rendezvous port
    launcher: str  # "torchrun", "slurm" or "single"


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as ``gpu[012-015,020],cpu7`` -> ``gpu012``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is empty; set MASTER_ADDR to the first node's address")
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR explicitly")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a job's ``MASTER_PORT`` on this machine)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """torchrun variables win; otherwise SLURM (``srun``); otherwise a single process.

    A single process ignores ``MASTER_ADDR``/``MASTER_PORT``: it is a world of one and starts
    torch.distributed on an in-process store, so it never binds (or waits for) a TCP port."""
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")


_DEVICE: torch.device | None = None


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def current_device() -> torch.device:
    """This process's device, chosen once at start-up (the CPU before :func:`init_process_group`)."""
    if _DEVICE is not None:
        return _DEVICE
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def launch_rank(environ: dict[str, str] | None = None) -> int:
    """This process's global rank from the launcher's variables, before torch.distributed starts
    (so that only rank 0 prints start-up errors)."""
    env = os.environ if environ is None else environ
    for var in ("RANK", "SLURM_PROCID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return 0


def init_process_group(launch: LaunchEnv, *, timeout_minutes: int = 30) -> torch.device:
    """Start torch.distributed (NCCL on CUDA, gloo on CPU) and return this rank's device.

    Under a launcher (torchrun, srun) the process also asks to be killed when the launcher dies, so a
    SIGKILLed launcher leaves no worker running (and writing checkpoints) behind."""
    global _DEVICE
    device = device_for(launch.local_rank)
    _DEVICE = device
    if launch.launcher != "single":
        from megatron_tgdpo.runtime.lifecycle import set_parent_death_signal

        set_parent_death_signal()
    if device.type == "cpu":
        compat.apply_cpu_shims()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if launch.launcher == "single":
            # A world of one has no peer to meet: an in-process store instead of a TCP rendezvous, so
            # that two single-process commands on one machine never contend for a port.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=timeout,
            )
    return device


def init_model_parallel(
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    seed: int = 1234,
) -> None:
    """megatron-core parallel groups plus its model-parallel RNG tracker, seeded."""
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % model_parallel != 0:
        raise ValueError(
            f"world size {world} is not divisible by TP*PP*CP = {tensor_model_parallel_size}*"
            f"{pipeline_model_parallel_size}*{context_parallel_size}; change the parallel sizes or the rank count"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron-core state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
