"""Training records from files or the hub, as conversations: LIMO, chat `messages` and alpaca layouts.

Every record becomes a `Sample`: a list of chat messages ending in the assistant's reply, plus
where it came from (`file:line`), so every later error can point at the record that caused it.
Layouts:
  limo      {"question", "solution", "answer"}           -> user: question, assistant: solution
  messages  {"messages": [{"role", "content"}, ...]}     -> as given (system/user/assistant turns)
  alpaca    {"instruction", "input"?, "output"}           -> user: instruction (+ blank line + input)
A malformed line, a missing or empty field, or a record of another layout is a `DataError` naming
the file, the line (or record) and the field. Duplicated conversations are kept and reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from limo.tools.errors import UserError

Format = Literal["auto", "limo", "messages", "alpaca"]
FORMATS = ("auto", "limo", "messages", "alpaca")
ROLES = ("system", "user", "assistant")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(UserError):
    """Training data that cannot be used as given; the message names the file, record and field."""


@dataclass
class Sample:
    """One conversation to train on; `where` is "file:line" (or "file[record]") for error messages."""

    messages: list[dict[str, str]]
    where: str
    answer: str | None = None


@dataclass
class SourceReport:
    records: int = 0
    format: str = ""
    files: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (where, where of its first copy)

    def summary(self) -> str:
        text = f"{self.records} records ({self.format}) from {', '.join(self.files)}; {len(self.duplicates)} duplicates"
        if self.duplicates:
            shown = ", ".join(f"{w} = {first}" for w, first in self.duplicates[:5])
            text += f" ({shown}{', ...' if len(self.duplicates) > 5 else ''})"
        return text


# ---------------------------------------------------------------------------------------------
# Raw records: (where, dict) from each file type


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records at the top level, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path}[{i}]", record


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install -e '.[parquet]'") from None
    import pyarrow as pa

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    for i, record in enumerate(rows):
        yield f"{path} row {i}", record


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        return _jsonl_records(path)
    if path.suffix == ".json":
        return _json_records(path)
    if path.suffix == ".parquet":
        return _parquet_records(path)
    raise DataError(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}")


def _hub_files(repo_id: str) -> list[Path]:
    """Download (or reuse from the cache) a hub dataset's data files; the error names the id.

    Which files are the training data: .jsonl and .parquet files (plain .json only when there
    are none, since repos keep metadata in .json), and of those only the ones named for a train
    split when any is, so a repo's test split never leaks into training.
    """
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f"*{s}" for s in FILE_SUFFIXES]))
    except Exception as e:  # offline, unknown id, gated, network: all mean "cannot use this id"
        raise DataError(f"hub dataset {repo_id!r} could not be fetched ({type(e).__name__}: {e})") from None
    files = sorted(p for p in folder.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
    files = [p for p in files if p.suffix != ".json"] or files
    files = [p for p in files if "train" in p.relative_to(folder).as_posix()] or files
    if not files:
        raise DataError(f"hub dataset {repo_id!r} has no {', '.join(FILE_SUFFIXES)} files")
    return files


def resolve_files(path: str) -> list[Path]:
    """A local file, or the data files of a hub dataset id like "GAIR/LIMO"."""
    local = Path(path)
    if local.is_file():
        return [local]
    if local.suffix in FILE_SUFFIXES or local.exists():
        raise DataError(f"{path}: no such data file")
    if _HUB_ID.match(path):
        return _hub_files(path)
    raise DataError(f"{path!r} is neither a data file ({', '.join(FILE_SUFFIXES)}) nor a hub dataset id (owner/name)")


# ---------------------------------------------------------------------------------------------
# Layouts: dict -> messages


def detect_format(record: Any, where: str) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "question" in record or "solution" in record:
            return "limo"
        if "instruction" in record or "output" in record:
            return "alpaca"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f"{where}: cannot tell the record layout from {keys}; expected limo (question, solution, answer), "
        "messages (messages) or alpaca (instruction, input, output); or set data.format"
    )


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "missing" if key not in record else f"a {type(value).__name__}, not a string"
        raise DataError(f"{where}: field {key!r} is {what}")
    if required and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _messages(record: dict, where: str) -> list[dict[str, str]]:
    turns = record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field 'messages[{i}]' is a {type(turn).__name__}, not a {{role, content}} object")
        role = turn.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: field 'messages[{i}].role' is {role!r}; allowed: {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise DataError(f"{where}: field 'messages[{i}]': a system turn may only come first")
        out.append({"role": role, "content": _text(turn, "content", f"{where} messages[{i}]")})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages' must end with an assistant turn (the supervised reply)")
    if out[1 if out[0]["role"] == "system" else 0]["role"] != "user":
        raise DataError(f"{where}: field 'messages' must open with a user turn (after an optional system turn)")
    return out


def to_sample(record: Any, fmt: str, where: str) -> Sample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "limo":
        question, solution = _text(record, "question", where), _text(record, "solution", where)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
        answer = record.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):  # {"answer": 42} is an answer too
            record = {**record, "answer": str(answer)}
        return Sample(messages, where, _text(record, "answer", where))
    if fmt == "alpaca":
        instruction, extra = _text(record, "instruction", where), _text(record, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output", where)}]
        return Sample(messages, where)
    if fmt == "messages":
        answer = record.get("answer")
        return Sample(_messages(record, where), where, answer if isinstance(answer, str) else None)
    raise DataError(f"data.format={fmt!r}; allowed: {', '.join(FORMATS)}")


def _key(sample: Sample) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in sample.messages)


def iter_records(path: str, fmt: Format = "auto") -> Iterator[tuple[str, str, dict, Sample]]:
    """(file, format, raw record, its Sample) for every record of a file or hub dataset, in file
    order: for tools that must pass the record itself through (curate), not only train on it."""
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r}; allowed: {', '.join(FORMATS)}")
    for file in resolve_files(path):
        file_fmt, count = (None if fmt == "auto" else fmt), 0
        for where, record in _file_records(file):
            file_fmt = file_fmt or detect_format(record, where)
            count += 1
            yield str(file), file_fmt, record, to_sample(record, file_fmt, where)
        if count == 0:
            raise DataError(f"{file}: contains no records")


def load_records(path: str, fmt: Format = "auto") -> tuple[list[Sample], SourceReport]:
    """All samples of a file or hub dataset, in file order, with a report that lists duplicates."""
    samples: list[Sample] = []
    report = SourceReport()
    first_seen: dict[tuple, str] = {}
    for file, file_fmt, _, sample in iter_records(path, fmt):
        if file not in report.files:
            report.files.append(file)
            report.format = file_fmt if report.format in ("", file_fmt) else "mixed"
        key = _key(sample)
        if key in first_seen:
            report.duplicates.append((sample.where, first_seen[key]))
        else:
            first_seen[key] = sample.where
        samples.append(sample)
    report.records = len(samples)
    return samples, report
