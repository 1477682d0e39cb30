"""The sampling worker: many (model, prompt file, sampling) jobs in one process.

    python -m megatron_tgdpo.pipeline.sample JOBS.json

``JOBS.json`` is a list of ``{"load", "input", "output", "temperature", "num_samples", "max_new_tokens",
"seed", "tokenizer", "chat_template"}``. The model is built once (one rank, TP = PP = 1) and each job's
weights loaded into it, so scoring five models on the held-out prompts costs one process start, not
five. Outputs are the samples files of ``tasks/samples.py`` (what ``tools/generate.py`` writes, with the
same prompt rendering, stop ids and seeded sampling), each published atomically.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "run_jobs"]


def run_jobs(jobs: list[dict[str, Any]], *, say=print) -> None:
    from megatron_tgdpo import distributed
    from megatron_tgdpo.data.tokenizer import load_tokenizer
    from megatron_tgdpo.generation import SamplingConfig, generate, output, prompts, sources
    from megatron_tgdpo.models import llama

    distributed.init_model_parallel(seed=0)
    built: dict[Any, list] = {}
    tokenizers: dict[tuple, Any] = {}
    encoded: dict[tuple, tuple] = {}
    for job in jobs:
        started = time.monotonic()
        arch, _ = sources.model_arch(job["load"], model=job.get("model", "tiny"))
        if arch not in built:
            config = llama.transformer_config(arch, llama.ParallelLayout(), llama.Precision())
            built[arch] = llama.build_model(arch, config)
        chunks = built[arch]
        sources.load_weights(job["load"], chunks)
        key = (job["tokenizer"], job.get("chat_template"))
        if key not in tokenizers:
            tokenizers[key] = load_tokenizer(job["tokenizer"], chat_template=job.get("chat_template"))
        tokenizer = tokenizers[key]
        if (job["input"], key) not in encoded:
            records = prompts.read_prompt_file(job["input"])
            encoded[(job["input"], key)] = (records, [prompts.encode_prompt(r.messages, tokenizer) for r in records])
        records, ids = encoded[(job["input"], key)]
        sampling = SamplingConfig(temperature=float(job["temperature"]), num_samples=int(job["num_samples"]))
        results = generate(chunks, ids, sampling=sampling, eos_ids=prompts.stop_token_ids(tokenizer),
                           max_new_tokens=int(job["max_new_tokens"]), seed=int(job["seed"]),
                           micro_batch_size=int(job.get("micro_batch_size", 256)),
                           vocab_limit=tokenizer.vocab_size)
        per_prompt: dict[int, list] = {}
        for seq in results:
            per_prompt.setdefault(seq.prompt_index, []).append(output.sample_record(seq, tokenizer))
        Path(job["output"]).parent.mkdir(parents=True, exist_ok=True)
        output.write_jsonl_atomic(job["output"], (output.output_record(r.fields, per_prompt[i])
                                                  for i, r in enumerate(records)))
        say(f"{job['output']}: {len(records)} prompts x {sampling.num_samples} from {job['load']} "
            f"(temperature {sampling.temperature}) in {time.monotonic() - started:.1f}s", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_tgdpo import distributed
    from megatron_tgdpo.runtime.console import quiet_library_warnings

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m megatron_tgdpo.pipeline.sample JOBS.json", file=sys.stderr)
        return 2
    jobs = json.loads(Path(args[0]).read_text())
    quiet_library_warnings(verbose=False)
    distributed.init_process_group(distributed.read_launch_env())
    try:
        run_jobs(jobs)
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
