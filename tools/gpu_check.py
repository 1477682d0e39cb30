#!/usr/bin/env python3
r"""The one-GPU acceptance check: what to run on a machine with one GPU to check an installation.

    tools/gpu_check.sh                  # one GPU, about 6-8 minutes; log + JSON under $OUT or runs/gpu_check
    tools/gpu_check.sh --dry-run        # the same stages on CPU at tiny sizes (a rehearsal of the check
                                        # itself; 10-20 minutes on two cores)
    tools/gpu_check.sh --plan           # print the stages and their commands, run nothing

Run it from a checkout of the repository (the GPU tests and the benchmarks live there) in the
environment you installed megatron_tgdpo's dependencies into. Stages, in order (each a subprocess,
killed with its process group when its time box runs out, so a hang costs at most its box; a failing
stage does not stop the next; the whole run is capped by ``--budget-s``, the later stages getting what
is left):

1. ``wheels``: only when ``import megatron.core`` fails: installs the wheels found in ``.whl/`` of the
   checkout (a wheelhouse for a machine without network access, e.g. megatron-core built for its
   Python) into ``/tmp/site`` (``pip install --no-index --no-deps --no-compile --target``) and puts it
   on ``PYTHONPATH`` for the stages after it. The checkout itself is always put on ``PYTHONPATH``, so
   the check also runs where the package is not installed.
2. ``versions``: python, torch, CUDA, GPU name and memory, driver, megatron-core, TransformerEngine,
   packaging (megatron-core 0.19 needs >= 24.2), numpy, triton, transformers and the other
   dependencies, as JSON in the log.
3. ``pytest-gpu``: ``pytest tests/gpu``: bf16 training through the command line; FP8 vs bf16 where
   TransformerEngine is installed (skipped cleanly otherwise); tensor parallelism where two GPUs are
   visible (skipped with one); the one-GPU parity tests: packed == padded, fused head == plain head.
4. ``bench-logprobs``: ``tools/bench_logprobs.py --head`` at V = 128,256, bf16 and fp32: the plain vs
   the fused LM head + log-probs, time and peak memory.
5. ``bench-step``: ``tools/bench_step.py`` for the llama3.2-1b preset at sequence 4,096 (torchrun, one
   rank): DPO vs TGDPO online vs TGDPO cached vs policy-only, packed vs padded, fused vs plain;
   tokens/s, TFLOP/s, MFU, and the memory estimate (``megatron-tgdpo estimate-memory``) beside the
   measured ``max_memory_allocated`` of every run, with the estimate's error in %.
   ``--fp8-format hybrid`` is added where TransformerEngine is installed (``--fp8 auto``, the default).
6. ``estimate-memory``: ``megatron-tgdpo estimate-memory`` for the benchmark's base run (the table, in
   the log).
7. ``parity-cpu-ranks``: a fast subset of the multi-rank parity tests (TP/SP/PP/VPP/CP model parity,
   vocab-parallel log-probs, the fused head under TP/CP) on gloo CPU ranks with CUDA hidden: two ranks
   cannot share one GPU under NCCL, but these check that this machine's megatron-core, torch and Python
   give the parallel layouts the same numbers as one rank. Last, as the least GPU-specific: it gets
   what is left of the budget.

``--dry-run``: the same stages and commands at tiny sizes on CPU (the GPU tests run on CPU through
``MEGATRON_TGDPO_GPU_TESTS_ON_CPU=1``; bench_step uses the tiny preset; the parity stage one quick file).
Outputs under ``--out`` (default ``$OUT``, else ``runs/gpu_check``): ``gpu_check.log`` (every stage's
command and output), ``gpu_check.json`` (per stage: status, seconds, the pytest summary line or the
benchmark figures), ``bench_step.json``. Exit status 0 when every stage that ran passed, 1 otherwise.
Only the standard library is imported here: the check must start even where megatron-core does not
import yet.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
SITE = "/tmp/site"
GPU_BUDGET_S = 480  # about 8 minutes on one GPU
DRY_BUDGET_S = 2400
ON_CPU_ENV = "MEGATRON_TGDPO_GPU_TESTS_ON_CPU"

# Multi-rank parity tests run on CPU ranks (CUDA hidden) in the GPU check: fast files that cover model
# parallel parity (TP, SP, PP, VPP, CP), the vocab-parallel op and the fused head under TP/CP.
PARITY_TESTS = ("tests/distributed/test_gpt_parallel.py", "tests/distributed/test_logprobs_tp.py",
                "tests/distributed/test_fused_head.py")
PARITY_TESTS_DRY = ("tests/distributed/test_logprobs_tp.py::test_group_resolution",)

VERSIONS_SCRIPT = r"""
import json, platform, subprocess
out = {"python": platform.python_version()}
def version(module):
    try:
        mod = __import__(module, fromlist=["__version__"])
        return str(getattr(mod, "__version__", "installed"))
    except Exception as exc:
        return None
