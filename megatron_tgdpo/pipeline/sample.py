"""The sampling worker: many (model, prompt file, sampling) jobs in one process.

    python -m megatron_tgdpo.pipeline.sample JOBS.json

``JOBS.json`` is a list of ``{"load", "input", "output", "temperature", "num_samples", "max_new_tokens",
"seed"}``, optionally with ``"tokenizer"`` and ``"chat_template"`` (default: the checkpoint's own, as
the generate command finds them), ``"model"`` (the preset of a checkpoint that records no
architecture) and ``"micro_batch_size"`` (rows per forward). The model is built once per architecture
(one rank, TP = PP = 1) and each job's weights loaded into it, so scoring five models on the held-out
prompts costs one process start, not five. Sampling is ``generation.sampler.Sampler``'s, the one the
generate command uses: the same prompt rendering, stop ids (``generation_config.json``'s included) and
seeded sampling. Outputs are the samples files of ``tasks/samples.py``, each published atomically.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "run_jobs"]


def run_jobs(jobs: list[dict[str, Any]], *, say=print) -> None:
    """Every job, in order; call inside an initialised process group of one rank."""
    from megatron_tgdpo import distributed
    from megatron_tgdpo.generation import SamplingConfig, model_files, prompts
    from megatron_tgdpo.generation.sampler import Sampler, build_chunks, tokenizer_for

    distributed.init_model_parallel(seed=0)
    built: dict[Any, list] = {}
    tokenizers: dict[tuple, Any] = {}
    encoded: dict[tuple, tuple] = {}
    for job in jobs:
        started = time.monotonic()
        arch, _ = model_files.model_arch(job["load"], model=job.get("model", "tiny"))
        if arch not in built:
            built[arch] = build_chunks(arch)
        key = (job.get("tokenizer") or job["load"], job.get("chat_template"))  # the default is the checkpoint's
        if key not in tokenizers:
            tokenizers[key] = tokenizer_for(job["load"], tokenizer=job.get("tokenizer"),
                                            chat_template=job.get("chat_template"))
        sampler = Sampler.load(job["load"], tokenizer=tokenizers[key], chunks=built[arch])
        if (job["input"], key) not in encoded:
            records = prompts.read_prompt_file(job["input"])
            encoded[(job["input"], key)] = (records, [prompts.encode_prompt(r.messages, sampler.tokenizer)
                                                      for r in records])
        records, ids = encoded[(job["input"], key)]
        sampling = SamplingConfig(temperature=float(job["temperature"]), num_samples=int(job["num_samples"]))
        results = sampler.sample(ids, sampling=sampling, max_new_tokens=int(job["max_new_tokens"]),
                                 seed=int(job["seed"]), micro_batch_size=int(job.get("micro_batch_size", 256)))
        sampler.write_samples_file(job["output"], records, results)
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
