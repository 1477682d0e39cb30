"""Progress and metrics: rank-0 console lines, ``metrics.jsonl``, TensorBoard, Weights & Biases, FLOPs.

Every sink gets the same record per logged step (the ``metrics.jsonl`` line). TensorBoard and W&B are
optional: a sink that cannot be started or written is reported once and dropped; training goes on.

W&B (``--wandb-project``, ``--wandb-exp-name``, ``--wandb-save-dir``; Megatron's names) logs from rank 0
only, with the run's config. Without an API key (``WANDB_API_KEY``, ``wandb login``) it runs offline
into ``<wandb-save-dir>/wandb/offline-run-*`` (upload later with ``wandb sync``); ``WANDB_MODE`` set in
the environment is obeyed as W&B does.

(Named ``monitoring`` rather than ``logging`` so it never shadows the standard library module.)
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

VERBOSE_ENV = "MEGATRON_TGDPO_VERBOSE"


def verbose_requested(flag: bool = False) -> bool:
    """``--verbose`` or ``MEGATRON_TGDPO_VERBOSE=1``: show library warnings and chatter."""
    return flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")

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


def attention_span(batches: Sequence[Any]) -> float:
    """The token-weighted mean number of positions a token's attention spans over ``data.batch.Batch``
    objects, for :class:`FlopModel`: a padded row's width, or the length of the packed segment the token
    sits in (a packed row attends per sequence, so counting the whole row would credit it with scores
    nobody computes)."""
    spans = positions = 0
    for batch in batches:
        if getattr(batch, "packed", False):  # other batch types (PPO's prompts) are rows
            bounds = batch.segment_bounds()
            spans += sum((end - start) ** 2 for start, end in zip(bounds[:-1], bounds[1:]))
            positions += bounds[-1]
        else:
            spans += batch.num_tokens * batch.shape[1]
            positions += batch.num_tokens
    return spans / positions if positions else 0.0


# ---- process memory on CPU (the benchmarks' peak-memory probes; Linux, glibc) --------------------------


def process_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def mmap_large_blocks(threshold: int = 2**20) -> bool:
    """Make glibc serve every block >= ``threshold`` by mmap and unmap it on free, so the resident set
    follows live tensors rather than the allocator's history (glibc otherwise raises its mmap threshold
    dynamically up to 32 MiB and keeps freed blocks below it in the heap). Call before forking ranks."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_free_heap() -> None:
    """Collect garbage and give freed heap back to the OS, so a baseline RSS is live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass



class PeakMemory:
    """Peak memory over a stretch of code (the benchmarks' meter). CUDA: ``max_memory_allocated``. CPU:
    the kernel's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), or,
    where the kernel refuses the reset, ``VmRSS`` sampled every 0.5 ms by a thread (may miss short peaks).

        with PeakMemory(device) as meter:      # or meter.start() ... meter.stop()
            ...
        meter.peak          # bytes over what was resident/allocated at the start
        meter.absolute      # the peak itself
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = self.absolute = self.peak = 0
        self._sampler: Optional[Any] = None

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "VmHWM via /proc/self/clear_refs" if reset_peak_rss() else "VmRSS sampled every 0.5 ms"

    @staticmethod
    def current(device: torch.device) -> int:
        """Allocated (CUDA) or resident (CPU) bytes now."""
        if device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return process_status_bytes("VmRSS")

    def __enter__(self) -> "PeakMemory":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        import threading

        release_free_heap()
        self.base = self.current(self.device)
        self._sampler = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif not reset_peak_rss():
            self._sampled, self._stop = self.base, threading.Event()

            def sample() -> None:
                while not self._stop.is_set():
                    self._sampled = max(self._sampled, process_status_bytes("VmRSS"))
                    time.sleep(0.0005)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.absolute = torch.cuda.max_memory_allocated()
        elif self._sampler is None:
            self.absolute = process_status_bytes("VmHWM")
        else:
            self._stop.set()
            self._sampler.join()
            self.absolute = self._sampled
        self.peak = max(0, self.absolute - self.base)

@dataclass(frozen=True)
class WandbSettings:
    """What ``wandb.init`` gets (see the module docstring)."""

    project: str
    name: Optional[str] = None
    save_dir: str = "."
    config: dict = field(default_factory=dict)
    verbose: bool = False


def _has_wandb_credentials() -> bool:
    """An API key W&B would find: ``WANDB_API_KEY``, an identity token file, or ``wandb login``'s netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
        path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
        return os.path.isfile(path) and netrc.netrc(path).authenticators(host) is not None
    except Exception:  # noqa: BLE001 - an unreadable netrc: no key
        return False


def wandb_mode() -> tuple[Optional[str], str]:
    """(mode for ``wandb.init``, why): W&B's own choice when ``WANDB_MODE`` is set or an API key exists,
    else ``"offline"``."""
    if os.environ.get("WANDB_MODE"):
        return None, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    if _has_wandb_credentials():
        return None, "online"
    return "offline", "offline: no W&B API key; set WANDB_API_KEY or run `wandb login` to log online"


class MetricsLogger:
    """Writes on one rank only (the caller decides which); a no-op elsewhere."""

    def __init__(self, *, log_dir: Optional[str], enabled: bool, total_iters: int, tensorboard: bool = True,
                 wandb: Optional[WandbSettings] = None):
        self.enabled = enabled
        self.total = total_iters
        self.start = time.monotonic()
        self.first_iteration: Optional[int] = None
        self.jsonl = None
        self.tb = None
        self.wandb = None
        self.log_dir = log_dir if enabled else None
        self._warned: set[str] = set()
        if enabled and log_dir:
            try:
                os.makedirs(log_dir, exist_ok=True)
                self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", buffering=1)
            except OSError as exc:
                self._warn_once(os.path.join(log_dir, "metrics.jsonl"), exc)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))
                except Exception:  # noqa: BLE001 - TensorBoard is optional
                    self.tb = None
        if enabled and wandb is not None:
            self.wandb = self._start_wandb(wandb)

    @classmethod
    def for_run(cls, cfg: Any, *, enabled: bool, total_iters: int) -> "MetricsLogger":
        """The logger a training run's ``TrainConfig`` asks for (``enabled``: on rank 0 only)."""
        wandb = None
        if not cfg.wandb_project and (cfg.wandb_exp_name or cfg.wandb_save_dir) and enabled:
            print("note: --wandb-exp-name / --wandb-save-dir have no effect without --wandb-project", flush=True)
        if cfg.wandb_project:
            wandb = WandbSettings(project=cfg.wandb_project, name=cfg.wandb_exp_name or None,
                                  save_dir=cfg.wandb_save_dir or cfg.log_dir or cfg.save or os.getcwd(),
                                  config=cfg.to_dict(), verbose=verbose_requested(cfg.verbose))
        return cls(log_dir=cfg.log_dir, enabled=enabled, total_iters=total_iters, tensorboard=cfg.tensorboard,
                   wandb=wandb)

    def _start_wandb(self, settings: WandbSettings) -> Any:
        try:
            import wandb
        except ImportError:
            print("warning: --wandb-project is set but the wandb package is not installed (pip install wandb, or "
                  "pip install 'megatron_tgdpo[wandb]'); training continues without W&B", flush=True)
            return None
        mode, why = wandb_mode()
        try:
            os.makedirs(settings.save_dir, exist_ok=True)
            run = wandb.init(
                project=settings.project, name=settings.name, dir=settings.save_dir, config=settings.config,
                mode=mode,
                # console="off": W&B does not wrap this process's stdout/stderr; silent: no "wandb:" banner
                # lines (the one line below says where the run is) unless --verbose.
                settings=wandb.Settings(console="off", silent=not settings.verbose),
            )
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            self._warn_once("W&B", exc)
            return None
        where = os.path.dirname(run.dir) if getattr(run, "dir", None) else settings.save_dir  # <run>/files
        offline = (mode or os.environ.get("WANDB_MODE", "")) in ("offline", "dryrun")
        self.info(f"W&B: run {run.name} of project {settings.project} in {where} ({why}"
                  + (f"; upload it later with `wandb sync {where}`)" if offline else ")"))
        return run

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
        if self.wandb is not None:
            try:
                self.wandb.log({k: _number(v) for k, v in metrics.items()}, step=iteration)
            except Exception as exc:  # noqa: BLE001 - logging must never stop training
                self._warn_once("W&B", exc)
                self.wandb = None
        print(self._console_line(iteration, metrics), flush=True)

    def _write(self, record: dict) -> None:
        if self.jsonl is None:
            return
        try:
            self.jsonl.write(json.dumps(record) + "\n")
        except (OSError, ValueError) as exc:
            self._warn_once(self.jsonl.name, exc)

    def drop_rows_after(self, iteration: int) -> None:
        """A resumed run redoes the steps after its checkpoint: ``metrics.jsonl`` keeps only the rows up to
        ``iteration`` (and no line cut short by a kill), so each step has one row, from the run that
        produced the checkpoint history. Rewritten atomically; a failure is a logging failure."""
        if self.jsonl is None:
            return
        path = self.jsonl.name
        try:
            self.jsonl.close()
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
            kept = [line for line in lines if _row_iteration(line) is not None and _row_iteration(line) <= iteration]
            if len(kept) != len(lines):
                tmp = f"{path}.tmp.{os.getpid()}"
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write("".join(line + "\n" for line in kept))
                os.replace(tmp, path)
            self.jsonl = open(path, "a", buffering=1)
        except OSError as exc:
            self._warn_once(path, exc)
            try:
                self.jsonl = open(path, "a", buffering=1)
            except OSError:
                self.jsonl = None

    def append_jsonl(self, name: str, row: dict) -> None:
        """One JSON line appended to ``<log-dir>/<name>`` (the enabled rank, when there is a log directory);
        a failure (full disk) is a logging failure: warned once, never raised."""
        if not (self.enabled and self.log_dir):
            return
        path = os.path.join(self.log_dir, name)
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        except (OSError, ValueError) as exc:
            self._warn_once(path, exc)

    def write_json(self, name: str, value: Any) -> None:
        """``<log-dir>/<name>`` (the enabled rank, when there is a log directory), replaced atomically; a
        failure (full disk) is a logging failure: warned once, never raised."""
        if not self.log_dir:
            return
        path = os.path.join(self.log_dir, name)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(value, fh, indent=2)
            os.replace(tmp, path)
        except (OSError, ValueError) as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self._warn_once(path, exc)

    def _warn_once(self, what: str, exc: BaseException) -> None:
        """A failing log sink (full disk, lost mount) is reported once; training goes on. One warning for
        the whole log directory (metrics.jsonl, summary.json and TensorBoard share its disk), one for W&B."""
        key = "W&B" if what == "W&B" else "log files"
        if key not in self._warned:
            self._warned.add(key)
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
            try:
                self.tb.close()
            except Exception as exc:  # noqa: BLE001 - a full log disk must not fail a finished run
                self._warn_once("TensorBoard", exc)
            self.tb = None
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            try:
                run.finish()
            except Exception as exc:  # noqa: BLE001 - a failed upload must not fail a finished run
                self._warn_once("W&B", exc)


def _row_iteration(line: str) -> Optional[int]:
    """The iteration of one ``metrics.jsonl`` line; None for a line that is not a whole record."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    value = row.get("iteration") if isinstance(row, dict) else None
    return value if isinstance(value, int) else None


def _number(value):
    """A metric as W&B takes it: a Python number (non-finite floats stay floats)."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
