#!/usr/bin/env python
"""Peak memory of checkpoint conversion: it must scale with the largest tensor, not the model.

Synthesises a ~1 GB Llama-like Hugging Face checkpoint (bf16, safetensors, no ``transformers``), then runs
``tools/convert_checkpoint.py`` in subprocesses and reads each converter's peak RSS from the kernel: the
``VmHWM`` (resident high-water mark) of its own address space, printed by the child as it exits. Not
``ru_maxrss``: Linux carries the parent's resident size into a forked child's ``ru_maxrss`` across ``exec``,
so it reports the benchmark process, not the converter.

* hf-to-megatron            (HF -> converted format)
* megatron-to-hf            (converted format -> HF)
* megatron-to-hf torch_dist (a torch_dist checkpoint saved by ``save_checkpoint`` -> HF; ``--no-torch-dist`` skips)

Pass criterion per direction: peak RSS < 3 x largest tensor + overhead, where overhead is the peak RSS of
an idle ``python -c 'import megatron_tgdpo.convert'`` (torch and friends). Exit status 1 if any fails.

    python tools/bench_convert_memory.py [--size-gb 1.0] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLI = ROOT / "tools" / "convert_checkpoint.py"
MiB = 2**20


def bench_arch(size_gb: float):
    """A Llama-2/3-like shape (GQA 4:1, vocab 32000, hidden 2048) with enough layers for ``size_gb`` in bf16."""
    from megatron_tgdpo.models.llama import LlamaArch

    base = dict(hidden_size=2048, num_attention_heads=16, num_query_groups=4, ffn_hidden_size=5632,
                vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0)
    one = LlamaArch(num_layers=1, **base).num_parameters() * 2
    two = LlamaArch(num_layers=2, **base).num_parameters() * 2
    layers = max(1, round((size_gb * 1e9 - (one - (two - one))) / (two - one)))
    return LlamaArch(num_layers=layers, **base)


# Runs a script (argv[1:]) or just the import, then prints this process's VmHWM when the interpreter exits.
_REPORT = (
    "import atexit, sys\n"
    "def _hwm():\n"
    "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "    sys.stderr.write('@@VmHWM ' + line.split()[1] + '\\n')\n"
    "atexit.register(_hwm)\n"
)
_RUN_SCRIPT = _REPORT + "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
_IDLE_IMPORT = _REPORT + "import megatron_tgdpo.convert\n"


def run_measured(args: list[str], *, label: str) -> tuple[int, float]:
    """Run ``python -c <code> args...``, echo its output, return (peak RSS in bytes, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines, hwm_kb = [], None
    for line in proc.stdout:
        if line.startswith("@@VmHWM "):
            hwm_kb = int(line.split()[1])
            continue
        lines.append(line)
        print(f"  [{label}] {line}", end="", flush=True)
    if proc.wait() != 0 or hwm_kb is None:
        raise SystemExit(f"{label} failed with exit status {proc.returncode}:\n{''.join(lines[-20:])}")
    return hwm_kb * 1024, time.monotonic() - start


def make_torch_dist(converted: str, root: str) -> None:
    """Load the converted checkpoint into a bf16 TP=1 model and save it with ``save_checkpoint``."""
    from megatron_tgdpo.testing import run_on_ranks

    def save() -> None:
        from megatron_tgdpo import checkpointing, convert
        from megatron_tgdpo.models import llama

        arch = convert.checkpoint_arch(converted)
        config = llama.transformer_config(arch, llama.ParallelLayout(), llama.Precision(bf16=True))
        chunks = llama.build_model(arch, config)
        convert.load_into_model(converted, chunks)
        checkpointing.save_checkpoint(root, iteration=1, parts={"policy": checkpointing.CheckpointPart(chunks)})

    run_on_ranks(1, save, timeout=1800)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--no-torch-dist", action="store_true", help="skip the torch_dist -> HF direction")
    parser.add_argument("--make-torch-dist", nargs=2, metavar=("CONVERTED", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_torch_dist:
        make_torch_dist(*args.make_torch_dist)
        return 0

    import torch

    from megatron_tgdpo.convert.layout import hf_shapes, megatron_shapes
    from megatron_tgdpo.convert.safetensors_io import tensor_bytes
    from megatron_tgdpo.convert.synthetic import write_synthetic_hf

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        arch = bench_arch(args.size_gb)
        shapes = {**hf_shapes(arch), **megatron_shapes(arch)}
        largest_name = max(shapes, key=lambda n: tensor_bytes(shapes[n], torch.bfloat16))
        largest = tensor_bytes(shapes[largest_name], torch.bfloat16)
        gigabytes = arch.num_parameters() * 2 / 1e9
        print(f"synthesising a {gigabytes:.2f} GB bf16 checkpoint ({arch.num_layers} layers) in {work}")
        hf = write_synthetic_hf(work / "hf", arch, dtype=torch.bfloat16, max_shard_size=2 * 10**8)
        checkpoint_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))

        overhead, _ = run_measured(["-c", _IDLE_IMPORT], label="idle import")
        py = ["-c", _RUN_SCRIPT, str(CLI)]
        runs = {}
        runs["hf-to-megatron"] = run_measured(
            py + ["hf-to-megatron", "--hf-dir", str(hf), "--output", str(work / "mg")], label="hf-to-megatron")
        runs["megatron-to-hf"] = run_measured(
            py + ["megatron-to-hf", "--load", str(work / "mg"), "--output", str(work / "hf_back"),
                  "--max-shard-size", "400MB"], label="megatron-to-hf")
        if not args.no_torch_dist:
            print("saving a torch_dist checkpoint of the same weights (bf16, TP=1)")
            subprocess.run([sys.executable, __file__, "--make-torch-dist", str(work / "mg"), str(work / "dist")],
                           check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            runs["megatron-to-hf (torch_dist)"] = run_measured(
                py + ["megatron-to-hf", "--load", str(work / "dist"), "--output", str(work / "hf_dist"),
                      "--hf-config", str(hf / "config.json"), "--max-shard-size", "400MB"],
                label="torch_dist-to-hf")

        bound = 3 * largest + overhead
        print()
        print(f"checkpoint on disk      {checkpoint_bytes / MiB:9.1f} MiB")
        print(f"largest tensor          {largest / MiB:9.1f} MiB  ({largest_name} {list(shapes[largest_name])})")
        print(f"overhead (idle import)  {overhead / MiB:9.1f} MiB")
        print(f"bound = 3 x largest + overhead = {bound / MiB:.1f} MiB")
        ok = True
        for name, (rss, seconds) in runs.items():
            above = rss - overhead
            verdict = "ok" if rss < bound else "OVER"
            ok &= rss < bound
            print(f"{name:28s} peak RSS {rss / MiB:8.1f} MiB = overhead + {above / MiB:7.1f} MiB "
                  f"({above / largest:4.2f} x largest)  {seconds:6.1f}s  {verdict}")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
