"""Training configuration: a core dataclass plus one section per method, a YAML file, Megatron-style flags.

Every field is a flag: ``tensor_model_parallel_size`` <-> ``--tensor-model-parallel-size``, and a
section's fields too (``PreferenceConfig.alpha`` <-> ``--alpha``): flags keep their Megatron names.
:func:`build_parser` is the one builder from dataclasses to flags; a command passes the sections its
method reads (``train``: ``preference``; ``ppo``: ``ppo``), and a flag of any other section is refused
by name. A YAML file (``--config run.yaml``) may set the same names (with dashes or underscores), flat or
under the section's name (``preference: {alpha: 0.5}``); the command line wins. :func:`validate` is the
one place parsed values are checked before any compute, each problem naming the flag to change;
:class:`ConfigError` carries those lines to the entry point, which prints them on rank 0 and exits 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence

import yaml

from megatron_tgdpo import flag_checks
from megatron_tgdpo.losses import LOSS_TYPES as PREFERENCE_LOSS_TYPES
from megatron_tgdpo.models.llama import PRESETS

LOSS_TYPES = PREFERENCE_LOSS_TYPES + ("sft", "rm")
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
class PreferenceConfig:
    """The ``preference`` section: what DPO / TGDPO / IPO / SimPO (and SFT's refusals) read."""

    alpha: float = 0.5
    label_smoothing: float = 0.0
    weight_clamp_min: Optional[float] = None
    weight_clamp_max: Optional[float] = None
    simpo_gamma: float = 0.5
    rm_margin: float = field(default=0.0, metadata={
        "help": "--loss-type rm: margin m of the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - m)"})
    guidance_load: Optional[str] = field(default=None, metadata={"help": "guidance model for tgdpo"})
    logprob_cache: Optional[str] = field(default=None, metadata={"help": "offline ref/guidance log-prob cache"})
    # --- token guidance plug-ins (megatron_tgdpo.guidance, docs/guidance.md) ---
    guidance_source: str = field(default="dpo-model", metadata={
        "help": "where TGDPO's per-token reward comes from: dpo-model (beta * log(pi_guide / pi_ref), the "
                "--guidance-load model), score-file (--guidance-scores), reward-model (a --loss-type rm checkpoint "
                "as --guidance-load: its value differences), or a registered source"})
    guidance_scores: Optional[str] = field(default=None, metadata={
        "help": "JSONL of per-token scores by pair index, for --guidance-source score-file"})
    guidance_scale: float = field(default=1.0, metadata={
        "help": "--guidance-source reward-model: r = scale * (V(x, y<=t) - V(x, y<t)); 1 keeps the reward model's "
                "Bradley-Terry units, those of DPO's beta * log-ratio (docs/guidance.md)"})
    token_weight: str = field(default="linear", metadata={
        "help": "token weights from the reward: linear (1 +- alpha r), clipped, tanh, exp, normalised, and the "
                "controls shuffled and constant-rejected"})
    token_weight_bound: float = field(default=0.5, metadata={
        "help": "c of --token-weight clipped (weights in [1-c, 1+c]) and tanh (1 + c tanh(alpha r / c))"})
    rejected_weight: Optional[float] = field(default=None, metadata={
        "help": "the constant rejected-token weight of --token-weight constant-rejected"})

    def weight_clamp(self) -> Optional[tuple[Optional[float], Optional[float]]]:
        if self.weight_clamp_min is None and self.weight_clamp_max is None:
            return None
        return (self.weight_clamp_min, self.weight_clamp_max)


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
    pack_sequences: bool = field(default=True, metadata={
        "help": "pack several pairs into one row of up to 2 x micro-batch-size x seq-length tokens (no padding "
                "between them; attention and RoPE stay within each sequence); --no-pack-sequences: one padded "
                "row per sequence (PPO always uses rows)"})
    share_prompt: Optional[bool] = field(default=None, metadata={
        "help": "each pair's prompt computed once per packed row, both responses attending to it (exact; no "
                "effect on --loss-type sft). Default: on with packed rows on the local attention (CPU, or GPU "
                "without TransformerEngine), off with --no-pack-sequences and on TransformerEngine attention "
                "(--share-prompt turns it on there, at --context-parallel-size 1); --no-share-prompt: off"})
    data_cache_dir: str = "runs/data"
    # --- loss ---------------------------------------------------------------------------------
    loss_type: str = field(default="tgdpo", metadata={"choices": LOSS_TYPES})
    beta: float = 0.1
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
    frozen_micro_batches_per_call: int = field(default=0, metadata={
        "help": "packed micro-batches a frozen reference/guidance model scores per forward call, as one longer "
                "row (exact on CPU); 0: automatic (CPU without pipeline parallelism: up to 4096 row positions per "
                "call; otherwise 1)"})

    # --- the chosen method's own settings (sections) ------------------------------------------
    preference: PreferenceConfig = field(default_factory=PreferenceConfig, metadata={"section": True})
    #: PPO's section (``algorithms.ppo.config.PPOConfig``) on a ``python -m megatron_tgdpo.ppo`` run
    ppo: Optional[Any] = field(default=None, metadata={"section": True})

    def __getattr__(self, name: str) -> Any:
        # Flat names of the preference section keep reading as before (``cfg.alpha`` is
        # ``cfg.preference.alpha``); only reached when ``name`` is not a core field.
        if not name.startswith("__") and name in PREFERENCE_NAMES:
            section = self.__dict__.get("preference")
            if section is not None:
                return getattr(section, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PREFERENCE_NAMES = frozenset(f.name for f in fields(PreferenceConfig)) | {"weight_clamp"}


#: the sections ``python -m megatron_tgdpo.train`` reads (its --loss-type values are preference methods and SFT)
TRAIN_SECTIONS: dict[str, type] = {"preference": PreferenceConfig}
#: what each section is for, in messages refusing its flags elsewhere
SECTION_USES = {"preference": "preference training: python -m megatron_tgdpo.train --loss-type dpo/tgdpo/ipo/simpo"}


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


def core_fields() -> list[dataclasses.Field]:
    """TrainConfig's own settings (every method's), without the sections."""
    return [f for f in fields(TrainConfig) if not f.metadata.get("section")]


def _option_fields(sections: Mapping[str, type]) -> dict[str, dataclasses.Field]:
    """Every option of a command by its key: ``name`` for core settings, ``section.name`` for a section's."""
    out = {f.name: f for f in core_fields()}
    for section, cls in sections.items():
        out.update({f"{section}.{f.name}": f for f in fields(cls)})
    return out


def build_parser(*, sections: Optional[Mapping[str, type]] = None, prog: str = "megatron-tgdpo-train",
                 description: str = "DPO / TGDPO / SFT training on megatron-core (launch with torchrun or srun).",
                 ) -> argparse.ArgumentParser:
    """The flags of the core settings and of ``sections`` (default: the training command's), one per field.

    Defaults stay unset (``argparse.SUPPRESS``) so that a flag overrides the YAML file only when given."""
    sections = TRAIN_SECTIONS if sections is None else sections
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    groups = {section: parser.add_argument_group(f"{section} settings") for section in sections}
    for key, f in _option_fields(sections).items():
        section = key.partition(".")[0] if "." in key else None
        target = parser if section is None else groups[section]
        typ = _field_type(f)
        text = f.metadata.get("help", " ")
        if section is not None:  # a section's defaults are its own: say them
            text = f"{text} (default: {f.default})" if text.strip() else f"default: {f.default}"
        kwargs: dict[str, Any] = dict(dest=key, default=argparse.SUPPRESS, help=text, metavar=f.name.upper())
        if typ is bool:
            # --sequence-parallel, --sequence-parallel true/false, --no-sequence-parallel
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
            target.add_argument(_flag(f.name), **kwargs)
            target.add_argument("--no-" + f.name.replace("_", "-"), dest=key, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            target.add_argument(_flag(f.name), type=typ, required=bool(f.metadata.get("required")), **kwargs)
    return parser


def _foreign_names(sections: Mapping[str, type], *, refused: Mapping[str, str]) -> dict[str, str]:
    """Option name -> why it does not apply, for the sections this command does not read."""
    out = {}
    for section, cls in TRAIN_SECTIONS.items():
        if section not in sections:
            out.update({f.name: f"a setting of {SECTION_USES[section]}" for f in fields(cls)})
    out.update(refused)
    return out


def _split_foreign(argv: Sequence[str], foreign: Mapping[str, str], *, method: str,
                   switches: frozenset[str]) -> tuple[list[str], list[str]]:
    """(one problem per flag of ``foreign`` in ``argv``, ``argv`` without those flags and their values):
    the rest is still parsed and checked, so one misplaced flag hides no other problem. ``switches``:
    the option names that take no value."""
    problems, kept = [], []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        name = token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") else None
        if name is not None and name not in foreign and name.startswith("no_") and name[3:] in foreign:
            name = name[3:]
        if name is None or name not in foreign:
            kept.append(token)
            continue
        problems.append(f"{_flag(name)} does not apply to {method} ({foreign[name]})")
        takes_value = "=" not in token and name not in switches and not token[2:].startswith("no-")
        if takes_value and i < len(tokens) and not tokens[i].startswith("--"):
            i += 1  # its value
    return problems, kept


def load_yaml(path: str, *, sections: Optional[Mapping[str, type]] = None, method: str = "this command",
              refused: Mapping[str, str] = {}) -> dict:
    """The options a YAML file sets, by key (``name``, or ``section.name`` for a section's settings).

    A section's settings may be given flat (``alpha: 0.5``) or under the section (``preference:
    {alpha: 0.5}``)."""
    sections = TRAIN_SECTIONS if sections is None else sections
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
    known = _option_fields(sections)
    flat = {key.rpartition(".")[2]: key for key in known}
    foreign = _foreign_names(sections, refused=refused)
    out, problems = {}, []

    def put(key: Any, value: Any, *, section: Optional[str]) -> None:
        name = str(key).lstrip("-").replace("-", "_")
        full = f"{section}.{name}" if section else flat.get(name, name)
        if name in foreign and section is None:
            problems.append(f"--config {path}: {key!r} does not apply to {method} ({foreign[name]})")
        elif full in known:
            out[full] = value
        else:
            problems.append(f"--config {path}: unknown option {key!r}{f' in {section}' if section else ''}; see "
                            "--help for the names")

    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in sections and isinstance(value, dict):
            for inner, inner_value in value.items():
                put(inner, inner_value, section=name)
        elif name in TRAIN_SECTIONS and name not in sections:
            problems.append(f"--config {path}: the {name!r} section does not apply to {method} (it holds the "
                            f"settings of {SECTION_USES[name]})")
        else:
            put(key, value, section=None)
    if problems:
        raise ConfigError(problems if len(problems) > 1 else problems[0])
    return out


def parse_args(argv: Optional[Sequence[str]] = None, *, sections: Optional[Mapping[str, type]] = None,
               method: str = "this command", refused: Mapping[str, str] = {}, **parser_args: str) -> TrainConfig:
    """The configuration from ``argv`` (and ``--config``): core settings plus ``sections`` (default: the
    training command's). A flag of a section this command does not read, or named in ``refused``
    (option name -> why), is refused by name."""
    import sys

    sections = TRAIN_SECTIONS if sections is None else sections
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = flag_checks.checked_parser(build_parser(sections=sections, **parser_args))
    foreign: list[str] = []
    if "-h" not in argv and "--help" not in argv:
        switches = frozenset(f.name for cls in TRAIN_SECTIONS.values() for f in fields(cls) if f.type in (bool, "bool"))
        foreign, argv = _split_foreign(argv, _foreign_names(sections, refused=refused), method=method,
                                       switches=switches)
    try:
        args = vars(parser.parse_args(argv))
    except ConfigError as exc:
        raise ConfigError(foreign + exc.problems) from None
    config_path = args.pop("config", None)
    values = load_yaml(config_path, sections=sections, method=method, refused=refused) if config_path else {}
    values.update(args)
    values = _coerce_types(values, _option_fields(sections))
    core = {k: v for k, v in values.items() if "." not in k}
    parts = {name: cls(**{k.partition(".")[2]: v for k, v in values.items() if k.startswith(name + ".")})
             for name, cls in sections.items()}
    cfg = TrainConfig(**core, **parts)
    problems = foreign + flag_checks.config_problems(cfg)  # every number in range before anything looks at it
    if problems:
        raise ConfigError(problems)
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


def _coerce_types(values: Mapping[str, Any], known: Mapping[str, dataclasses.Field]) -> dict[str, Any]:
    """YAML may give ints for floats etc.; normalise so equality and arithmetic behave."""
    out, problems = dict(values), []
    for key, value in values.items():
        f = known[key]
        typ = _field_type(f)
        if value is None or typ is str:
            continue
        try:
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            out[key] = _parse_bool(value) if typ is bool else typ(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            problems.append(f"{_flag(f.name)}: expected {typ.__name__}, got {value!r}")
    if problems:
        raise ConfigError(problems)
    return out


def flag_values(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting by its flag name (``--alpha`` -> value): the core ones and those of every section the
    run holds, for checks keyed by flag."""
    out = {_flag(f.name): getattr(cfg, f.name) for f in core_fields()}
    for f in fields(TrainConfig):
        section = getattr(cfg, f.name)
        if f.metadata.get("section") and dataclasses.is_dataclass(section):
            out.update({_flag(g.name): getattr(section, g.name) for g in fields(section)})
    return out


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
    for flag, value in flag_values(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            p.append(f"{flag} {value} is not a finite number")
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
    for name in ("ref_load", "guidance_load", "data_path", "eval_data_path", "logprob_cache", "tokenizer",
                 "guidance_scores"):
        path = getattr(cfg.preference if name in PREFERENCE_NAMES else cfg, name)
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


def _guidance_problems(cfg: TrainConfig) -> list[str]:
    """The guidance plug-ins: known names, and what the chosen ones need (``megatron_tgdpo.guidance``)."""
    from megatron_tgdpo.guidance import (DEFAULT_SOURCE, DEFAULT_WEIGHT, WEIGHT_FUNCTIONS, source_problems,
                                         weight_settings_of)

    pref, p = cfg.preference, []
    if cfg.loss_type != "tgdpo":
        changed = [flag for flag, value, default in (
            ("--guidance-source", pref.guidance_source, DEFAULT_SOURCE), ("--token-weight", pref.token_weight,
                                                                          DEFAULT_WEIGHT),
            ("--guidance-scores", pref.guidance_scores, None), ("--rejected-weight", pref.rejected_weight, None),
            ("--guidance-scale", pref.guidance_scale, 1.0))
            if value != default]
        return [f"{flag} applies to --loss-type tgdpo only" for flag in changed]
    if pref.token_weight not in WEIGHT_FUNCTIONS:
        return [f"--token-weight {pref.token_weight!r}: choose one of {', '.join(WEIGHT_FUNCTIONS)}"]
    function = WEIGHT_FUNCTIONS[pref.token_weight]
    settings = weight_settings_of(pref, seed=cfg.seed)
    check = getattr(function, "problems", None)
    p.extend(check(settings) if check is not None else [])
    uses_reward = getattr(function, "uses_reward", True)
    if uses_reward and pref.alpha != 0:
        p.extend(source_problems(pref.guidance_source, pref))
    if pref.rejected_weight is not None and pref.token_weight != "constant-rejected":
        p.append("--rejected-weight applies to --token-weight constant-rejected only")
    if pref.weight_clamp() is not None and not getattr(function, "clampable", True):
        p.append(f"--weight-clamp-min/--weight-clamp-max do not apply to --token-weight {pref.token_weight}")
    if pref.guidance_scores is not None and pref.guidance_source != "score-file":
        p.append("--guidance-scores applies to --guidance-source score-file only")
    if pref.guidance_scale != 1.0 and pref.guidance_source != "reward-model":
        p.append("--guidance-scale applies to --guidance-source reward-model only")
    return p


def shares_prompt(cfg: TrainConfig) -> bool:
    """Whether packed preference rows hold each pair's prompt once (``--share-prompt``).

    Asked for (``True``) or refused (``False``), it is what the user said (:func:`validate` refuses
    ``True`` where it cannot apply). Unset (``None``), it is on wherever it is exact and verified: packed
    rows on the local attention, whose shared-prompt path every layout's tests check against the
    unshared rows. TransformerEngine's path (``models/te_shared_prompt.py``) is checked only where a GPU
    runs ``tests/gpu``, so there it waits to be asked for. SFT rows hold single sequences: nothing to
    share, whatever was asked."""
    if cfg.loss_type == "sft":
        return False
    if cfg.share_prompt is not None:
        return bool(cfg.share_prompt)
    if not cfg.pack_sequences:
        return False
    from megatron_tgdpo import compat

    return not compat.te_available()


def _share_prompt_problems(cfg: TrainConfig) -> list[str]:
    if not cfg.share_prompt:  # off, or the default (shares_prompt decides, and never refuses)
        return []
    if cfg.context_parallel_size > 1:
        from megatron_tgdpo import compat

        if compat.te_available():
            # The local attention masks on global positions over all-gathered keys, so a response sees
            # its prompt's chunks on every rank; TE's context-parallel attention exchanges keys per
            # segment with equal query and key boundaries, which a shared prompt does not have.
            return [f"--share-prompt does not work with --context-parallel-size {cfg.context_parallel_size} "
                    "on TransformerEngine attention (its context-parallel attention stays inside each packed "
                    "segment); drop --share-prompt or use --context-parallel-size 1"]
    if not cfg.pack_sequences:
        return ["--share-prompt needs --pack-sequences (the prompt is shared inside a packed row)"]
    return []


def validate(cfg: TrainConfig, *, world_size: int, num_heads: int, num_query_groups: int, num_layers: int) -> list[str]:
    """Every problem that can be found before any compute, each naming the flag(s) to change: the one
    place parsed values are checked (``flag_values`` gives them by flag name, sections included)."""
    p = _number_problems(cfg)
    pref = cfg.preference
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
    p.extend(_share_prompt_problems(cfg))
    if cfg.train_iters is None and cfg.train_epochs is None:
        p.append("set --train-iters or --train-epochs")
    if cfg.train_iters is not None and cfg.train_epochs is not None:
        p.append("set only one of --train-iters and --train-epochs")
    p.extend(_guidance_problems(cfg))
    if cfg.loss_type in ("simpo", "sft", "rm") and pref.logprob_cache is not None:
        p.append(f"--logprob-cache does not apply to --loss-type {cfg.loss_type} (it uses no reference model)")
    if cfg.loss_type in ("sft", "rm") and pref.guidance_load is not None:
        p.append(f"--guidance-load does not apply to --loss-type {cfg.loss_type}")
    if cfg.loss_type == "rm" and cp > 1:
        p.append(f"--context-parallel-size {cp}: --loss-type rm reads each sequence's score at one position; "
                 "use --context-parallel-size 1")
    if pref.rm_margin and cfg.loss_type != "rm":
        p.append("--rm-margin applies to --loss-type rm only")
    p.extend(_path_problems(cfg))
    if not 0.0 <= cfg.lr_warmup_fraction <= 1.0:
        p.append("--lr-warmup-fraction must be in [0, 1]")
    if cfg.min_lr > cfg.lr:
        p.append(f"--min-lr {cfg.min_lr} exceeds --lr {cfg.lr}")
    clamp = pref.weight_clamp()
    if clamp is not None and cfg.loss_type != "tgdpo":
        p.append("--weight-clamp-min/--weight-clamp-max apply to TGDPO token weights; drop them or use --loss-type tgdpo")
    if clamp is not None and None not in clamp and clamp[0] > clamp[1]:
        p.append(f"--weight-clamp-min {clamp[0]} is above --weight-clamp-max {clamp[1]}")
    if pref.label_smoothing and cfg.loss_type in ("ipo", "sft", "rm"):
        p.append(f"--label-smoothing does not apply to --loss-type {cfg.loss_type}")
    if not 0.0 <= pref.label_smoothing <= 0.5:
        p.append("--label-smoothing must be in [0, 0.5]")
    if cfg.fp8_format is not None and cfg.fp8_format not in ("hybrid", "e4m3"):
        p.append("--fp8-format must be hybrid or e4m3")
    if cfg.save_interval is not None and cfg.save is None:
        p.append("--save-interval needs --save")
    if cfg.keep_last is not None and cfg.save is None:
        p.append("--keep-last needs --save")
    return p
