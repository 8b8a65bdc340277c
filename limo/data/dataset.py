"""A DataConfig -> encoded samples and a report: the one entry point the training loop calls.

    tokenizer = resolve_tokenizer(cfg.data, model_path=cfg.model.path)
    samples, report = load_samples(cfg.data, tokenizer)

Samples longer than `max_tokens` are dropped or truncated as configured, and always counted;
a truncated sample whose cut leaves no supervised token is dropped too (it would only cost
compute). Token ids live in int32 tensors: the LIMO set is ~4M tokens, which as Python lists
would take hundreds of MB per rank.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from limo.data import synthetic
from limo.data.chat import IGNORE, TRAINING_HINT, encode, missing_tokenizer
from limo.data.sources import DataError, Sample, load_records

log = logging.getLogger(__name__)


@dataclass
class EncodedSample:
    """One tokenized conversation; labels are NOT shifted (labels[t] is the label of token t)."""

    input_ids: torch.Tensor  # [L] int32
    labels: torch.Tensor  # [L] int32, -100 outside assistant replies
    index: int  # position in the training set, the identity the loader shuffles
    where: str = ""
    truncated: bool = False
    num_label_tokens: int = field(init=False)  # supervised targets once shifted: labels[1:] != -100

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.labels.shape or self.input_ids.dim() != 1 or len(self.input_ids) == 0:
            shapes = f"input_ids {tuple(self.input_ids.shape)} and labels {tuple(self.labels.shape)}"
            raise DataError(f"{self.where}: {shapes} must be equal, non-empty 1-D")
        self.num_label_tokens = int((self.labels[1:] != IGNORE).sum())

    def __len__(self) -> int:
        return len(self.input_ids)


class DataSettings(Protocol):
    """What loading reads of a run's data settings: engine.config.DataConfig, or any object with
    these attributes (data.inspect builds its own from the command line)."""

    path: str
    format: str
    tokenizer: str | None
    system_prompt: str | None
    max_tokens: int
    overlong: str
    synthetic_samples: int


@dataclass
class DataReport:
    source: str = ""
    format: str = ""
    records: int = 0
    duplicates: int = 0
    overlong: int = 0  # samples longer than max_tokens (dropped or truncated, as configured)
    truncated: int = 0
    dropped: int = 0  # overlong under "drop", plus truncated samples left with no supervised token
    samples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    max_len: int = 0
    max_token_id: int = -1

    def summary(self) -> str:
        mean = self.tokens / max(self.samples, 1)
        return (
            f"{self.source}: {self.records} records ({self.format}), {self.duplicates} duplicates; "
            f"{self.overlong} over the cutoff ({self.truncated} truncated, {self.dropped} dropped); "
            f"{self.samples} samples, {self.tokens} tokens (mean {mean:.0f}, max {self.max_len}), "
            f"{self.label_tokens} supervised"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_tokenizer(data_cfg: DataSettings, model_path: str | os.PathLike | None = None) -> Any:
    """data.tokenizer, else the model folder's tokenizer, else the byte-level one for synthetic data."""
    from transformers import AutoTokenizer

    folder, key = (data_cfg.tokenizer, "data.tokenizer") if data_cfg.tokenizer else (model_path, "model.path")
    if folder is None:
        if data_cfg.path == "synthetic":
            return synthetic.byte_tokenizer()
        raise DataError(f"data.path={data_cfg.path!r} needs a tokenizer: set data.tokenizer (a folder) or model.path")
    if not Path(folder).is_dir():  # never let from_pretrained read a missing folder as a hub id
        raise DataError(f"{key}={folder!r} is not a folder")
    if message := missing_tokenizer(folder, TRAINING_HINT):
        raise DataError(message)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise DataError(f"{key}={folder!r}: cannot load a tokenizer from it ({e})") from None


def _records(data_cfg: DataSettings, seed: int) -> tuple[list[Sample], str, str, int]:
    if data_cfg.path == "synthetic":
        records = synthetic.train_split(data_cfg.synthetic_samples, seed)
        samples = [Sample(synthetic.messages(r), f"synthetic[{i}]", r["answer"]) for i, r in enumerate(records)]
        return samples, "synthetic", "limo", 0
    samples, source = load_records(data_cfg.path, data_cfg.format)
    if source.duplicates:
        log.warning("data: %s", source.summary())
    return samples, data_cfg.path, source.format, len(source.duplicates)


def load_samples(data_cfg: DataSettings, tokenizer: Any, seed: int = 0) -> tuple[list[EncodedSample], DataReport]:
    """Read, render, tokenize and cut every sample of `data_cfg` (DataSettings: a run's data section).

    `seed` picks the synthetic demo set (fixed at 0 by default, so the held-out split is stable).
    """
    records, source, fmt, duplicates = _records(data_cfg, seed)
    report = DataReport(source=source, format=fmt, records=len(records), duplicates=duplicates)
    out: list[EncodedSample] = []
    for sample in records:
        ids, labels = encode(sample, tokenizer, data_cfg.system_prompt)
        truncated = False
        if len(ids) > data_cfg.max_tokens:
            report.overlong += 1
            if data_cfg.overlong == "drop":
                report.dropped += 1
                continue
            ids, labels, truncated = ids[: data_cfg.max_tokens], labels[: data_cfg.max_tokens], True
            report.truncated += 1
        ids_t, labels_t = torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32)
        enc = EncodedSample(ids_t, labels_t, len(out), sample.where, truncated)
        if enc.num_label_tokens == 0:
            report.dropped += 1
            log.warning("data: %s has no supervised token left after truncation to %d; dropped", sample.where, data_cfg.max_tokens)
            continue
        out.append(enc)
        report.tokens += len(enc)
        report.label_tokens += enc.num_label_tokens
        report.max_len = max(report.max_len, len(enc))
        report.max_token_id = max(report.max_token_id, max(ids))
    report.samples = len(out)
    if not out:
        raise DataError(f"{source}: no usable samples ({report.summary()})")
    log.info("data: %s", report.summary())
    return out, report
