"""Checks of a valid config against the world, made before any process group or model exists.

engine.config checks each value on its own (type, finite, range). This module checks what
needs the filesystem: every path exists, every benchmark is known and readable, and a
resume keeps the optimizer and schedule settings its checkpoint recorded. train.py's main runs
it right after the config loads, on every rank. A failure is a ConfigError, which exits with
code 2: nothing has trained, been checkpointed or been exported yet.

A model hub id's config.json is fetched here (or, offline, a known Qwen2.5 id's built-in config
stands in for it); any other id the hub does not answer is refused. Data hub ids are accepted by
their shape (owner/name) and fetched later.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from limo.data.chat import TRAINING_HINT, missing_tokenizer
from limo.engine.checkpoint import Checkpointer
from limo.engine.config import Config, ConfigError, check_resume

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # the owner/name shape data.sources and model.weights fetch
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def preflight(cfg: Config) -> None:
    _check_output_dir(Path(cfg.train.output_dir))
    _check_paths(cfg)
    _check_model(cfg)
    _check_tokenizer(cfg)
    _check_benchmarks(cfg.eval.benchmarks)
    _check_checkpoints(cfg)
    _check_world(cfg)


def _check_world(cfg: Config) -> None:
    """The layout against torchrun's world size (WORLD_SIZE; a plain run is a world of one)."""
    from limo.engine.distributed import check_world

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        check_world(world, cfg.parallel.dp_replicate, cfg.parallel.cp)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_output_dir(out: Path) -> None:
    """train.output_dir can be made: its nearest existing ancestor is a folder we may create in
    (tried with a uniquely named folder, removed at once: ranks check side by side, and nothing stays)."""
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"train.output_dir={str(out)!r}: {ancestor} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".limo-probe-", dir=ancestor))
    except OSError as e:
        raise ConfigError(f"train.output_dir={str(out)!r}: cannot create folders in {ancestor} ({e.strerror})") from None


def _check_model(cfg: Config) -> None:
    """The model's architecture can be known without its weights: a folder's config.json, a hub
    id's (fetched alone), or the built-in config of a known Qwen2.5 id when the hub does not answer."""
    from limo.model.weights import WeightsError, model_args

    try:
        model_args(cfg)
    except (WeightsError, ValueError) as e:  # ArchitectureError too: an unsupported config.json
        raise ConfigError(f"model.path: {e}") from None


def _check_tokenizer(cfg: Config) -> None:
    """The folder training reads its tokenizer from (data.tokenizer, else a local model.path) has one."""
    model, tokenizer = cfg.model.path, cfg.data.tokenizer
    folder = tokenizer if tokenizer is not None else model if model is not None and Path(model).is_dir() else None
    if folder is not None and (message := missing_tokenizer(folder, TRAINING_HINT)):
        raise ConfigError(message)


def _check_paths(cfg: Config) -> None:
    model = cfg.model.path
    if model is not None and not Path(model).is_dir() and not _HUB_ID.match(model):
        raise ConfigError(f"model.path={model!r}: no such folder (nor a hub id like 'Qwen/Qwen2.5-32B-Instruct')")
    if model is not None and Path(model).is_dir() and not (Path(model) / "config.json").is_file():
        raise ConfigError(f"model.path={model!r}: the folder has no config.json, so it is not a Hugging Face model")
    data = cfg.data.path
    hub_id = not Path(data).exists() and Path(data).suffix not in _DATA_SUFFIXES and _HUB_ID.match(data)
    if data != "synthetic" and not Path(data).is_file() and not hub_id:
        raise ConfigError(f"data.path={data!r}: no such data file ({', '.join(_DATA_SUFFIXES)}), nor 'synthetic' or a hub dataset id")
    tokenizer = cfg.data.tokenizer
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ConfigError(f"data.tokenizer={tokenizer!r}: no such folder")


def _check_benchmarks(items: list[str]) -> None:
    """Each `name` or `name=source` (eval.run's syntax) names a known benchmark whose local file
    reads; `hf:` sources are fetched later."""
    # Imported here, not at the top: engine never imports eval when it loads (eval builds on
    # engine), and the names live in one place, limo/data/suites.py's SUITE.
    from limo.data.suites import SUITE, SYNTHETIC, load_benchmark

    for item in items:
        name, _, source = item.strip().partition("=")
        if name != SYNTHETIC and name not in SUITE:
            raise ConfigError(f"eval.benchmarks: unknown benchmark {name!r}; known: {', '.join([*SUITE, SYNTHETIC])}")
        if name == SYNTHETIC or source.startswith("hf:"):
            continue
        try:
            load_benchmark(name, source or None)
        except (OSError, ValueError) as e:  # a missing file, or a record the reader refuses: both name it
            raise ConfigError(f"eval.benchmarks: {item}: {e}") from None


def _check_checkpoints(cfg: Config) -> None:
    checkpointer = Checkpointer(cfg.train.output_dir, cfg.checkpoint.keep_last, rank=0)
    existing = checkpointer.complete()
    if existing and not cfg.checkpoint.resume:  # a fresh run's saves would interleave with the old ones
        raise ConfigError(
            f"checkpoint.resume=false, but {checkpointer.root} holds checkpoints of an earlier run (newest: {existing[-1].name}); "
            "choose another train.output_dir, or remove that folder"
        )
    recorded = checkpointer.recorded_settings() if cfg.checkpoint.resume else None
    if recorded is not None:
        check_resume(cfg, recorded[1], str(recorded[0]))
