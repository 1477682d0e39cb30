"""``python -m megatron_tgdpo.tasks``: make prompt files, score samples, evaluate scored samples.

    python -m megatron_tgdpo.tasks make-prompts --task addition --num 1000 --seed 1 --output prompts.jsonl \\
        [--num-digits 2] [--split train --heldout-fraction 0.1 --split-seed 0] [--check-tokenizer tok.model]
    python -m megatron_tgdpo.tasks score --samples samples.jsonl --output scored.jsonl
    python -m megatron_tgdpo.tasks evaluate --samples a.jsonl [--against b.jsonl] [--per-prompt mean|first]

Exit status: 0 on success, 1 for bad input lines or impossible requests (nothing is written),
2 for usage errors and missing files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from megatron_tgdpo import flag_checks
from megatron_tgdpo.tasks.base import Task
from megatron_tgdpo.tasks.evaluate import format_head_to_head, format_table, head_to_head, summarize
from megatron_tgdpo.tasks.jsonl import BadLinesError, write_jsonl_atomic
from megatron_tgdpo.tasks.prompts import SPLIT_BY, SPLITS, make_prompts
from megatron_tgdpo.tasks.registry import TASKS, get_task
from megatron_tgdpo.tasks.samples import load_sample_records, score_records

__all__ = ["build_parser", "main"]

# Difficulty flags -> task parameters; a flag a task does not have is a usage error, not ignored.
_PARAM_FLAGS = {"num_digits": "--num-digits", "min_length": "--min-length", "max_length": "--max-length"}


def _task_lines() -> str:
    return "\n".join(f"  {name}: {cls.description}" for name, cls in sorted(TASKS.items()))


def build_parser(*, prog: str = "python -m megatron_tgdpo.tasks") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    make = sub.add_parser("make-prompts", help="write a prompt file", epilog="tasks:\n" + _task_lines(),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    make.add_argument("--task", required=True, choices=sorted(TASKS))
    make.add_argument("--num", type=int, required=True, help="number of distinct prompts")
    make.add_argument("--seed", type=int, default=1)
    make.add_argument("--output", required=True, metavar="JSONL")
    difficulty = make.add_argument_group("difficulty (task defaults when not given)")
    difficulty.add_argument("--num-digits", type=int, help="addition: digits per operand (default 2)")
    difficulty.add_argument("--min-length", type=int, help="sort, reverse: shortest digit list (default 4)")
    difficulty.add_argument("--max-length", type=int, help="sort, reverse: longest digit list (default 8)")
    split = make.add_argument_group("train / held-out split (by a hash of the prompt's canonical form, independent "
                                    "of --seed)")
    split.add_argument("--split", choices=SPLITS, default="all")
    split.add_argument("--heldout-fraction", type=float, default=0.1)
    split.add_argument("--split-seed", type=int, default=0, help="salt of the split hash; keep it fixed across files")
    split.add_argument("--split-by", choices=SPLIT_BY, default="canonical",
                       help="hash the problem's canonical form (a + b and b + a, or one multiset's orders, fall on one "
                       "side) or the prompt text (the split of earlier releases, which leaks reordered problems)")
    make.add_argument("--check-tokenizer", metavar="PATH",
                      help="fail unless every prompt and answer round-trips through this tokenizer "
                           "(e.g. examples/data/synthetic/tokenizer.model)")

    score = sub.add_parser("score", help="add the task verifier's score to every sample")
    score.add_argument("--samples", required=True, metavar="JSONL")
    score.add_argument("--output", required=True, metavar="JSONL", help="may equal --samples (replaced atomically)")

    evaluate = sub.add_parser("evaluate", help="summarise scored samples; head-to-head with --against")
    evaluate.add_argument("--samples", required=True, metavar="JSONL")
    evaluate.add_argument("--against", metavar="JSONL", help="a second model's scored samples of the same prompts")
    evaluate.add_argument("--per-prompt", choices=("mean", "first"), default="mean",
                          help="head-to-head compares the mean sample score per prompt, or the first sample's")
    evaluate.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser


class _UsageError(ValueError):
    """A flag combination that cannot work (exit status 2, like argparse's own errors)."""


def _task_from_args(args: argparse.Namespace) -> Task:
    params = {key: getattr(args, key) for key in _PARAM_FLAGS if getattr(args, key) is not None}
    cls = TASKS[args.task]
    allowed = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    extra = [_PARAM_FLAGS[key] for key in params if key not in allowed]
    if extra:
        raise _UsageError(f"{', '.join(extra)} does not apply to --task {args.task} "
                         f"(its flags: {', '.join(_PARAM_FLAGS[k] for k in allowed) or 'none'})")
    try:
        return get_task(args.task, **params)
    except ValueError as exc:  # a parameter out of range is a usage error too
        raise _UsageError(str(exc)) from None


def _untokenizable(records: list[dict[str, str]], tokenizer_path: str) -> list[str]:
    from megatron_tgdpo.data.tokenizer import load_tokenizer  # sentencepiece only when asked

    tokenizer = load_tokenizer(tokenizer_path)
    bad = []
    for record in records:
        for field in ("prompt", "answer"):
            text = record[field]
            if tokenizer.decode(tokenizer.encode(text)) != text:
                bad.append(f"{record['id']}: {field} {text!r} does not round-trip through {tokenizer_path}")
    return bad


#: the allowed values of make-prompts' numeric flags (see megatron_tgdpo.flag_checks); the difficulty
#: flags (--num-digits, --min-length, --max-length) are checked by their task, which knows its limits
MAKE_BOUNDS = {
    "--num": flag_checks.Bound(1, 10**8, integer=True),
    "--seed": flag_checks.BOUNDS["--seed"],
    "--split-seed": flag_checks.BOUNDS["--seed"],
    "--heldout-fraction": flag_checks.Bound(0.0, 1.0),
}


def _make_prompts(args: argparse.Namespace) -> int:
    task = _task_from_args(args)
    in_range = flag_checks.config_problems(args, bounds=MAKE_BOUNDS)
    if in_range:
        raise _UsageError("; ".join(in_range))
    records = make_prompts(task, num=args.num, seed=args.seed, split=args.split,
                           heldout_fraction=args.heldout_fraction, split_seed=args.split_seed, split_by=args.split_by)
    if args.check_tokenizer:
        bad = _untokenizable(records, args.check_tokenizer)
        if bad:
            print(f"error: {len(bad)} texts the tokenizer cannot represent; nothing was written:", file=sys.stderr)
            for line in bad[:20]:
                print(f"  {line}", file=sys.stderr)
            return 1
    write_jsonl_atomic(args.output, records)
    print(f"wrote {len(records)} {task.name} prompts {task.params()} (seed {args.seed}, split {args.split}) "
          f"to {args.output}", file=sys.stderr)
    return 0


def _score(args: argparse.Namespace) -> int:
    records = load_sample_records(args.samples, require_verifier=True)
    scored, replaced = score_records(records)
    write_jsonl_atomic(args.output, (item.record for item in records))
    note = f" ({replaced} existing scores replaced)" if replaced else ""
    print(f"scored {scored} samples of {len(records)} prompts{note}; wrote {args.output}", file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    a = load_sample_records(args.samples, require_scores=True)
    rows = [(args.samples, summarize(a))]
    result: dict[str, Any] = {"files": {args.samples: rows[0][1].as_dict()}}
    versus = None
    if args.against:
        b = load_sample_records(args.against, require_scores=True)
        rows.append((args.against, summarize(b)))
        result["files"][args.against] = rows[1][1].as_dict()
        versus = head_to_head(a, b, per_prompt=args.per_prompt)
        result["head_to_head"] = {"a": args.samples, "b": args.against, **versus.as_dict()}
    print(format_table(rows))
    if versus is not None:
        print(format_head_to_head(args.samples, args.against, versus))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None, *, prog: str = "python -m megatron_tgdpo.tasks") -> int:
    args = build_parser(prog=prog).parse_args(argv)
    command = {"make-prompts": _make_prompts, "score": _score, "evaluate": _evaluate}[args.command]
    try:
        return command(args)
    except BadLinesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.command != "evaluate":
            print("nothing was written", file=sys.stderr)
        return 1
    except (FileNotFoundError, _UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
