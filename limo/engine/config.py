"""Typed run configuration: one dataclass per component, TOML recipes, dotted overrides.

A recipe is a TOML file whose tables mirror the dataclasses below (`[model]`, `[train]`, ...).
Command-line overrides name a field by its dotted path: `--train.max_steps=4` or
`--train.max_steps 4`. Everything is validated once, up front, before any process group or
model exists: an unknown key, a value of the wrong type, a float that is not finite or a value
out of range is a `ConfigError` that names the key, where it came from and what is allowed.
(limo/engine/preflight.py then checks the values against the world: paths, benchmarks, checkpoints.)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from limo.tools.errors import UserError


class ConfigError(UserError):
    """A recipe or override that cannot describe a valid run."""


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    preset: str | None = _help("named architecture, randomly initialised (see model.qwen2.PRESETS)", None)
    path: str | None = _help("Hugging Face model folder (config.json + safetensors); its tokenizer comes with it", None)
    init_std: float = _help("std of the normal init of a preset's matrices (model.path ignores it)", 0.02)

    def check(self) -> None:
        from limo.model.qwen2 import PRESETS

        if (self.preset is None) == (self.path is None):
            raise ConfigError("model: set exactly one of model.preset and model.path")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; allowed: {sorted(PRESETS)}")
        if not self.init_std > 0:
            raise ConfigError(f"model.init_std={self.init_std} must be > 0")


@dataclass
class DataConfig:
    path: str = _help("'synthetic' (embedded demo set), a .jsonl/.json/.parquet file, or a hub dataset id", "synthetic")
    format: Literal["auto", "limo", "messages", "alpaca"] = _help("record layout; auto detects it per file", "auto")
    tokenizer: str | None = _help("tokenizer folder; default: the model folder's, or the byte-level one for synthetic data", None)
    system_prompt: str | None = _help("system prompt; None keeps the chat template's default", None)
    max_tokens: int = _help("per-sample cutoff in tokens", 16384)
    overlong: Literal["drop", "truncate"] = _help("what to do with samples longer than max_tokens", "drop")
    tokens_per_microbatch: int = _help("token budget of one packed micro-batch per GPU", 16384)
    samples_per_step: int = _help("samples per optimizer step (global batch), independent of world size", 32)
    synthetic_samples: int = _help("number of training samples in the synthetic demo set", 817)

    def check(self) -> None:
        _positive(self, "data", "max_tokens", "tokens_per_microbatch", "samples_per_step", "synthetic_samples")
        if self.tokens_per_microbatch < self.max_tokens:
            raise ConfigError(
                f"data.tokens_per_microbatch={self.tokens_per_microbatch} is smaller than "
                f"data.max_tokens={self.max_tokens}: the longest sample must fit one micro-batch"
            )


@dataclass
class TrainConfig:
    output_dir: str = _help("where checkpoints, metrics.jsonl and the HF export go", "runs/default")
    epochs: int = _help("passes over the data (LIMO: 15)", 15)
    max_steps: int = _help("stop after this many optimizer steps; 0 runs the configured epochs", 0)
    seed: int = _help("seed for initialisation, data order and sampling", 0)
    dtype: Literal["bfloat16", "float32"] = _help("compute dtype (bfloat16 mixed precision, or float32 for exact tests)", "bfloat16")
    device: Literal["auto", "cpu", "cuda"] = _help("auto picks cuda when available", "auto")
    kernels: Literal["auto", "triton", "torch"] = _help("kernel backend (KERNELS_BACKEND overrides it)", "auto")
    max_grad_norm: float = _help("gradient-norm clipping threshold; 0 disables clipping", 1.0)
    max_bad_steps: int = _help("abort after this many consecutive non-finite steps", 3)
    memory_check: bool = _help("refuse to start when the memory planner says the plan does not fit", True)
    tensorboard: bool = _help("also write TensorBoard scalars to output_dir/tb", False)
    preemption_grace_s: float = _help("after SIGTERM/SIGINT: seconds to finish the step, save and exit (torchrun kills at 30)", 25.0)

    def check(self) -> None:
        _positive(self, "train", "epochs", "max_bad_steps", "preemption_grace_s")
        _non_negative(self, "train", "max_steps", "max_grad_norm", "seed")


@dataclass
class OptimConfig:
    lr: float = _help("peak learning rate (LIMO: 5e-6)", 5e-6)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak", 0.0)
    schedule: Literal["cosine", "linear", "constant"] = _help("decay after warmup", "cosine")
    warmup_ratio: float = _help("fraction of all steps spent warming up linearly (LIMO: 0)", 0.0)
    weight_decay: float = _help("AdamW decoupled weight decay; never applied to norms and biases", 0.0)
    beta1: float = _help("AdamW beta1", 0.9)
    beta2: float = _help("AdamW beta2", 0.999)
    eps: float = _help("AdamW epsilon", 1e-8)
    state_dtype: Literal["float32", "bfloat16"] = _help("dtype of AdamW's moment estimates", "float32")
    implementation: Literal["auto", "fused", "foreach"] = _help("AdamW implementation; auto: fused on GPU, foreach on CPU", "auto")

    def check(self) -> None:
        _positive(self, "optim", "lr", "eps")
        _non_negative(self, "optim", "weight_decay")
        if self.lr * self.weight_decay >= 1:  # decoupled decay multiplies each weight by 1 - lr * weight_decay
            raise ConfigError(f"optim.weight_decay={self.weight_decay} times optim.lr={self.lr} must be < 1: "
                              "decoupled decay would zero or flip the sign of every weight")
        for key in ("min_lr_ratio", "warmup_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must lie in [0, 1]")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must lie in [0, 1)")


@dataclass
class CheckpointConfig:
    every_steps: int = _help("save a DCP checkpoint every N optimizer steps; 0: only at epoch ends", 0)
    at_epoch_end: bool = _help("save at the end of every epoch", True)
    keep_last: int = _help("complete checkpoints kept on disk", 2)
    resume: bool = _help("resume from the newest complete checkpoint in output_dir", True)
    export_hf: bool = _help("write a Hugging Face export to output_dir/hf at the end", True)
    async_save: bool = _help("stage each save to host memory and write and hash it in the background; the steps go on", False)
    override: list[str] = _help(
        "resume although these optimizer/schedule keys differ from the checkpoint's, training on with this run's values "
        "(e.g. optim.lr,train.max_steps); without it such a resume is refused", default_factory=list)

    def check(self) -> None:
        _non_negative(self, "checkpoint", "every_steps")
        _positive(self, "checkpoint", "keep_last")
        unknown = [k for k in self.override if k not in RESUME_KEYS]
        if unknown:
            raise ConfigError(f"checkpoint.override names {', '.join(map(repr, unknown))}; allowed: {', '.join(RESUME_KEYS)}")


@dataclass
class ParallelConfig:
    dp_replicate: int = _help("HSDP replicas (usually the number of nodes); 1 is plain FSDP", 1)
    activation_checkpointing: Literal["none", "full", "selective"] = _help("recompute in backward: none, every block, or every other block", "full")
    reshard_after_forward: bool = _help("free each block's gathered weights after its forward (ZeRO-3); False keeps them (ZeRO-2)", True)
    prefetch: int = _help("blocks whose all-gather is issued ahead explicitly (0: FSDP's implicit prefetch)", 1)
    cpu_offload: bool = _help("keep sharded parameters, gradients and optimizer states in host memory", False)
    compile: bool = _help("torch.compile each decoder block", False)
    cp: int = _help("context parallelism: ranks that share each packed micro-batch's tokens (for 32k-64k-token samples); 1 is off", 1)

    def check(self) -> None:
        _positive(self, "parallel", "dp_replicate", "cp")
        if self.cp > 1 and self.compile:
            raise ConfigError("parallel.cp > 1 with parallel.compile=true: the context-parallel attention runs eagerly; set compile=false")
        _non_negative(self, "parallel", "prefetch")


@dataclass
class EvalConfig:
    benchmarks: list[str] = _help("benchmarks evaluated after training ('synthetic': the demo's held-out split)", default_factory=list)
    samples: int = _help("samples per problem for pass@1 (LIMO: 16 on AIME24/AMC23/CHMath, 1 elsewhere); 0 uses LIMO's protocol", 0)
    temperature: float = _help("sampling temperature when samples > 1", 0.7)
    max_tokens: int = _help("new tokens per answer (LIMO: 32768)", 32768)
    limit: int = _help("evaluate only the first N problems of each benchmark; 0: all", 0)

    def check(self) -> None:
        _non_negative(self, "eval", "samples", "temperature", "limit")
        _positive(self, "eval", "max_tokens")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            for f in dataclasses.fields(values):
                value = getattr(values, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{section.name}.{f.name}={value} must be a finite number")
            values.check()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# What a checkpoint records of the run that made it, and a resume must keep: the optimizer's
# settings and the schedule's (train.max_steps and train.epochs set its length). A resume that
# changes them would silently keep the checkpoint's schedule (the scheduler state holds the peak
# lr) or reshape it. Data and batch settings are checked by the loader's state.
RESUME_KEYS = (
    "optim.lr", "optim.min_lr_ratio", "optim.schedule", "optim.warmup_ratio", "optim.weight_decay", "optim.beta1",
    "optim.beta2", "optim.eps", "optim.state_dtype", "train.max_grad_norm", "train.max_steps", "train.epochs",
)  # fmt: skip


def resume_settings(cfg: Config) -> dict[str, Any]:
    """The values of RESUME_KEYS in `cfg`, as a checkpoint records them."""
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in RESUME_KEYS}


def check_resume(cfg: Config, recorded: dict[str, Any], where: str) -> None:
    """Refuse to resume from the checkpoint at `where` with optimizer or schedule settings other
    than those it `recorded`, except the keys checkpoint.override names."""
    now = resume_settings(cfg)
    changed = [k for k in RESUME_KEYS if k in recorded and recorded[k] != now[k] and k not in cfg.checkpoint.override]
    if changed:
        diff = "; ".join(f"{k}: {recorded[k]!r} there, {now[k]!r} here" for k in changed)
        raise ConfigError(
            f"{where} was made with other optimizer/schedule settings ({diff}). Rerun with the checkpoint's values, or train "
            f"on with this run's: --checkpoint.override={','.join(changed)}"
        )


def _positive(obj: Any, section: str, *keys: str) -> None:
    for key in keys:
        if getattr(obj, key) <= 0:
            raise ConfigError(f"{section}.{key}={getattr(obj, key)} must be > 0")


def _non_negative(obj: Any, section: str, *keys: str) -> None:
    for key in keys:
        if getattr(obj, key) < 0:
            raise ConfigError(f"{section}.{key}={getattr(obj, key)} must be >= 0")


# ---------------------------------------------------------------------------------------------
# Typed assignment


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return "None" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check a TOML value (already typed) against the field type; ints widen to floats."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key, where)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], key, where) for v in value]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: {key} = {value!r} is not {_describe(tp)}")


def _parse_text(text: str, tp: Any) -> Any:
    """Turn command-line text into a value of the field's type (before _coerce checks it)."""
    origin = typing.get_origin(tp)
    arms = typing.get_args(tp) if origin in (types.UnionType, typing.Union) else (tp,)
    if type(None) in arms and text.lower() in ("none", "null"):
        return None
    for arm in arms:
        arm_origin = typing.get_origin(arm)
        if arm is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
        elif arm is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif arm is float:
            try:
                return float(text)
            except ValueError:
                pass
        elif arm_origin is list:
            return [_parse_text(t.strip(), typing.get_args(arm)[0]) for t in text.split(",") if t.strip()]
    return text


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, allowed: list[str], where: str) -> ConfigError:
    """`allowed` are section names (the section is unknown) or a section's dotted keys."""
    typed = key.partition(".")[0] if "." not in allowed[0] else key.rsplit(".", 1)[-1]
    names = {a.rsplit(".", 1)[-1]: a for a in allowed}
    close = difflib.get_close_matches(typed, list(names), n=1)
    hint = f" (did you mean {names[close[0]]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _assign(cfg: Config, dotted: str, value: Any, where: str, from_text: bool) -> None:
    section, _, name = dotted.partition(".")
    sections = _sections()
    if section not in sections:
        raise _unknown(dotted, list(sections), where)
    types_ = _field_types(sections[section])
    if not name or name not in types_:
        raise _unknown(dotted, [f"{section}.{k}" for k in types_], where)
    tp = types_[name]
    if from_text:
        value = _parse_text(value, tp)
    setattr(getattr(cfg, section), name, _coerce(value, tp, dotted, where))