import torch
out.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
               gpu_memory_gib=round(p.total_memory / 2**30, 1))
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        out["driver"] = None
try:
    from megatron.core import package_info
    out["megatron_core"] = package_info.__version__
except Exception as exc:
    out["megatron_core"] = None
    out["megatron_core_error"] = repr(exc)
try:
    import transformer_engine
    out["transformer_engine"] = getattr(transformer_engine, "__version__", "installed")
    import transformer_engine.pytorch  # noqa: F401
    out["te_pytorch"] = True
except Exception:
    out.setdefault("transformer_engine", None)
    out["te_pytorch"] = False
for name in ("packaging", "numpy", "triton", "transformers", "sentencepiece", "tokenizers", "safetensors", "yaml",
             "psutil", "xdist", "wandb"):
    out[name] = version(name)
try:
    from packaging.version import Version
    out["packaging_ok_for_mcore_0_19"] = Version(out["packaging"]) >= Version("24.2")
except Exception:
    out["packaging_ok_for_mcore_0_19"] = None
print("VERSIONS " + json.dumps(out))
"""


@dataclass
class Stage:
    name: str
    argv: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    purpose: str = ""
    #: run only when ``import megatron.core`` fails (the wheel install)
    only_if_mcore_missing: bool = False


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="the same stages on CPU at tiny sizes")
    parser.add_argument("--plan", action="store_true", help="print the stages and their commands; run nothing")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else runs/gpu_check[_dry])")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"cap on the whole run (default {GPU_BUDGET_S} s; --dry-run {DRY_BUDGET_S} s)")
    parser.add_argument("--only", nargs="+", default=None, metavar="STAGE", help="run only these stages")
    parser.add_argument("--skip", nargs="+", default=(), metavar="STAGE", help="skip these stages")
    parser.add_argument("--fp8", choices=("auto", "on", "off"), default="auto",
                        help="bench-step with --fp8-format hybrid: auto = where TransformerEngine imports")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the stages")
    parser.add_argument("--work-dir", default=None,
                        help="scratch space (the bench's data set and 1B guidance checkpoint; default /tmp/gpu_check "
                             "on GPU, runs/gpu_check_dry/work in a dry run); never under --out")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S
    if args.out is None:
        args.out = os.environ.get("OUT") or str(ROOT / ("runs/gpu_check_dry" if args.dry_run else "runs/gpu_check"))
    if args.work_dir is None:
        args.work_dir = str(ROOT / "runs/gpu_check_dry/work") if args.dry_run else "/tmp/gpu_check"
    return args


def plan_stages(args: argparse.Namespace, *, fp8: bool = False, xdist: bool = False,
                gpu_memory_gib: Optional[float] = None) -> list[Stage]:
    """The stages of this run (pure: the test checks the plan without running it). ``gpu_memory_gib``: the
    GPU's memory as the versions stage read it, the capacity the estimate is checked against."""
    py, out, work, dry = args.python, Path(args.out), Path(args.work_dir), args.dry_run
    wheels = sorted(str(p.relative_to(ROOT)) for p in (ROOT / ".whl").glob("*.whl"))
    # --standalone: a local rendezvous on a free port (a fixed port fails whenever another job holds it).
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    if dry:
        logprobs = ["--vocab", "4096", "--tokens", "256", "--hidden", "64", "--dtype", "fp32", "--repeats", "1",
                    "--threads", "1"]
        bench = ["--model", "tiny", "--synthetic-model", "preset", "--seq-length", "128", "--length-scale", "0.0625",
                 "--micro-batch-size", "2",
                 "--global-batch-size", "4", "--steps", "1", "--warmup", "1", "--rounds", "1"]
        estimate = ["--model", "tiny", "--num-gpus", "1", "--micro-batch-size", "2", "--seq-length", "128",
                    "--global-batch-size", "4", "--loss-type", "tgdpo"]
        parity = list(PARITY_TESTS_DRY)
    else:
        logprobs = ["--vocab", "128256", "--dtype", "bf16", "fp32", "--repeats", "3"]
        # --synthetic-model preset: one random 1B checkpoint (reference = guidance = policy start), so every
        # model is loaded from the page cache rather than drawn from a CPU random generator each time.
        bench = ["--model", "llama3.2-1b", "--synthetic-model", "preset", "--bf16", "--seq-length", "4096",
                 "--micro-batch-size", "1", "--global-batch-size", "8", "--steps", "3", "--warmup", "1", "--rounds", "1"]
        estimate = ["--model", "llama3.2-1b", "--bf16", "--num-gpus", "1", "--micro-batch-size", "1",
                    "--seq-length", "4096", "--global-batch-size", "8", "--loss-type", "tgdpo"]
        parity = list(PARITY_TESTS) + (["-n", "8"] if xdist else [])
    if gpu_memory_gib:
        estimate += ["--gpu-memory-gib", f"{gpu_memory_gib:g}"]
    if fp8:
        bench += ["--fp8-format", "hybrid"]
        estimate += ["--fp8-format", "hybrid"]
    pytest = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    # (GPU seconds, dry-run seconds): the GPU boxes add up to about the 480 s budget.
    box = (lambda gpu, cpu: cpu if dry else gpu)  # noqa: E731
    return [
        Stage("wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                         "--upgrade", "--target", SITE, *wheels], box(60, 120),
              purpose="install the wheelhouse .whl/ when megatron-core does not import", only_if_mcore_missing=True),
        Stage("versions", [py, "-c", VERSIONS_SCRIPT], box(30, 120), purpose="python, torch, CUDA, GPU, megatron-core"),
        Stage("pytest-gpu", pytest + ["tests/gpu"], box(120, 900), env={ON_CPU_ENV: "1"} if dry else {},
              purpose="bf16 CLI training; FP8 where TE is installed; one-GPU parity (packed, fused head)"),
        Stage("bench-logprobs", [py, "tools/bench_logprobs.py", "--head", *logprobs], box(45, 300),
              purpose="LM head + log-probs: plain vs fused, time and peak memory"),
        Stage("bench-step", torchrun + ["tools/bench_step.py", *bench, "--work-dir", str(work / "bench_step"),
                                        "--output", str(out / "bench_step.json")], box(210, 1200),
              purpose="step time, tokens/s, TFLOP/s, MFU, memory vs estimate: DPO/TGDPO/cached/policy-only, "
                      "packed/padded, fused/plain"),
        Stage("estimate-memory", [py, "-m", "megatron_tgdpo", "estimate-memory", *estimate], box(15, 120),
              purpose="the estimator's table for the bench's base run"),
        Stage("parity-cpu-ranks", pytest + ["-x", *parity], box(240, 600), env={"CUDA_VISIBLE_DEVICES": ""},
              purpose="multi-rank parity on gloo CPU ranks under this machine's megatron-core/torch/python"),
    ]


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


