r"""Sample responses to a prompt file from a checkpoint, at any TP/PP layout, data-parallel over the rest.

    torchrun --nproc-per-node 8 tools/generate.py --load runs/sft/checkpoints --bf16 \
        --tensor-model-parallel-size 2 --input prompts.jsonl --output samples.jsonl \
        --num-samples 8 --temperature 0.8 --top-p 0.95 --max-new-tokens 512 --seed 7

``--load`` takes what the trainer takes: our torch_dist checkpoints, converted directories, Hugging
Face model directories. The tokenizer defaults to the model directory's own (or, for a torch_dist
checkpoint, the one its training run used); prompts are rendered with the data tool's chat templates.
A response ends at the tokenizer's EOS, the chat template's end of turn, or an ``eos_token_id`` of the
model directory's ``generation_config.json`` (``generation.sampler.stop_ids``: the rule every sampler
of this package follows).

Input: JSONL, one ``{"id", "prompt": str | [messages], ...}`` per line. Output: the same lines, in the
same order, each with ``"samples": [{"text", "num_tokens", "finish_reason"}, ...]`` added; written
by rank 0 and published atomically. Sampling is reproducible from ``--seed`` and the same at every
layout and data-parallel size. Exit status 0 on success, 2 on a usage error (bad flags, a bad prompt
file, a missing checkpoint, prompts too long for the model): those are found before any compute and
nothing is written. Formats and design: docs/generation.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_tgdpo import distributed, flag_checks
from megatron_tgdpo.generation.config import SamplingConfig


class UsageError(Exception):
    """Problems found before any compute; the message lists every one."""

    def __init__(self, problems: Sequence[str]) -> None:
        lines = ["nothing was run:"]
        for problem in problems:
            first, *rest = str(problem).splitlines()
            lines += [f"  - {first}", *(f"    {line}" for line in rest)]
        super().__init__("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="prompt JSONL: {\"id\", \"prompt\": str | [messages], ...}")
    io.add_argument("--output", required=True, help="samples JSONL to write (atomically)")
    io.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    model = parser.add_argument_group("model and tokenizer")
    model.add_argument("--load", required=True, help="torch_dist checkpoint (root or iter_*), converted or HF directory, or a .gguf file")
    model.add_argument("--model", default="tiny", help="preset, only for a torch_dist checkpoint that records no architecture")
    model.add_argument("--tokenizer", default=None, help="default: the checkpoint's own (model directory or training run)")
    model.add_argument("--chat-template", default=None,
                       help="plain | llama3 | auto | a .jinja file; default: the training data's, else as prepare_data.py")
    model.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    model.add_argument("--trust-checkpoint", action="store_true",
                       help="unpickle a torch_dist --load with no allow-list (only a checkpoint you trust)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    sampling.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus cut (1 = off)")
    sampling.add_argument("--top-k", type=int, default=0, help="top-k cut (0 = off)")
    sampling.add_argument("--max-new-tokens", type=int, default=256)
    sampling.add_argument("--seed", type=int, default=1234)
    layout = parser.add_argument_group("layout")
    layout.add_argument("--micro-batch-size", type=int, default=8, help="prompts per forward (x --num-samples rows)")
    layout.add_argument("--tensor-model-parallel-size", type=int, default=1)
    layout.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    layout.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    layout.add_argument("--context-parallel-size", type=int, default=1, help="must be 1 (refused otherwise)")
    return parser


@dataclass
class Plan:
    """Everything checked and computed before the first collective."""

    args: argparse.Namespace
    sampling: SamplingConfig
    arch: object  # LlamaArch
    label: str  # what the model is, for the log
    tokenizer: object  # data.Tokenizer
    records: list  # prompts.PromptRecord
    prompt_ids: list[list[int]]
    eos_ids: list[int]


#: the allowed values of this command's numeric flags: the trainer's where they mean the same, sampling's
#: own (a temperature of 0 is greedy here)
BOUNDS = {
    **{flag: flag_checks.BOUNDS[flag] for flag in (
        "--max-new-tokens", "--seed", "--micro-batch-size", "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size", "--virtual-pipeline-model-parallel-size", "--context-parallel-size")},
    "--num-samples": flag_checks.Bound(1, 4096, integer=True),
    "--temperature": flag_checks.Bound(0.0, 1e2),
    "--top-p": flag_checks.Bound(0.0, 1.0, low_open=True),
    "--top-k": flag_checks.Bound(0, 2**24, integer=True),
}


def _flag_problems(args: argparse.Namespace, sampling: SamplingConfig, world_size: int) -> list[str]:
    problems = sampling.problems()
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.micro_batch_size < 1:
        problems.append(f"--micro-batch-size {args.micro_batch_size}: must be >= 1")
    if args.context_parallel_size != 1:
        problems.append(f"--context-parallel-size {args.context_parallel_size}: generation does not support "
                        "context parallelism; use 1 (spread ranks over TP/PP/DP instead)")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        problems.append("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    elif world_size % (tp * pp):
        problems.append(f"world size {world_size} is not divisible by TP*PP = {tp}*{pp}; "
                        "change the parallel sizes or the rank count")
    if not Path(args.input).is_file():
        problems.append(f"--input {args.input}: no such file")
    if Path(args.output).exists() and not args.overwrite:
        problems.append(f"--output {args.output}: already exists; pass --overwrite to replace it")
    if not Path(args.load).exists():
        problems.append(f"--load {args.load}: no such checkpoint or model directory")
    # Then what the checks above let through: non-finite, huge (a flag they named is not repeated).
    return flag_checks.without_repeats(problems, flag_checks.config_problems(args, bounds=BOUNDS))


def prepare(args: argparse.Namespace, *, world_size: int) -> Plan:
    """Validate flags, checkpoint, tokenizer and prompts; tokenize. Raises :class:`UsageError`."""
    from megatron_tgdpo.data.errors import TokenizerError
    from megatron_tgdpo.data.templates import TemplateRenderError
    from megatron_tgdpo.data.tokenizer import load_tokenizer
    from megatron_tgdpo.generation import model_files, prompts, sampler
    from megatron_tgdpo.models import llama
    from megatron_tgdpo.tasks.jsonl import BadLinesError

    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              num_samples=args.num_samples)
    problems = _flag_problems(args, sampling, world_size)
    if any(p.startswith(("--load", "--input")) for p in problems):
        raise UsageError(problems)

    try:
        arch, label = model_files.model_arch(args.load, model=args.model)
        found = model_files.default_tokenizer(args.load)
    except model_files.load_errors() as exc:
        raise UsageError([*problems, f"--load {args.load}: {exc}"]) from None
    tokenizer_path = args.tokenizer or found.path
    if tokenizer_path is None:
        problems.append(f"--tokenizer is needed: {found.origin}")
        raise UsageError(problems)
    try:
        tokenizer = load_tokenizer(tokenizer_path, chat_template=args.chat_template or found.chat_template)
    except TokenizerError as exc:
        raise UsageError([*problems, f"--tokenizer {tokenizer_path}: {exc}"]) from None
    if tokenizer.vocab_size > arch.vocab_size:
        problems.append(f"the tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but the model only "
                        f"{arch.vocab_size}; use the tokenizer the model was trained with")
    try:
        llama.check_layout(arch, llama.ParallelLayout(
            tensor_model_parallel_size=max(args.tensor_model_parallel_size, 1),
            pipeline_model_parallel_size=max(args.pipeline_model_parallel_size, 1),
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size))
    except ValueError as exc:
        problems.extend(line.strip() for line in str(exc).splitlines()[1:])

    try:
        records = prompts.read_prompt_file(args.input)
    except BadLinesError as exc:
        raise UsageError([*problems, str(exc)]) from None
    prompt_ids, render_problems = [], []
    for record in records:
        try:
            prompt_ids.append(prompts.encode_prompt(record.messages, tokenizer))
        except TemplateRenderError as exc:
            render_problems.append(f"{args.input}:{record.line}: prompt: {exc.reason}")
    problems.extend(render_problems)
    if prompt_ids and not render_problems and args.max_new_tokens >= 1:
        longest = max(range(len(records)), key=lambda i: len(prompt_ids[i]))
        n = len(prompt_ids[longest])
        room = arch.max_position_embeddings - n
        if args.max_new_tokens > room:
            fix = f"use --max-new-tokens <= {room} or shorten that prompt" if room >= 1 else "shorten that prompt"
            problems.append(
                f"--max-new-tokens {args.max_new_tokens}: the longest prompt ({args.input}:{records[longest].line}, "
                f"id {records[longest].fields['id']!r}) has {n} tokens, and {n} + {args.max_new_tokens} exceeds the "
                f"model's {arch.max_position_embeddings} positions; {fix}")
    try:
        eos_ids = sampler.stop_ids(tokenizer, model_dir=args.load)
    except TemplateRenderError as exc:
        problems.append(f"--chat-template {tokenizer.chat_template.name}: cannot render a one-turn conversation to "
                        f"find the token that ends a response ({exc.reason})")
    if problems:
        raise UsageError(problems)
    return Plan(args, sampling, arch, label, tokenizer, records, prompt_ids, eos_ids)


def _log(text: str) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(text, flush=True)


def run(plan: Plan) -> dict:
    """Build, load, generate this data-parallel rank's prompts, gather on rank 0 and publish."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.generation import Progress, model_files, output
    from megatron_tgdpo.generation.sampler import Sampler, build_chunks
    from megatron_tgdpo.models import llama

    args = plan.args
    distributed.init_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        seed=args.seed,
    )
    layout = llama.ParallelLayout(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                  pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                  virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size)
    chunks = build_chunks(plan.arch, layout=layout, precision=llama.Precision(bf16=args.bf16))
    try:
        model_files.load_weights(args.load, chunks)
    except model_files.load_errors() as exc:
        raise UsageError([f"--load {args.load}: {exc}"]) from None

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(range(dp_rank, len(plan.records), dp))  # round-robin: balanced, keyed by global index
    rows = len(plan.records) * args.num_samples
    _log(f"generate: {len(plan.records)} prompts x {args.num_samples} samples from {plan.label} | "
         f"TP {args.tensor_model_parallel_size} x PP {args.pipeline_model_parallel_size} x DP {dp} | "
         f"max {args.max_new_tokens} new tokens | temperature {args.temperature} top-p {args.top_p} "
         f"top-k {args.top_k} | seed {args.seed}")
    start = time.monotonic()
    last_print = [start]

    def report(p: Progress) -> None:
        now = time.monotonic()
        if now - last_print[0] < 10.0 and p.rows_done < p.rows_total:
            return
        last_print[0] = now
        elapsed = max(now - start, 1e-9)
        _log(f"  {p.rows_done}/{p.rows_total} sequences on this replica (~{p.rows_done * dp}/{rows} in all) | "
             f"{p.new_tokens / elapsed:.1f} tokens/s per replica (~{p.new_tokens * dp / elapsed:.1f} in all) | "
             f"eta {elapsed / p.rows_done * (p.rows_total - p.rows_done):.0f}s")

    policy = Sampler(chunks=chunks, tokenizer=plan.tokenizer, stop_ids=tuple(plan.eos_ids))
    results = policy.sample([plan.prompt_ids[i] for i in mine], sampling=plan.sampling,
                            max_new_tokens=args.max_new_tokens, seed=args.seed,
                            micro_batch_size=args.micro_batch_size * args.num_samples, prompt_keys=mine,
                            progress=report)
    # One rank per data-parallel replica holds the replica's results (every model-parallel rank has them).
    holder = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(ignore_virtual=True)
    local: dict[int, list[dict]] = {}
    if holder:
        local = {mine[i]: samples for i, samples in policy.samples_by_prompt(results).items()}
    gathered: Optional[list] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    elapsed = time.monotonic() - start
    summary = {"prompts": len(plan.records), "samples": rows, "seconds": elapsed}
    if dist.get_rank() == 0:
        merged = {i: samples for part in gathered for i, samples in part.items()}
        tokens = sum(s["num_tokens"] for samples in merged.values() for s in samples)
        output.write_jsonl_atomic(args.output, (output.output_record(r.fields, merged[i])
                                                for i, r in enumerate(plan.records)))
        summary["tokens"] = tokens
        _log(f"wrote {args.output}: {len(plan.records)} prompts, {rows} samples, {tokens} response tokens in "
             f"{elapsed:.1f}s ({tokens / max(elapsed, 1e-9):.1f} tokens/s)")
    dist.barrier()
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    """``megatron-tgdpo generate`` (and ``tools/generate.py``): the exit status (0 done, 2 usage error)."""
    args = flag_checks.checked_parser(build_parser(), bounds=BOUNDS).parse_args(argv)
    from megatron_tgdpo import safe_pickle
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    safe_pickle.trust_checkpoints(args.trust_checkpoint)

    quiet_library_warnings()
    launch = distributed.read_launch_env()
    try:
        plan = prepare(args, world_size=launch.world_size)
    except UsageError as exc:
        if launch.rank == 0:
            print(f"generate: {exc}", file=sys.stderr, flush=True)
        return 2
    distributed.init_process_group(launch)
    try:
        run(plan)
    except UsageError as exc:
        if launch.rank == 0:
            print(f"generate: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":  # megatron's checkpoint code spawns processes that re-import __main__
    sys.exit(main())
