"""Training configuration: one dataclass, a YAML file, Megatron-style flags that override it.

Every field is a flag: ``tensor_model_parallel_size`` <-> ``--tensor-model-parallel-size``. A YAML file
(``--config run.yaml``) may set the same names (with dashes or underscores); the command line wins.
:func:`validate` checks everything that can be checked before any compute and names the flag to change;
:class:`ConfigError` carries those lines to the entry point, which prints them on rank 0 and exits 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

import yaml

from megatron_tgdpo import flag_checks
from megatron_tgdpo.losses import LOSS_TYPES as PREFERENCE_LOSS_TYPES
from megatron_tgdpo.models.llama import PRESETS

LOSS_TYPES = PREFERENCE_LOSS_TYPES + ("sft",)
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
PRESET_NAMES = tuple(PRESETS)


class ConfigError(SystemExit):
    """The configuration cannot work; raised before any compute. ``problems`` holds one line each.

    A ``SystemExit`` so that a caller that does not catch it still stops without a traceback; the entry
    points catch it, print it on rank 0 only and exit with status 2."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(dict.fromkeys(problems))
        if isinstance(problems, str):
            text = problems
        else:
            text = "configuration error(s), nothing was run:\n  - " + "\n  - ".join(self.problems)
        super().__init__(text)

    def __str__(self) -> str:
        return str(self.code)


