"""What one replication run does: sizes, hyper-parameters, seeds, and the presets that name them.

Every field of :class:`PipelineConfig` that changes an output is part of the fingerprint of the stages
that produce it (``stages.py``), so changing a setting reruns exactly the stages it affects, and a
rerun with the same settings skips everything already done.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["ALL_METHODS", "METHODS", "PRESETS", "PipelineConfig", "TrainSettings", "preset"]

#: The models a run compares, in table order. "tgdpo" stands for one run per alpha; the controls,
#: cross-fitted TGDPO and TGDPO guided by a reward model (``controls.py``) run only when named.
METHODS = ("sft", "dpo", "tgdpo", "simpo", "ipo")
ALL_METHODS = METHODS + ("tgdpo-shuffled", "tgdpo-constant", "tgdpo-crossfit", "tgdpo-rm")


@dataclass(frozen=True)
class TrainSettings:
    """One training stage's schedule (the model, data and sequence length are the run's)."""

    iters: int
    lr: float
    min_lr: float
    global_batch_size: int = 32
    micro_batch_size: int = 32
    warmup_fraction: float = 0.05


@dataclass(frozen=True)
class PipelineConfig:
    # ---- task and prompts (shared by all seeds unless vary_data_seed: then each seed draws its own) ----
    task: str = "addition"
    task_params: dict[str, Any] = field(default_factory=lambda: {"num_digits": 2})
    sft_prompts: int = 2000  # prompts whose ideal answers (optionally noised) are the SFT data
    pref_prompts: int = 2000  # prompts the SFT model samples k responses for (on-policy pairs)
    heldout_prompts: int = 500  # evaluation prompts, disjoint from both (hash split, tasks/prompts.py)
    data_seed: int = 1
    # True: seed N draws its own prompts (SFT / preference / held-out) and SFT noise with data seed N, so
    # the spread over seeds includes the data's variance, not only training's and sampling's.
    vary_data_seed: bool = False
    sft_noise: float = 0.3  # fraction of SFT answers with one digit replaced (an imperfect teacher)
    # ---- models ------------------------------------------------------------------------------------
    model: str = "tiny"
    # A pretrained starting model (Hugging Face directory or .gguf). Set: it is the reference and the
    # starting point of every preference model unless "sft" is among the methods (then SFT starts from
    # it), its tokenizer and its own chat template render every prompt, and it is scored as "base".
    # Empty: the tiny model above, trained from its seeded initialisation by the SFT stage.
    base: str = ""
    seq_length: int = 32
    pad_to_multiple_of: int = 16  # rows are padded to a multiple of this (8 saves ~15% on 13-21 token sort rows)
    # --pack-sequences for every training job (the trainer's default). Off in "full": docs/results.md was
    # measured with padded rows (packing computes the same loss; a rerun packed differs in rounding only).
    pack_sequences: bool = True
    # --share-prompt / --no-share-prompt for every training job (no effect on SFT); None: the trainer's
    # default, and no flag (the specs of earlier runs still match).
    share_prompt: Optional[bool] = None
    sft: TrainSettings = TrainSettings(iters=3000, lr=3e-3, min_lr=3e-4)
    preference: TrainSettings = TrainSettings(iters=112, lr=1e-4, min_lr=1e-5)  # DPO, TGDPO, SimPO, IPO alike
    # tgdpo-rm's Bradley-Terry reward model; None: the preference schedule. A value head learns from scratch,
    # so it wants a larger learning rate and more passes than a preference model's fine-tuning.
    reward_model: Optional[TrainSettings] = None
    beta: float = 0.5  # DPO's beta, TGDPO's (loss and guidance reward r = beta * log(pi_guide / pi_ref))
    alpha: float = 0.5  # TGDPO's alpha in the main table (the paper's default)
    alphas: tuple[float, ...] = ()  # extra TGDPO runs for the alpha-sensitivity table
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    ipo_beta: float = 0.5
    methods: tuple[str, ...] = METHODS
    # ---- sampling ----------------------------------------------------------------------------------
    num_samples: int = 8  # k responses per preference prompt
    temperature: float = 1.0
    max_new_tokens: int = 8
    eval_samples: int = 8  # sampled evaluation at `temperature`, besides greedy (0: greedy only)
    curve_every: int = 0  # >0: checkpoint DPO/TGDPO every N iterations and score each (first seed only)
    # ---- execution ---------------------------------------------------------------------------------
    seeds: tuple[int, ...] = (1,)
    nproc: int = 1  # ranks per training job (data parallel, gloo on CPU)
    threads: int = 1  # torch threads per process (OMP_NUM_THREADS; divided among ranks): 1 is fastest for the
    # tiny model, and far faster than 2 when the cores are shared (spinning OpenMP threads wait on busy cores)

    @property
    def reward_model_settings(self) -> TrainSettings:
        """tgdpo-rm's reward model schedule: ``reward_model``, or the preference schedule when unset."""
        return self.reward_model or self.preference

    def tgdpo_alphas(self) -> tuple[float, ...]:
        """Every alpha a TGDPO model is trained with: the main one first, then the sensitivity sweep."""
        return tuple(dict.fromkeys((self.alpha, *self.alphas)))

    def problems(self) -> list[str]:
        out = []
        for name in ("sft_prompts", "pref_prompts", "heldout_prompts", "num_samples", "max_new_tokens", "nproc",
                     "threads", "pad_to_multiple_of"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_samples < 2:
            out.append("num_samples must be >= 2: a pair needs a best and a worst sample")
        if not 0.0 <= self.sft_noise <= 1.0:
            out.append(f"sft_noise must be in [0, 1], got {self.sft_noise}")
        from megatron_tgdpo.tasks import get_task

        try:
            get_task(self.task, **self.task_params)
        except (TypeError, ValueError, KeyError) as exc:
            out.append(f"task {self.task} with parameters {self.task_params}: {exc}")
        if self.share_prompt and not self.pack_sequences:
            out.append("--share-prompt needs packed rows (the prompt is shared inside a packed row): drop "
                       "--no-pack-sequences or --share-prompt")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            out.append(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
        from megatron_tgdpo.pipeline.control_methods import control_problems

        out += control_problems(self.methods)
        if "tgdpo" in self.methods and "dpo" not in self.methods:
            out.append("tgdpo needs dpo: the DPO model is its guidance model")
        if "sft" not in self.methods and not self.base:
            out.append("sft is needed without a pretrained --base / --model: it is the reference and the starting "
                       "point of every other model")
        if self.base and "sft" in self.methods and self.sft_noise > 0:
            out.append("sft_noise replaces digits (the tiny tasks' answers): use --sft-noise 0 with a pretrained base")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            out.append(f"seeds must be distinct and at least one, got {self.seeds}")
        for name, settings in (("sft", self.sft), ("preference", self.preference)):
            if settings.global_batch_size % (settings.micro_batch_size * self.nproc):
                out.append(f"{name}: global batch {settings.global_batch_size} is not divisible by micro batch "
                           f"{settings.micro_batch_size} x {self.nproc} ranks")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _small(**overrides: Any) -> PipelineConfig:
    return dataclasses.replace(PipelineConfig(), **overrides)


PRESETS: dict[str, dict[str, Any]] = {
    # The replication (python -m megatron_tgdpo.replicate): about 8 CPU-minutes a seed (docs/results.md).
    # Padded rows, as docs/results.md was measured (pack_sequences=True computes the same loss).
    "full": dict(pack_sequences=False),
    # The README's demo: SFT -> pairs -> DPO -> TGDPO -> held-out scores in about 100 CPU-seconds (the README
    # promises 3 minutes with the install). Sorting (the built-in data's task) rather than addition: a tiny
    # model learns it in 220 steps, addition in 3000.
    "demo": dict(task="sort", task_params={}, sft_prompts=1000, pref_prompts=400, heldout_prompts=200,
                 sft=TrainSettings(220, 3e-3, 3e-4, global_batch_size=128, micro_batch_size=128),
                 preference=TrainSettings(30, 1e-4, 1e-5), methods=("sft", "dpo", "tgdpo"), eval_samples=0,
                 pad_to_multiple_of=8, pack_sequences=True),
    # Long answers where token credit matters (docs/results.md, "Token credit on long answers"): reversing
    # 12-24 digits, scored by the fraction of positions right. After SFT the greedy answer is ~0.8 right and
    # rarely exact; a best-vs-worst pair differs in a few positions of a 12-24-token response, which a
    # sequence-level loss can only credit as a whole. Every method, TGDPO at three alphas, its two
    # controls, cross-fitted and reward-model guidance; each seed its own data; curves of seed 1.
    # megatron-tgdpo replicate --preset credit --seeds 8 --figures docs/img: about 7 CPU-minutes a seed.
    "credit": dict(task="reverse", task_params={"min_length": 12, "max_length": 24}, sft_prompts=4000,
                   pref_prompts=800, heldout_prompts=200, seq_length=64, max_new_tokens=26, pad_to_multiple_of=8,
                   sft=TrainSettings(600, 3e-3, 3e-4, global_batch_size=64, micro_batch_size=64),
                   preference=TrainSettings(25, 1e-5, 1e-6), alphas=(1.0, 2.0), eval_samples=0,
                   methods=METHODS + ("tgdpo-shuffled", "tgdpo-constant", "tgdpo-crossfit", "tgdpo-rm"),
                   reward_model=TrainSettings(200, 1e-3, 1e-4),  # 8 epochs of the 800 pairs
                   vary_data_seed=True, curve_every=5, pack_sequences=True),
    # The test suite's smoke run: every stage and every table row, in well under a minute of compute.
    # A real pretrained chat model (megatron-tgdpo replicate --model smollm2): SmolLM2-135M-Instruct sorts
    # 6-8 English words only partly right (greedy: it mostly copies the list), and its samples at
    # temperature 0.7 differ in score, so best-vs-worst pairs exist without an SFT stage (at temperature 1
    # most samples are off-topic). Sized for a shared 2-core machine (docs/results.md): sampling costs as
    # much as training at this size. beta 0.1 as in the paper; lr 1e-5 because six full fine-tuning steps
    # at DPO's usual 5e-7 would barely move a model.
    "smollm2": dict(task="word-sort", task_params={"min_length": 6, "max_length": 8}, sft_prompts=1,
                    pref_prompts=48, heldout_prompts=64, methods=("dpo", "tgdpo"), num_samples=4,
                    temperature=0.7, max_new_tokens=32, eval_samples=0, seq_length=128, sft_noise=0.0,
                    preference=TrainSettings(6, 1e-5, 1e-6, global_batch_size=8, micro_batch_size=8,
                                             warmup_fraction=0.1),
                    beta=0.1, pack_sequences=True),
    "smoke": dict(sft_prompts=48, pref_prompts=32, heldout_prompts=16, sft=TrainSettings(4, 3e-3, 3e-4, 16, 16),
                  preference=TrainSettings(2, 1e-4, 1e-5, 16, 16), num_samples=4, max_new_tokens=4,
                  eval_samples=2),
}


def preset(name: str, **overrides: Any) -> PipelineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return _small(**{**PRESETS[name], **overrides})
