"""The loopback ports the suite's jobs take (``megatron_tgdpo.testing.free_port``): below the kernel's
ephemeral range, where no process's bind(0) or outgoing connection can take one between the pick and the
job's bind, and a block of its own for each pytest-xdist worker."""
from __future__ import annotations

import socket

from megatron_tgdpo import testing


def _ephemeral_low() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
        return int(handle.read().split()[0])


def test_each_worker_takes_ports_of_its_own_block_below_the_ephemeral_range(monkeypatch):
    seen = {}
    for worker in ("", "gw0", "gw1", "gw7"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        seen[worker] = {testing.free_port() for _ in range(3)}
        assert len(seen[worker]) == 3, f"{worker or 'no worker'}: a port handed out twice in a row"
    if _ephemeral_low() < 29000:  # no room below the range on this machine: the kernel's choice
        return
    for worker, ports in seen.items():
        assert all(port < _ephemeral_low() for port in ports), (worker, ports)
    blocks = {worker: {port // 500 for port in ports} for worker, ports in seen.items()}
    assert all(len(block) == 1 for block in blocks.values()), blocks
    assert len({min(block) for block in blocks.values()}) == len(blocks), f"two workers share a block: {blocks}"


def test_a_port_in_use_is_skipped(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    port = testing.free_port()
    if _ephemeral_low() < 29000:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", port + 1))  # the next port of the block
        taken.listen()
        following = testing.free_port()
    assert following not in (port, port + 1) and following // 500 == port // 500
