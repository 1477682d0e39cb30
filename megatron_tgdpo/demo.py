"""The built-in default run: DPO, then TGDPO guided by that DPO model, on the built-in data.

``python -m megatron_tgdpo.demo`` launches two 2-rank ``torchrun`` jobs of ``megatron_tgdpo.train``
(gloo on CPU, NCCL on GPU) with the tiny preset and prints a before/after summary of held-out reward
accuracy and margin for both. Everything lands under ``--workdir`` (default ``runs/demo``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_tgdpo.testing import free_port

COMMON = [
    "--model", "tiny", "--micro-batch-size", "4", "--global-batch-size", "16", "--seq-length", "64",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-fraction", "0.05", "--beta", "0.1",
    "--eval-iters", "16", "--log-interval", "20", "--seed", "1234",
]


def launch(args: list[str], *, nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "-m", "megatron_tgdpo.train", *args]
    print("$ " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise SystemExit(f"training exited with code {result.returncode}; see the output above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--train-iters", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per job (data-parallel)")
    opts = parser.parse_args()
    work = Path(opts.workdir)
    start = time.monotonic()
    common = COMMON + ["--train-iters", str(opts.train_iters), "--data-cache-dir", str(work / "data")]
    launch(common + ["--loss-type", "dpo", "--save", str(work / "dpo"), "--log-dir", str(work / "dpo-log")],
           nproc=opts.nproc)
    launch(common + ["--loss-type", "tgdpo", "--alpha", "0.5", "--guidance-load", str(work / "dpo"),
                     "--save", str(work / "tgdpo"), "--log-dir", str(work / "tgdpo-log")], nproc=opts.nproc)
    print(f"\n=== summary: held-out reward accuracy / margin ({time.monotonic() - start:.0f} s) ===")
    print("(before training the policy equals the reference, so every pair ties and counts as not preferred)")
    for name in ("dpo", "tgdpo"):
        s = json.loads((work / f"{name}-log" / "summary.json").read_text())
        b, a = s["before"], s["after"]
        print(f"{name:>6}: accuracy {b['rewards/accuracy']:.3f} -> {a['rewards/accuracy']:.3f} | "
              f"margin {b['rewards/margin']:+.4f} -> {a['rewards/margin']:+.4f}  ({s['iterations']} iterations)")


if __name__ == "__main__":
    main()
