"""Training configuration: one dataclass, a YAML file, Megatron-style flags that override it.

Every field is a flag: ``tensor_model_parallel_size`` <-> ``--tensor-model-parallel-size``. A YAML file
(``--config run.yaml``) may set the same names (with dashes or underscores); the command line wins.
:func:`validate` checks everything that can be checked before any compute and names the flag to change.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

import yaml

LOSS_TYPES = ("dpo", "tgdpo", "ipo", "simpo")


@dataclass
class TrainConfig:
    # --- model --------------------------------------------------------------------------------
    model: str = field(default="tiny", metadata={"help": "preset: tiny, llama3.2-1b, llama3-8b, llama3-70b"})
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
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    train_iters: Optional[int] = None
    train_epochs: Optional[float] = None
    seed: int = 1234
    # --- models to load -----------------------------------------------------------------------
    load: Optional[str] = field(default=None, metadata={"help": "resume the policy from here if a checkpoint exists"})
    ref_load: Optional[str] = field(default=None, metadata={"help": "reference (and initial policy); default: seeded init"})
    guidance_load: Optional[str] = field(default=None, metadata={"help": "guidance model for tgdpo"})
    logprob_cache: Optional[str] = field(default=None, metadata={"help": "offline ref/guidance log-prob cache"})
    # --- checkpoints --------------------------------------------------------------------------
    load_optim: bool = field(default=True, metadata={"help": "restore optimizer state on resume (--no-load-optim)"})
    load_rng: bool = field(default=True, metadata={"help": "restore RNG state on resume (--no-load-rng)"})
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
    logits_chunk_size: Optional[int] = field(default=4096, metadata={"help": "tokens per log-prob chunk"})

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
        description="DPO / TGDPO preference training on megatron-core (launch with torchrun or srun).",
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
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise SystemExit(f"--config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise SystemExit(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option names to values")
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known:
            raise SystemExit(f"--config {path}: unknown option {key!r}; see --help for the names")
        out[name] = value
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    values = load_yaml(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    values.update(args)
    cfg = TrainConfig(**values)
    _coerce_types(cfg)
    return cfg


def parse_tool_args(
    tool_parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], *, applies: str
) -> tuple[argparse.Namespace, TrainConfig]:
    """For tools that take their own flags plus the training flags: the tool's flags first, the rest
    through :func:`parse_args`. ``--help`` prints both, saying which training flags ``applies``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        tool_parser.print_help()
        print(f"\ntraining flags ({applies} apply):\n")
        build_parser().print_help()
        raise SystemExit(0)
    tool_args, rest = tool_parser.parse_known_args(argv)
    return tool_args, parse_args(rest)


def _coerce_types(cfg: TrainConfig) -> None:
    """YAML may give ints for floats etc.; normalise so equality and arithmetic behave."""
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        typ = _field_type(f)
        if value is None or typ is str:
            continue
        try:
            setattr(cfg, f.name, _parse_bool(value) if typ is bool else typ(value))
        except (TypeError, ValueError):
            raise SystemExit(f"option {_flag(f.name)}: expected {typ.__name__}, got {value!r}") from None


def validate(cfg: TrainConfig, *, world_size: int, num_heads: int, num_query_groups: int, num_layers: int) -> list[str]:
    """Every problem that can be found before any compute, each naming the flag(s) to change."""
    p: list[str] = []
    tp, pp, cp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.context_parallel_size
    vpp = cfg.virtual_pipeline_model_parallel_size
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "micro_batch_size", "global_batch_size", "seq_length"):
        if getattr(cfg, name) < 1:
            p.append(f"{_flag(name)} must be >= 1")
    if p:
        return p
    dp = None  # unknown until the rank count fits the model-parallel sizes
    if world_size % (tp * pp * cp):
        p.append(f"{world_size} ranks are not divisible by TP*PP*CP = {tp}*{pp}*{cp}; "
                 "change --tensor/--pipeline/--context-parallel sizes or the number of ranks")
    else:
        dp = world_size // (tp * pp * cp)
    if num_heads % tp or num_query_groups % tp:
        p.append(f"--tensor-model-parallel-size {tp} must divide the attention heads ({num_heads}) "
                 f"and KV heads ({num_query_groups}) of --model {cfg.model}")
    if num_layers % (pp * (vpp or 1)):
        p.append(f"--pipeline-model-parallel-size {pp} x --virtual-pipeline-model-parallel-size {vpp or 1} "
                 f"must divide the {num_layers} layers of --model {cfg.model}")
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
    pad = math.lcm(cfg.pad_to_multiple_of, 2 * cp) if cp > 1 else cfg.pad_to_multiple_of
    if cp > 1 and cfg.pad_to_multiple_of % (2 * cp):
        p.append(f"--pad-to-multiple-of {cfg.pad_to_multiple_of} must be divisible by 2 x "
                 f"--context-parallel-size = {2 * cp} (each CP rank holds two sequence chunks)")
    if cfg.seq_length % pad:
        p.append(f"--seq-length {cfg.seq_length} must be a multiple of the padding multiple {pad} "
                 "(--pad-to-multiple-of, and 2 x --context-parallel-size)")
    if cfg.train_iters is None and cfg.train_epochs is None:
        p.append("set --train-iters or --train-epochs")
    if cfg.train_iters is not None and cfg.train_epochs is not None:
        p.append("set only one of --train-iters and --train-epochs")
    if cfg.loss_type == "tgdpo" and cfg.guidance_load is None and cfg.logprob_cache is None and cfg.alpha != 0:
        p.append("--loss-type tgdpo needs --guidance-load (a DPO-trained checkpoint) or --logprob-cache; "
                 "or use --loss-type dpo")
    for name in ("load", "ref_load", "guidance_load", "data_path", "eval_data_path", "logprob_cache"):
        path = getattr(cfg, name)
        if path is None or name == "load":
            continue
        probe = path if name not in ("data_path", "eval_data_path") else path + ".idx"
        if not os.path.exists(probe):
            p.append(f"{_flag(name)} {path}: does not exist")
    if not 0.0 <= cfg.lr_warmup_fraction <= 1.0:
        p.append("--lr-warmup-fraction must be in [0, 1]")
    if cfg.min_lr > cfg.lr:
        p.append(f"--min-lr {cfg.min_lr} exceeds --lr {cfg.lr}")
    if cfg.weight_clamp() is not None and cfg.loss_type != "tgdpo":
        p.append("--weight-clamp-min/--weight-clamp-max apply to TGDPO token weights; drop them or use --loss-type tgdpo")
    if cfg.label_smoothing and cfg.loss_type == "ipo":
        p.append("--label-smoothing does not apply to --loss-type ipo")
    if not 0.0 <= cfg.label_smoothing <= 0.5:
        p.append("--label-smoothing must be in [0, 0.5]")
    if cfg.beta <= 0:
        p.append("--beta must be > 0")
    if cfg.fp8_format is not None and cfg.fp8_format not in ("hybrid", "e4m3"):
        p.append("--fp8-format must be hybrid or e4m3")
    if cfg.save_interval is not None and cfg.save is None:
        p.append("--save-interval needs --save")
    return p