@dataclass
class TrainConfig:
    # --- model --------------------------------------------------------------------------------
    model: str = field(default="tiny", metadata={"help": "preset: " + ", ".join(PRESET_NAMES)})
    # --- parallelism --------------------------------------------------------------------------
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # --- precision ----------------------------------------------------------------------------
    bf16: bool = False
    fp8_format: Optional[str] = field(default=None, metadata={"help": "hybrid | e4m3 (TransformerEngine, GPU)"})
    # --- data ---------------------------------------------------------------------------------
    data_path: Optional[str] = field(default=None, metadata={"help": "prepared dataset prefix; default: built-in"})
    eval_data_path: Optional[str] = None
    tokenizer: Optional[str] = None
    seq_length: int = 128
    micro_batch_size: int = 2
    global_batch_size: int = 8
    pad_to_multiple_of: int = 16
    pack_sequences: bool = field(default=False, metadata={
        "help": "pack several pairs into one row of up to 2 x micro-batch-size x seq-length tokens (no padding "
                "between them; attention and RoPE stay within each sequence)"})
    data_cache_dir: str = "runs/data"
    # --- loss ---------------------------------------------------------------------------------
    loss_type: str = "tgdpo"
    beta: float = 0.1
    alpha: float = 0.5
    label_smoothing: float = 0.0
    weight_clamp_min: Optional[float] = None
    weight_clamp_max: Optional[float] = None
    simpo_gamma: float = 0.5
    # --- optimisation -------------------------------------------------------------------------
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.0
    lr_decay_style: str = field(default="cosine", metadata={"help": " | ".join(LR_DECAY_STYLES)})
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    train_iters: Optional[int] = None
    train_epochs: Optional[float] = None
    seed: int = 1234
    skip_nonfinite_steps: int = field(
        default=5, metadata={"help": "a step whose loss or grad norm is NaN/Inf is skipped (no update); stop "
                                     "with an error after this many in a row (0: stop at the first)"})
    # --- models to load -----------------------------------------------------------------------
    load: Optional[str] = field(default=None, metadata={
        "help": "resume from this checkpoint root (newest intact iteration) or one iter_* directory; a model "
                "directory (Hugging Face or converted) starts the policy from it"})
    ref_load: Optional[str] = field(default=None, metadata={"help": "reference (and initial policy); default: seeded init"})
    guidance_load: Optional[str] = field(default=None, metadata={"help": "guidance model for tgdpo"})
    logprob_cache: Optional[str] = field(default=None, metadata={"help": "offline ref/guidance log-prob cache"})
    # --- checkpoints --------------------------------------------------------------------------
    load_optim: bool = field(default=True, metadata={"help": "restore optimizer state on resume (--no-load-optim)"})
    load_rng: bool = field(default=True, metadata={"help": "restore RNG state on resume (--no-load-rng)"})
    trust_checkpoint: bool = field(default=False, metadata={
        "help": "unpickle the checkpoints this run loads (every --*-load) with no allow-list: only for a "
                "checkpoint from a source you trust that holds objects the safe loader refuses"})
    save: Optional[str] = None
    save_interval: Optional[int] = None
    keep_last: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    # --- logging and evaluation ---------------------------------------------------------------
    log_dir: Optional[str] = None
    log_interval: int = 1
    eval_interval: Optional[int] = None
    eval_iters: int = 8
    tensorboard: bool = True
    wandb_project: Optional[str] = field(default=None, metadata={
        "help": "log the metrics of metrics.jsonl and the config to this Weights & Biases project (rank 0; needs "
                "`pip install wandb`); offline, into --wandb-save-dir, when no API key is set (WANDB_API_KEY or "
                "`wandb login`) or WANDB_MODE=offline"})
    wandb_exp_name: Optional[str] = field(default=None, metadata={"help": "W&B run name (default: W&B picks one)"})
    wandb_save_dir: Optional[str] = field(default=None, metadata={
        "help": "where W&B keeps its local files (a wandb/ folder is made inside); default: --log-dir, else --save, "
                "else the current directory"})
    verbose: bool = field(default=False, metadata={"help": "show library warnings (also MEGATRON_TGDPO_VERBOSE=1)"})
    fused_logprobs: bool = field(default=True, metadata={
        "help": "compute the LM head inside the log-prob op, chunk by chunk, so the last stage never holds "
                "[tokens, vocab/TP] logits (--no-fused-logprobs: megatron's output layer, then the plain op)"})
    logits_chunk_size: Optional[int] = field(default=None, metadata={
        "help": "tokens per log-prob chunk; default: chunks whose fp32 work buffer is 128 MiB"})

    # ------------------------------------------------------------------------------------------
    def weight_clamp(self) -> Optional[tuple[Optional[float], Optional[float]]]:
        if self.weight_clamp_min is None and self.weight_clamp_max is None:
            return None
        return (self.weight_clamp_min, self.weight_clamp_max)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if text in (name, f"Optional[{name}]"):
            return typ
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-tgdpo-train",
        description="DPO / TGDPO / SFT training on megatron-core (launch with torchrun or srun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    for f in fields(TrainConfig):
        typ = _field_type(f)
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help", " "))
        if typ is bool:
            # --sequence-parallel, --sequence-parallel true/false, --no-sequence-parallel
            kwargs.update(nargs="?", const=True, type=_parse_bool)
            parser.add_argument(_flag(f.name), **kwargs)
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            if f.name == "loss_type":
                kwargs["choices"] = LOSS_TYPES
            parser.add_argument(_flag(f.name), type=typ, **kwargs)
    return parser


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot be read ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    known = {f.name: f for f in fields(TrainConfig)}
    out, unknown = {}, []
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known:
            unknown.append(f"--config {path}: unknown option {key!r}; see --help for the names")
        out[name] = value
    if unknown:
        raise ConfigError(unknown if len(unknown) > 1 else unknown[0])
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = flag_checks.checked_parser(build_parser())
    args = vars(parser.parse_args(argv))
    values = load_yaml(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    values.update(args)
    cfg = TrainConfig(**values)
    _coerce_types(cfg)
    if flag_checks.config_problems(cfg):  # every number in range before anything else looks at it
        raise ConfigError(flag_checks.config_problems(cfg))
    return cfg


def parse_tool_args(
    tool_parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], *, applies: str
) -> tuple[argparse.Namespace, TrainConfig]:
    """For tools that take their own flags plus the training flags: the tool's flags first, the rest
    through :func:`parse_args`. ``--help`` prints both, saying which training flags ``applies``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    tool_parser = flag_checks.checked_parser(tool_parser)
    if "-h" in argv or "--help" in argv:
        tool_parser.print_help()
        print(f"\ntraining flags ({applies} apply):\n")
        flag_checks.checked_parser(build_parser()).print_help()
        raise SystemExit(0)
    tool_args, rest = tool_parser.parse_known_args(argv)
    return tool_args, parse_args(rest)


def _coerce_types(cfg: TrainConfig) -> None:
    """YAML may give ints for floats etc.; normalise so equality and arithmetic behave."""
    problems = []
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        typ = _field_type(f)
        if value is None or typ is str:
            continue
        try:
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            setattr(cfg, f.name, _parse_bool(value) if typ is bool else typ(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            problems.append(f"{_flag(f.name)}: expected {typ.__name__}, got {value!r}")
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

# (flag, lowest allowed, inclusive?) for numbers that have a floor; None fields are skipped.
_AT_LEAST = (
    ("tensor_model_parallel_size", 1), ("pipeline_model_parallel_size", 1), ("context_parallel_size", 1),
    ("micro_batch_size", 1), ("global_batch_size", 1), ("seq_length", 2), ("pad_to_multiple_of", 1),
    ("train_iters", 1), ("save_interval", 1), ("eval_interval", 1), ("keep_last", 1), ("log_interval", 1),
    ("eval_iters", 0), ("skip_nonfinite_steps", 0), ("logits_chunk_size", 1),
    ("virtual_pipeline_model_parallel_size", 2),
)
_NON_NEGATIVE = ("min_lr", "weight_decay", "clip_grad")
_POSITIVE = ("lr", "beta", "train_epochs", "exit_duration_in_mins")


def _number_problems(cfg: TrainConfig) -> list[str]:
    p = []
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            p.append(f"{_flag(f.name)} {value} is not a finite number")
    bad = {line.split()[0] for line in p}
    for name, low in _AT_LEAST:
        value = getattr(cfg, name)
        if value is not None and value < low:
            p.append(f"{_flag(name)} must be >= {low}, got {value}")
    for name in _NON_NEGATIVE:
        value = getattr(cfg, name)
        if _flag(name) not in bad and value is not None and value < 0:
            p.append(f"{_flag(name)} must be >= 0, got {value}")
    for name in _POSITIVE:
        value = getattr(cfg, name)
        if _flag(name) not in bad and value is not None and value <= 0:
            p.append(f"{_flag(name)} must be > 0, got {value}")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(cfg, name)
        if _flag(name) not in bad and not 0.0 <= value < 1.0:
            p.append(f"{_flag(name)} must be in [0, 1), got {value}")
    return p


def _path_problems(cfg: TrainConfig) -> list[str]:
    p = []
    for name in ("ref_load", "guidance_load", "data_path", "eval_data_path", "logprob_cache", "tokenizer"):
        path = getattr(cfg, name)
        if path is None:
            continue
        probe = path + ".idx" if name in ("data_path", "eval_data_path") else path
        if not os.path.exists(probe):
            p.append(f"{_flag(name)} {path}: does not exist")
    if cfg.load is not None:
        if os.path.isfile(cfg.load) and not cfg.load.endswith(".gguf"):  # a GGUF model file is a model source
            p.append(f"--load {cfg.load}: is a file; give a checkpoint directory (the --save root or one of its "
                     "iter_* directories), a model directory or a .gguf model file")
        elif not os.path.exists(cfg.load) and cfg.load != cfg.save:
            p.append(f"--load {cfg.load}: does not exist; to start a fresh run drop --load (or pass the same "
                     "directory as --save: an empty or missing save directory then starts from iteration 0)")
    for name in ("save", "log_dir"):
        path = getattr(cfg, name)
        if path is not None and os.path.isfile(path):
            p.append(f"{_flag(name)} {path}: is a file; give a directory")
    return p


def validate(cfg: TrainConfig, *, world_size: int, num_heads: int, num_query_groups: int, num_layers: int) -> list[str]:
    """Every problem that can be found before any compute, each naming the flag(s) to change."""
    p = _number_problems(cfg)
    if cfg.model not in PRESET_NAMES:
        close = [n for n in PRESET_NAMES if n.split("-")[0] in cfg.model or cfg.model in n]
        hint = f" (did you mean {close[0]}?)" if close else ""
        p.append(f"--model {cfg.model!r} is not a preset; choose one of {', '.join(PRESET_NAMES)}{hint}")
    if cfg.lr_decay_style not in LR_DECAY_STYLES:
        p.append(f"--lr-decay-style {cfg.lr_decay_style!r}: choose one of {', '.join(LR_DECAY_STYLES)}")
    if any(line.split()[0] in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                               "--context-parallel-size", "--micro-batch-size", "--global-batch-size",
                               "--seq-length", "--pad-to-multiple-of") for line in p):
        return p + _path_problems(cfg)  # the layout arithmetic below needs these to be sane
    tp, pp, cp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.context_parallel_size
    vpp = cfg.virtual_pipeline_model_parallel_size
    dp = None  # unknown until the rank count fits the model-parallel sizes
    if world_size % (tp * pp * cp):
        p.append(f"{world_size} ranks are not divisible by TP*PP*CP = {tp}*{pp}*{cp}; "
                 "change --tensor/--pipeline/--context-parallel sizes or the number of ranks")
    else:
        dp = world_size // (tp * pp * cp)
    if num_heads % tp or num_query_groups % tp:
        p.append(f"--tensor-model-parallel-size {tp} must divide the attention heads ({num_heads}) "
                 f"and KV heads ({num_query_groups}) of the model")
    if num_layers % (pp * (vpp or 1)):
        p.append(f"--pipeline-model-parallel-size {pp} x --virtual-pipeline-model-parallel-size {vpp or 1} "
                 f"must divide the {num_layers} layers of the model")
    if vpp is not None and pp == 1:
        p.append("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1")
    if dp is None:
        pass
    elif cfg.global_batch_size % (cfg.micro_batch_size * dp):
        p.append(f"--global-batch-size {cfg.global_batch_size} must be divisible by --micro-batch-size "
                 f"{cfg.micro_batch_size} x data-parallel size {dp}")
    elif vpp is not None and (cfg.global_batch_size // (cfg.micro_batch_size * dp)) % pp:
        p.append("with virtual pipeline stages the number of micro-batches must be a multiple of "
                 f"--pipeline-model-parallel-size {pp}; raise --global-batch-size")
    if cfg.sequence_parallel and tp == 1:
        p.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if cfg.sequence_parallel and cfg.seq_length % tp:
        p.append(f"--seq-length {cfg.seq_length} must be divisible by TP {tp} with --sequence-parallel")
    from megatron_tgdpo.data.collate import padding_multiple

    pad = padding_multiple(pad_to_multiple_of=cfg.pad_to_multiple_of, tensor_parallel=tp,
                           sequence_parallel=cfg.sequence_parallel, context_parallel=cp)
    if cp > 1 and cfg.pad_to_multiple_of % (2 * cp):
        p.append(f"--pad-to-multiple-of {cfg.pad_to_multiple_of} must be divisible by 2 x "
                 f"--context-parallel-size = {2 * cp} (each CP rank holds two sequence chunks)")
    if cfg.seq_length % pad:
        p.append(f"--seq-length {cfg.seq_length} must be a multiple of the padding multiple {pad} "
                 "(--pad-to-multiple-of, 2 x --context-parallel-size, and TP x CP with --sequence-parallel)")
    if cfg.train_iters is None and cfg.train_epochs is None:
        p.append("set --train-iters or --train-epochs")
    if cfg.train_iters is not None and cfg.train_epochs is not None:
        p.append("set only one of --train-iters and --train-epochs")
    if cfg.loss_type == "tgdpo" and cfg.guidance_load is None and cfg.logprob_cache is None and cfg.alpha != 0:
        p.append("--loss-type tgdpo needs --guidance-load (a DPO-trained checkpoint) or --logprob-cache; "
                 "or use --loss-type dpo")
    if cfg.loss_type in ("simpo", "sft") and cfg.logprob_cache is not None:
        p.append(f"--logprob-cache does not apply to --loss-type {cfg.loss_type} (it uses no reference model)")
    if cfg.loss_type == "sft" and cfg.guidance_load is not None:
        p.append("--guidance-load does not apply to --loss-type sft")
    p.extend(_path_problems(cfg))
    if not 0.0 <= cfg.lr_warmup_fraction <= 1.0:
        p.append("--lr-warmup-fraction must be in [0, 1]")
    if cfg.min_lr > cfg.lr:
        p.append(f"--min-lr {cfg.min_lr} exceeds --lr {cfg.lr}")
    clamp = cfg.weight_clamp()
    if clamp is not None and cfg.loss_type != "tgdpo":
        p.append("--weight-clamp-min/--weight-clamp-max apply to TGDPO token weights; drop them or use --loss-type tgdpo")
    if clamp is not None and None not in clamp and clamp[0] > clamp[1]:
        p.append(f"--weight-clamp-min {clamp[0]} is above --weight-clamp-max {clamp[1]}")
    if cfg.label_smoothing and cfg.loss_type in ("ipo", "sft"):
        p.append(f"--label-smoothing does not apply to --loss-type {cfg.loss_type}")
    if not 0.0 <= cfg.label_smoothing <= 0.5:
        p.append("--label-smoothing must be in [0, 0.5]")
    if cfg.fp8_format is not None and cfg.fp8_format not in ("hybrid", "e4m3"):
        p.append("--fp8-format must be hybrid or e4m3")
    if cfg.save_interval is not None and cfg.save is None:
        p.append("--save-interval needs --save")
    if cfg.keep_last is not None and cfg.save is None:
        p.append("--keep-last needs --save")
    return p
