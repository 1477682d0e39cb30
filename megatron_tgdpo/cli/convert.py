"""``megatron-tgdpo convert``: convert Llama checkpoints between Hugging Face and megatron_tgdpo.

    megatron-tgdpo convert hf-to-megatron --hf-dir /models/Llama-3.1-8B --output /ckpt/llama31-8b
    megatron-tgdpo convert megatron-to-hf --load /runs/dpo/save --output /export/llama31-8b-dpo \
        --hf-config /models/Llama-3.1-8B/config.json

``--load`` takes a converted directory, a torch_dist save root (its newest complete iteration) or one
``iter_*`` directory, saved at any TP/PP. Outputs are written to ``<output>.tmp`` and renamed when
complete. Exit status: 0 on success, 2 on a conversion error (message on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "parse_args", "parse_size"]


def parse_size(text: str) -> int:
    """``5GB``, ``500MiB``, ``1024``: a byte count (decimal and binary units)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * scale)
    return int(upper)


def parse_args(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_mg = sub.add_parser("hf-to-megatron", help="Hugging Face LlamaForCausalLM directory -> converted format")
    to_mg.add_argument("--hf-dir", required=True, type=Path)
    to_mg.add_argument("--output", required=True, type=Path)
    to_mg.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    to_hf = sub.add_parser("megatron-to-hf", help="converted or torch_dist checkpoint -> Hugging Face directory")
    to_hf.add_argument("--load", required=True, type=Path)
    to_hf.add_argument("--output", required=True, type=Path)
    to_hf.add_argument("--hf-config", type=Path,
                       help="config.json of the trained model (or its Hugging Face / converted directory)")
    to_hf.add_argument("--tokenizer-dir", type=Path, help="copy tokenizer files from here")
    to_hf.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="cast (default: keep)")
    to_hf.add_argument("--max-shard-size", type=parse_size, default="5GB", help="per safetensors shard (default 5GB)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    to_hf.add_argument("--trust-checkpoint", action="store_true",
                       help="unpickle a torch_dist --load with no allow-list (only a checkpoint you trust)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None) -> int:
    args = parse_args(argv, prog=prog)
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    quiet_library_warnings()
    from megatron_tgdpo import convert, safe_pickle

    safe_pickle.trust_checkpoints(getattr(args, "trust_checkpoint", False))

    def progress(message: str) -> None:
        print(message, flush=True)

    try:
        if args.command == "hf-to-megatron":
            convert.hf_to_megatron(args.hf_dir, args.output, overwrite=args.overwrite, progress=progress)
        else:
            convert.megatron_to_hf(
                args.load,
                args.output,
                hf_config=args.hf_config,
                tokenizer_dir=args.tokenizer_dir,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
                progress=progress,
            )
    except (convert.ConversionError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0