class Log:
    """The one log file, echoed to stdout (a batch job's output file then shows the progress too)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "w", buffering=1, encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            self.fh.write(text)
            sys.stdout.write(text)
            sys.stdout.flush()

    def line(self, text: str) -> None:
        self.write(text.rstrip("\n") + "\n")


def run_stage(stage: Stage, *, env: dict[str, str], timeout_s: float, log: Log) -> dict:
    """Run one stage in its own process group; returns its record (status passed/failed/timeout)."""
    log.line(f"\n===== {stage.name}: {stage.purpose} (time box {timeout_s:.0f}s)")
    log.line("$ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in stage.env.items()) +
             (" " if stage.env else "") + shlex.join(stage.argv))
    start = time.monotonic()
    tail: list[str] = []
    proc = subprocess.Popen(stage.argv, cwd=ROOT, env={**env, **stage.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            if wait:
                try:
                    proc.wait(wait)
                    return
                except subprocess.TimeoutExpired:
                    pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        for line in proc.stdout:
            log.write(line)
            tail.append(line)
            del tail[:-200]
        proc.wait()
    finally:
        timer.cancel()
    # Whatever the stage left behind in its session (a checkpoint writer, a torchrun worker) goes too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    seconds = time.monotonic() - start
    status = "timeout" if timed_out.is_set() else ("passed" if proc.returncode == 0 else "failed")
    log.line(f"===== {stage.name}: {status} (exit {proc.returncode}) in {seconds:.1f}s")
    return {"name": stage.name, "status": status, "returncode": proc.returncode, "seconds": round(seconds, 1),
            "timeout_s": round(timeout_s, 1), "command": shlex.join(stage.argv), "env": stage.env,
            "purpose": stage.purpose, "tail": "".join(tail[-40:])}


def _summaries(record: dict, *, out: Path) -> None:
    """Pull the figures that matter out of a finished stage's output."""
    tail = record.pop("tail")
    if record["name"] == "versions":
        match = re.search(r"^VERSIONS (\{.*\})$", tail, re.M)
        record["versions"] = json.loads(match.group(1)) if match else None
    elif record["name"].startswith(("pytest", "parity")):
        lines = [ln for ln in tail.splitlines() if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", ln)]
        record["summary"] = lines[-1].strip("= ").strip() if lines else None
        record["skips"] = [ln.strip() for ln in tail.splitlines() if ln.startswith("SKIPPED")]
        record["failures"] = [ln.strip() for ln in tail.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    elif record["name"] == "bench-step":
        path = out / "bench_step.json"
        if path.is_file():
            report = json.loads(path.read_text())
            record["ratios"] = report.get("ratios")
            record["variants"] = {
                name: {k: r.get(k) for k in ("step_time_s", "computed_per_real", "tokens_per_s", "real_tokens_per_s",
                                             "tflops_per_device", "useful_tflops_per_device", "mfu", "useful_mfu",
                                             "peak_memory_bytes", "step_growth_bytes", "estimate_bytes",
                                             "estimate_error_pct")}
                for name, r in report.get("results", {}).items()}
        record["table"] = tail[-6000:]
    else:
        record["output"] = tail[-6000:]


def _mcore_importable(python: str, env: dict[str, str]) -> bool:
    return subprocess.run([python, "-c", "import megatron.core"], cwd=ROOT, env=env, capture_output=True,
                          timeout=300).returncode == 0


def _probe(python: str, env: dict[str, str], code: str) -> bool:
    try:
        return subprocess.run([python, "-c", code], cwd=ROOT, env=env, capture_output=True,
                              timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if args.plan:
        for stage in plan_stages(args):
            argv = [a if a != VERSIONS_SCRIPT else "<versions script>" for a in stage.argv]
            env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in stage.env.items())
            print(f"{stage.name:<17} box {stage.timeout_s:>5.0f}s  {env_text + ' ' if env_text else ''}{shlex.join(argv)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    started = time.monotonic()
    log.line(f"gpu_check {'--dry-run ' if args.dry_run else ''}| {time.strftime('%Y-%m-%d %H:%M:%S')} | budget "
             f"{args.budget_s:.0f}s | out {out} | python {args.python}")
    records: list[dict] = []
    te = xdist = gpu_memory_gib = None
    plan = plan_stages(args)
    selected = [s for s in plan if (args.only is None or s.name in args.only) and s.name not in args.skip]
    for stage in selected:
        left = args.budget_s - (time.monotonic() - started)
        if stage.only_if_mcore_missing:
            if _mcore_importable(args.python, env):
                log.line(f"\n===== {stage.name}: megatron-core imports already: nothing to install")
                records.append({"name": stage.name, "status": "not needed", "seconds": 0.0})
                continue
            if not any(a.endswith(".whl") for a in stage.argv):
                log.line(f"\n===== {stage.name}: megatron-core does not import and .whl/ holds no wheel: install "
                         "megatron-core (pip install -e . in the checkout) or put its wheel in .whl/")
                records.append({"name": stage.name, "status": "failed", "seconds": 0.0})
                continue
        if stage.name in ("bench-step", "estimate-memory", "parity-cpu-ranks"):
            # Planned again with what the machine turned out to have: TransformerEngine, pytest-xdist, GPU memory.
            if te is None and stage.name != "parity-cpu-ranks":
                te = args.fp8 == "on" or (args.fp8 == "auto" and not args.dry_run and
                                          _probe(args.python, env, "import transformer_engine.pytorch"))
            xdist = _probe(args.python, env, "import xdist") if xdist is None else xdist
            stage = next(s for s in plan_stages(args, fp8=bool(te), xdist=xdist, gpu_memory_gib=gpu_memory_gib)
                         if s.name == stage.name)
        if left < 15:
            log.line(f"\n===== {stage.name}: skipped, {left:.0f}s of the budget left")
            records.append({"name": stage.name, "status": "skipped (budget)", "seconds": 0.0})
            continue
        if stage.name == "bench-step":
            (out / "bench_step.json").unlink(missing_ok=True)  # a previous run's figures are not this run's
        record = run_stage(stage, env=env, timeout_s=min(stage.timeout_s, left), log=log)
        _summaries(record, out=out)
        records.append(record)
        if stage.name == "versions":
            gpu_memory_gib = (record.get("versions") or {}).get("gpu_memory_gib")
        if stage.name == "wheels" and record["status"] == "passed":
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), SITE] + [
                p for p in env["PYTHONPATH"].split(os.pathsep) if p and p != str(ROOT)])
            log.line(f"PYTHONPATH={env['PYTHONPATH']}")
    total = time.monotonic() - started
    bad = [r["name"] for r in records if r["status"] in ("failed", "timeout")]
    result = {"mode": "dry-run" if args.dry_run else "gpu", "seconds": round(total, 1), "budget_s": args.budget_s,
              "ok": not bad, "problems": bad, "fp8": bool(te), "stages": records}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    log.line(f"\n===== summary: {len(records)} stages in {total:.0f}s; " +
             "; ".join(f"{r['name']} {r['status']}" + (f" ({r['summary']})" if r.get("summary") else "")
                       for r in records))
    log.line(f"wrote {out / 'gpu_check.log'}, {out / 'gpu_check.json'}" +
             (f", {out / 'bench_step.json'}" if (out / "bench_step.json").is_file() else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
