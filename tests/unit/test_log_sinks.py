"""Logging never fails a run: summary.json on a full disk, rows of redone steps, the start-up probe, and
the stop handler a command installs before anything else."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tgdpo.monitoring import MetricsLogger
from megatron_tgdpo.runtime import save_dir

ROOT = Path(__file__).resolve().parents[2]


def _logger(log_dir: Path) -> MetricsLogger:
    return MetricsLogger(log_dir=str(log_dir), enabled=True, total_iters=10, tensorboard=False)


def _iterations(log_dir: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_rows_of_redone_steps_are_dropped_on_resume(tmp_path, capsys):
    first = _logger(tmp_path)
    for it in range(1, 6):
        first.log_step(it, {"loss": 0.1 * it})
    first.jsonl.write('{"iteration": 6, "lo')  # a kill in the middle of a row
    first.close()
    resumed = _logger(tmp_path)
    resumed.drop_rows_after(3)  # the checkpoint it resumes from
    resumed.log_step(4, {"loss": 0.4})
    resumed.close()
    assert _iterations(tmp_path) == [1, 2, 3, 4]
    assert "warning" not in capsys.readouterr().out


def test_drop_rows_after_keeps_a_log_that_has_nothing_to_drop_untouched(tmp_path):
    logger = _logger(tmp_path)
    logger.log_step(1, {"loss": 0.1})
    before = os.stat(tmp_path / "metrics.jsonl").st_ino
    logger.drop_rows_after(1)
    logger.log_step(2, {"loss": 0.2})
    logger.close()
    assert _iterations(tmp_path) == [1, 2]
    assert os.stat(tmp_path / "metrics.jsonl").st_ino == before  # not rewritten


def _full_disk(monkeypatch, *, on: str) -> None:
    """``open`` for writing a file whose name contains ``on`` fails as on a full disk."""
    import builtins

    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if on in str(file) and any(c in mode for c in "wa"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)


def test_summary_on_a_full_disk_warns_once_with_the_metrics(tmp_path, monkeypatch, capsys):
    logger = _logger(tmp_path)
    logger.jsonl.close()
    logger.jsonl = open(os.devnull, "w")  # noqa: SIM115 - closed by the logger
    _full_disk(monkeypatch, on="summary.json")
    logger.write_json("summary.json", {"after": {"loss": 0.1}})
    logger.write_json("summary.json", {"after": {"loss": 0.1}})
    logger.close()
    out = capsys.readouterr().out
    assert out.count("warning: cannot write metrics") == 1, out
    assert "summary.json" in out and "No space left on device" in out
    assert not list(tmp_path.glob("summary.json*"))  # no partial file left


def test_summary_is_written_atomically_where_it_can_be(tmp_path):
    logger = _logger(tmp_path)
    logger.write_json("summary.json", {"iterations": 3})
    logger.close()
    assert json.loads((tmp_path / "summary.json").read_text()) == {"iterations": 3}
    assert not MetricsLogger(log_dir=str(tmp_path), enabled=False, total_iters=1).log_dir  # other ranks: nothing


def test_a_refused_start_on_a_full_disk_leaves_no_probe_file(tmp_path, monkeypatch):
    real = Path.write_bytes

    def write_bytes(self, data):  # the file is created, then the disk is full
        self.touch()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    problem = save_dir.check_writable(tmp_path / "save", flag="--save")
    monkeypatch.setattr(Path, "write_bytes", real)
    assert problem is not None and "--save" in problem and "No space left on device" in problem
    assert list((tmp_path / "save").iterdir()) == []


@pytest.mark.parametrize("module", ["megatron_tgdpo.train", "megatron_tgdpo.ppo"])
def test_the_command_installs_its_stop_handler_before_any_heavy_import(module):
    """Run as ``__main__`` up to its first statement only: the handler is there and neither torch nor
    megatron-core has been imported yet (so a signal during those imports only sets the flag)."""
    probe = (
        "import runpy, signal, sys\n"
        "class Stop(Exception): pass\n"
        "def audit(event, args):\n"
        "    if event == 'import' and args[0] in ('torch', 'megatron'):\n"
        "        raise Stop(args[0])\n"
        "sys.addaudithook(audit)\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        "except Stop as exc:\n"
        "    handler = signal.getsignal(signal.SIGTERM)\n"
        "    print('first heavy import', exc, 'handler', getattr(handler, '__qualname__', handler))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)
    assert "first heavy import" in out.stdout, out.stdout + out.stderr
    assert "handler StopRequest._handler" in out.stdout, out.stdout


def test_the_handler_only_sets_a_flag_and_signals_are_ignored_once_the_outcome_is_known():
    from megatron_tgdpo.runtime import signals

    previous = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
    try:
        stop = signals.StopRequest()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.flag and stop.reason == "SIGUSR1"
        stop.ignore_from_now()
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in signals.STOP_SIGNALS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
