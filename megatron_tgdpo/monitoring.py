"""Progress and metrics: rank-0 console lines, ``metrics.jsonl``, TensorBoard, FLOP accounting.

(Named ``monitoring`` rather than ``logging`` so it never shadows the standard library module.)
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

# Dense bf16 peak of the GPUs we quote MFU for (per device, TFLOP/s).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


@dataclass(frozen=True)
class FlopModel:
    """Matmul FLOPs per token of a Llama network (forward), attention scores included."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int

    def forward_flops_per_token(self, seq_length: int) -> float:
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        kv = h * self.num_query_groups // self.num_attention_heads
        qkv_o = 2 * h * (h + 2 * kv) + 2 * h * h
        mlp = 2 * 3 * h * f
        attn = 2 * 2 * h * seq_length / 2  # QK^T and AV, causal: half the square on average
        return L * (qkv_o + mlp + attn) + 2 * h * self.vocab_size

    def step_flops(self, *, tokens: int, seq_length: int, frozen_models: int) -> float:
        """Policy forward+backward (3x forward) plus forward-only reference/guidance models."""
        per_token = self.forward_flops_per_token(seq_length)
        return tokens * per_token * (3 + frozen_models)


class MetricsLogger:
    """Writes on one rank only (the caller decides which); a no-op elsewhere."""

    def __init__(self, *, log_dir: Optional[str], enabled: bool, total_iters: int, tensorboard: bool = True):
        self.enabled = enabled
        self.total = total_iters
        self.start = time.monotonic()
        self.first_iteration: Optional[int] = None
        self.jsonl = None
        self.tb = None
        self._warned: set[str] = set()
        if enabled and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))
                except Exception:  # noqa: BLE001 - TensorBoard is optional
                    self.tb = None

    def log_step(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.first_iteration is None:
            self.first_iteration = iteration - 1
            self.start = time.monotonic() - metrics.get("step_time_s", 0.0)
        record = {"iteration": iteration, **{k: _plain(v) for k, v in metrics.items()}}
        self._write(record)
        if self.tb:
            try:
                for key, value in record.items():
                    if key != "iteration" and isinstance(value, (int, float)):
                        self.tb.add_scalar(key, value, iteration)
            except Exception as exc:  # noqa: BLE001 - logging must never stop training
                self._warn_once("TensorBoard", exc)
                self.tb = None
        print(self._console_line(iteration, metrics), flush=True)

    def _write(self, record: dict) -> None:
        if self.jsonl is None:
            return
        try:
            self.jsonl.write(json.dumps(record) + "\n")
        except (OSError, ValueError) as exc:
            self._warn_once(self.jsonl.name, exc)

    def _warn_once(self, what: str, exc: BaseException) -> None:
        """A failing metrics sink (full disk, lost mount) is reported once; training goes on."""
        if what not in self._warned:
            self._warned.add(what)
            print(f"warning: cannot write metrics to {what} ({exc}); training continues, further write errors "
                  "are not reported", flush=True)

    # (metric, console label, format): shown when the step recorded it
    CONSOLE = (("loss", "loss", ".4f"), ("rewards/accuracy", "acc", ".3f"), ("rewards/margin", "margin", "+.4f"),
               ("token_accuracy", "tok-acc", ".3f"), ("lr", "lr", ".3e"), ("grad_norm", "grad-norm", ".3f"),
               ("tokens_per_s", "tok/s", ".0f"), ("real_tokens_per_s", "real tok/s", ".0f"),
               ("tflops", "TFLOP/s", ".3g"))

    def _console_line(self, iteration: int, m: dict[str, float]) -> str:
        done = iteration - (self.first_iteration or 0)
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(done, 1) * (self.total - iteration)
        parts = [f"iter {iteration:>6}/{self.total}", f"eta {_duration(eta)}"]
        for key, label, fmt in self.CONSOLE:
            value = m.get(key)
            if isinstance(value, (int, float)):
                parts.append(f"{label} {value:{fmt}}")
        if "mfu" in m:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        if m.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)

    def info(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.jsonl:
            try:
                self.jsonl.close()
            except OSError as exc:
                self._warn_once(self.jsonl.name, exc)
        if self.tb:
            self.tb.close()


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
