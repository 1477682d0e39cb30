"""``megatron-tgdpo prepare``: prepare JSONL preference data into megatron-core indexed files (.bin/.idx) plus a manifest.

    megatron-tgdpo prepare --input data/train.jsonl --output-prefix data/prepared/train \
        --tokenizer /path/to/tokenizer_dir --chat-template auto --max-seq-length 4096 --workers 8
    megatron-tgdpo prepare --format sft --input sft.jsonl --output-prefix data/prepared/sft ...

``--format sft`` takes SFT records ({"prompt", "response"} or {"messages": [...]} ending with an
assistant turn) into the same layout (the response as "chosen", "rejected" empty, manifest kind "sft"):
`--loss-type sft` trains on it, the preference losses refuse it.

Input forms, tokenizers, templates, truncation policy and the output format: docs/data.md.
No record stops the run, however malformed (lone surrogates, NUL, deep nesting, a tokenizer or chat
template that raises on it): each bad record is reported as ``file:line: field: reason``.
Exit status: 0 on success, 1 when records are bad (with --on-bad-record error) or nothing is left,
2 for usage errors, a bad tokenizer or missing inputs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_tgdpo import flag_checks
from megatron_tgdpo.data.errors import BadRecordsError, TokenizerError
from megatron_tgdpo.data.prepare import PrepareConfig, prepare_preference_data
from megatron_tgdpo.data.records import MAX_RECORD_BYTES

#: the allowed values of this command's numeric flags (see megatron_tgdpo.flag_checks)
BOUNDS = {
    "--max-seq-length": flag_checks.Bound(2, 2**22, integer=True),
    "--min-response-tokens": flag_checks.Bound(1, 2**22, integer=True),
    "--min-prompt-tokens": flag_checks.Bound(1, 2**22, integer=True),
    "--max-errors-shown": flag_checks.Bound(0, 10**6, integer=True),
    "--workers": flag_checks.Bound(1, 1024, integer=True),
    "--max-record-bytes": flag_checks.Bound(1, 2**31, integer=True),
}


def build_parser(*, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", required=True, metavar="JSONL", help="one or more JSONL files, in order")
    io.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json")
    io.add_argument("--format", choices=("preference", "sft"), default="preference",
                    help="preference: {prompt, chosen, rejected} pairs (default); sft: {prompt, response} or "
                         "{messages} ending with an assistant turn")
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", required=True, help="sentencepiece .model, tokenizer.json, or a directory with one")
    tok.add_argument(
        "--chat-template",
        default=None,
        help="plain | llama3 | auto (tokenizer_config.json's Jinja template) | path to a .jinja file; "
        "default: auto if the tokenizer has a Jinja template, else llama3 if it has the Llama-3 chat tokens, else plain",
    )
    tok.add_argument("--response-suffix", choices=("eos", "template"), default="eos",
                     help="eos: a response ends at the token closing the assistant turn (<|im_end|>); template: "
                          "keep what the chat template renders after it (ChatML's newline), as TRL does")
    length = parser.add_argument_group("length policy")
    length.add_argument("--max-seq-length", type=int, default=4096, help="limit on prompt + response, per side")
    length.add_argument("--truncation", choices=("truncate_prompt", "drop"), default="truncate_prompt")
    length.add_argument("--min-response-tokens", type=int, default=1, metavar="K", help="drop pairs with a shorter response")
    length.add_argument(
        "--min-prompt-tokens", type=int, default=16, metavar="M", help="truncate_prompt never cuts the prompt below M tokens"
    )
    bad = parser.add_argument_group("bad records")
    bad.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    bad.add_argument("--max-errors-shown", type=int, default=20)
    bad.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES, metavar="BYTES",
                     help="a longer line is a bad record (record_too_large, with its line number) and is never read "
                          "whole: parsing and tokenizing a record takes about 70x its size in memory")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    run.add_argument("--quiet", action="store_true", help="print only errors")
    return parser


def main(argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None) -> int:
    args = flag_checks.checked_parser(build_parser(prog=prog), bounds=BOUNDS).parse_args(argv)
    problems = flag_checks.config_problems(args, bounds=BOUNDS)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    config = PrepareConfig(
        inputs=tuple(args.input),
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        response_suffix=args.response_suffix,
        max_record_bytes=args.max_record_bytes,
        max_seq_length=args.max_seq_length,
        truncation=args.truncation,
        min_response_tokens=args.min_response_tokens,
        min_prompt_tokens=args.min_prompt_tokens,
        on_bad_record=args.on_bad_record,
        max_errors_shown=args.max_errors_shown,
        workers=args.workers,
        kind=args.format,
    )
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr))
    try:
        manifest = prepare_preference_data(config, log=log)
    except BadRecordsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (TokenizerError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    bad = manifest["records"]["bad_by_reason"]
    if bad and not args.quiet:
        print(f"skipped bad records by reason: {bad}", file=sys.stderr)
        for line in manifest["records"]["bad_examples"]:
            print(f"  {line}", file=sys.stderr)
    return 0

