"""MetricsLogger's optional sinks: W&B missing, failing or offline never stops training, and says so once."""
from __future__ import annotations

import json
import sys
import types

from megatron_tgdpo.config import parse_args
from megatron_tgdpo.monitoring import MetricsLogger, wandb_mode

STEP = {"loss": 0.5, "rewards/accuracy": 1.0, "step_time_s": 0.1}


def _cfg(tmp_path, *extra):
    return parse_args(["--log-dir", str(tmp_path / "log"), "--no-tensorboard", "--wandb-project", "p", *extra])


class _FakeRun:
    name, dir = "fake-run", None

    def __init__(self, fail_log=False):
        self.fail_log, self.logged, self.finished = fail_log, [], False

    def log(self, metrics, step):
        if self.fail_log:
            raise ConnectionError("network is unreachable")
        self.logged.append((step, metrics))

    def finish(self):
        self.finished = True


def _fake_wandb(monkeypatch, run):
    module = types.ModuleType("wandb")
    module.Settings = lambda **kw: kw
    module.calls = []

    def init(**kwargs):
        module.calls.append(kwargs)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def _no_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_missing_wandb_says_how_to_install_it_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    logger = MetricsLogger.for_run(_cfg(tmp_path), enabled=True, total_iters=2)
    logger.log_step(1, STEP)
    logger.close()
    out = capsys.readouterr().out
    assert "wandb package is not installed (pip install wandb" in out
    assert json.loads((tmp_path / "log" / "metrics.jsonl").read_text())["loss"] == 0.5


def test_a_failing_wandb_is_reported_once_and_dropped(tmp_path, monkeypatch, capsys):
    _no_credentials(monkeypatch, tmp_path)
    run = _FakeRun(fail_log=True)
    _fake_wandb(monkeypatch, run)
    logger = MetricsLogger.for_run(_cfg(tmp_path), enabled=True, total_iters=3)
    for it in (1, 2, 3):
        logger.log_step(it, STEP)
    logger.close()
    out = capsys.readouterr().out
    assert out.count("cannot write metrics to W&B (network is unreachable)") == 1
    assert len((tmp_path / "log" / "metrics.jsonl").read_text().splitlines()) == 3  # the other sinks go on


def test_wandb_gets_the_step_metrics_the_config_and_runs_offline_without_a_key(tmp_path, monkeypatch, capsys):
    _no_credentials(monkeypatch, tmp_path)
    run = _FakeRun()
    module = _fake_wandb(monkeypatch, run)
    cfg = _cfg(tmp_path, "--wandb-exp-name", "n1")
    logger = MetricsLogger.for_run(cfg, enabled=True, total_iters=1)
    logger.log_step(1, STEP)
    logger.close()
    (call,) = module.calls
    assert call["project"] == "p" and call["name"] == "n1" and call["mode"] == "offline"
    assert call["dir"] == str(tmp_path / "log") and call["config"] == cfg.to_dict()  # default dir: --log-dir
    assert call["settings"]["console"] == "off"
    assert run.logged == [(1, STEP)] and run.finished
    assert "offline: no W&B API key" in capsys.readouterr().out


def test_only_the_enabled_rank_starts_wandb(tmp_path, monkeypatch):
    module = _fake_wandb(monkeypatch, _FakeRun())
    MetricsLogger.for_run(_cfg(tmp_path), enabled=False, total_iters=1).close()
    assert module.calls == []


def test_wandb_mode_follows_the_environment_and_the_key(tmp_path, monkeypatch):
    _no_credentials(monkeypatch, tmp_path)
    assert wandb_mode()[0] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode()[0] is None  # W&B's own default (online)
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    (tmp_path / "home" / ".netrc").chmod(0o600)
    assert wandb_mode()[0] is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == (None, "WANDB_MODE=disabled")


def test_attention_span_counts_each_packed_sequence_not_the_row():
    """The FLOP model's attention span: a padded row's width; in a packed row, each token's own segment
    (the local and TE thd paths attend per segment), i.e. sum(n_i^2) / sum(n_i)."""
    import torch

    from megatron_tgdpo.data.batch import Batch
    from megatron_tgdpo.monitoring import attention_span

    padded = Batch.from_rows({"input_ids": torch.zeros(4, 32, dtype=torch.long)}, num_pairs=2)
    assert attention_span([padded]) == 32
    ids = torch.zeros(1, 16, dtype=torch.long)
    packed = Batch.from_packed({"input_ids": ids, "cu_seqlens": torch.tensor([0, 4, 10, 16]),
                                "sequence_ids": torch.zeros_like(ids)}, num_pairs=1, num_sequences=3)
    assert attention_span([packed]) == (4 * 4 + 6 * 6 + 6 * 6) / 16
    # Mixed: weighted by positions.
    assert attention_span([padded, packed]) == (128 * 32 + 88) / (128 + 16)