def _split_overrides(argv: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: expected --section.key=value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(argv):
            key, text = arg[2:], argv[i + 1]
            i += 1
        else:
            raise ConfigError(f"command line: {arg} has no value")
        pairs.append((key, text))
        i += 1
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated Config from a TOML recipe and `--section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a table like [{section}]")
            for name, value in table.items():
                _assign(cfg, f"{section}.{name}", value, str(path), from_text=False)
    pairs = _split_overrides(overrides or [])
    for key, text in pairs:
        _assign(cfg, key, text, "command line", from_text=True)
    # model.path and model.preset are one choice: the command line's replaces the recipe's.
    given = {key for key, _ in pairs}
    named = [k for k in ("model.path", "model.preset") if k in given and getattr(cfg.model, k.removeprefix("model.")) is not None]
    if len(named) > 1:
        raise ConfigError("command line: model.path and model.preset both given; set exactly one of them")
    if named:
        setattr(cfg.model, "path" if named[0] == "model.preset" else "preset", None)
    cfg.check()
    return cfg


def describe_keys() -> str:
    """Every key with its type, default and help: the body of `limo/engine/train.py --help`."""
    lines = []
    for section, cls in _sections().items():
        lines.append(f"[{section}]")
        defaults = cls()
        for f in dataclasses.fields(cls):
            tp = _field_types(cls)[f.name]
            lines.append(f"  --{section}.{f.name} ({_describe(tp)}, default {getattr(defaults, f.name)!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
