"""The evaluation suite: LIMO's ten benchmarks (and any list of records) as problems with golds.

Local files follow LIMO's layout, `<data>/<dir>/test.jsonl` (../shared/data/eval holds them, see
its PROVENANCE.md); a hub file is named `hf:owner/dataset/path/in/repo.jsonl[@revision]`. Each
benchmark's keys differ (problem/question, answer/choice_answer, a letter for GPQA, dicts and
lists in GradeSchool and Kaoyan); every record becomes one `Problem`: an id, the user message,
and the acceptable golds.

GPQA: LIMO's file always lists the right option first (its answer is "A" 198 times). Options are
therefore reshuffled per problem with a fixed seed, and the gold letter follows the right option.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from limo.tools.errors import UserError

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval"
GPQA_SEED = 0
SYNTHETIC = "synthetic"  # the demo's held-out split, disjoint from its training problems


@dataclass(frozen=True)
class Problem:
    """One question. `golds` are the acceptable answers: one, or a choice letter and its option."""

    id: str
    question: str
    golds: tuple[str, ...]


@dataclass(frozen=True)
class Benchmark:
    """Problems plus LIMO's sampling protocol for them (16 samples at 0.7, or one greedy)."""

    name: str
    problems: tuple[Problem, ...]
    samples: int = 1
    temperature: float = 0.0

    def __post_init__(self):
        if not self.problems:
            raise ValueError(f"benchmark {self.name!r} has no problems")
        ids = [p.id for p in self.problems]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"benchmark {self.name!r}: problem id {dup!r} appears more than once")
        if self.samples < 1 or self.temperature < 0:
            raise ValueError(f"benchmark {self.name!r}: samples must be >= 1 and temperature >= 0, "
                             f"got {self.samples} and {self.temperature}")


class RecordError(UserError):
    """A record that cannot become a Problem; the message names the file, line and key."""


def _field(record: dict, keys: Sequence[str], where: str) -> Any:
    for key in keys:
        if key in record and record[key] not in (None, ""):
            return record[key]
    raise RecordError(f"{where}: none of the keys {list(keys)} has a value (record keys: {sorted(record)})")


def _answer_text(value: Any, where: str) -> str:
    """Golds come as str, int, float, lists (several answers) and dicts (several parts)."""
    if isinstance(value, bool):
        raise RecordError(f"{where}: a boolean is not an answer: {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (str, int, float)):
        return str(value).strip()
    if isinstance(value, list) and value:
        return ", ".join(_answer_text(v, where) for v in value)
    if isinstance(value, dict) and value:
        return ", ".join(_answer_text(v, where) for v in value.values())
    raise RecordError(f"{where}: cannot read an answer from {type(value).__name__} {value!r:.80}")


def _record_id(record: dict, keys: Sequence[str], index: int) -> str:
    for key in keys:
        if key in record and record[key] is not None:
            return str(record[key])
    return str(index)


# ------------------------------------------------------------------------------------------
# Per-benchmark record readers: record, its position, "file:line" -> Problem


def _free_answer(id_keys: Sequence[str], question_keys: Sequence[str]) -> Callable[[dict, int, str], Problem]:
    def read(record: dict, index: int, where: str) -> Problem:
        question = str(_field(record, question_keys, where)).strip()
        gold = _answer_text(_field(record, ("answer", "Answer", "final_answer", "gold"), where), where)
        return Problem(_record_id(record, id_keys, index), question, (gold,))
    return read


_OPTION_PREFIX_RE = re.compile(r"^\(?([A-E])[.)]\s*")


def _gaokao(record: dict, index: int, where: str) -> Problem:
    """Multiple choice when `choice_answer` holds a letter: the letter, and the option's content
    (the model may box either); otherwise a free answer."""
    question = str(_field(record, ("question", "problem"), where)).strip()
    answer = _answer_text(_field(record, ("answer",), where), where)
    letter = str(record.get("choice_answer") or "").strip()
    if not letter:
        return Problem(_record_id(record, ("idx", "id"), index), question, (answer,))
    if not re.fullmatch(r"[A-E]", letter):
        raise RecordError(f"{where}: choice_answer must be one letter A-E, got {letter!r}")
    content = _OPTION_PREFIX_RE.sub("", answer).strip()
    return Problem(_record_id(record, ("idx", "id"), index), question, (letter,) + ((content,) if content else ()))


_GPQA_RE = re.compile(r"^(.*)\n\nA\. (.*)\nB\. (.*)\nC\. (.*)\nD\. (.*)\n\n(Please reason step-by-step.*)$", re.DOTALL)
_LETTERS = "ABCD"


def gpqa_shuffle(problem_id: str, options: Sequence[str], seed: int = GPQA_SEED) -> list[int]:
    """The order to show `options` in: a permutation fixed by (seed, problem id) alone, the same on
    every machine and Python (str seeds go through SHA-512, not hash())."""
    order = list(range(len(options)))
    random.Random(f"gpqa:{seed}:{problem_id}").shuffle(order)
    return order


def _gpqa(record: dict, index: int, where: str) -> Problem:
    """LIMO's layout (options inside the question, right one listed as the answer letter) or the
    original dataset's (Question, Correct Answer, Incorrect Answer 1-3)."""
    pid = _record_id(record, ("id", "Record ID"), index)
    if "Correct Answer" in record:
        stem = str(_field(record, ("Question",), where)).strip()
        options = [str(record[k]).strip() for k in ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                                    "Incorrect Answer 3")]
        right, instruction = 0, ("Please reason step-by-step and put your choice letter without any other text "
                                 "with \\boxed{} in the end.")
    else:
        m = _GPQA_RE.match(str(_field(record, ("question",), where)))
        if m is None:
            raise RecordError(f"{where}: GPQA question does not end in options 'A. ..' to 'D. ..' and the instruction")
        stem, options, instruction = m.group(1).strip(), [o.strip() for o in m.groups()[1:5]], m.group(6).strip()
        letter = str(_field(record, ("answer",), where)).strip()
        if len(letter) != 1 or letter not in _LETTERS:
            raise RecordError(f"{where}: GPQA answer {letter!r} is not one of the option letters A, B, C, D")
        right = _LETTERS.index(letter)
    order = gpqa_shuffle(pid, options)
    shown = "\n".join(f"{_LETTERS[i]}. {options[j]}" for i, j in enumerate(order))
    return Problem(pid, f"{stem}\n\n{shown}\n\n{instruction}", (_LETTERS[order.index(right)],))


@dataclass(frozen=True)
class _Spec:
    dir: str
    read: Callable[[dict, int, str], Problem]
    samples: int = 1
    temperature: float = 0.0


# LIMO's protocol: 16 samples at temperature 0.7 for AIME24, AMC23 and CHMath; greedy elsewhere.
SUITE: dict[str, _Spec] = {
    "aime24": _Spec("aime", _free_answer(("id",), ("problem", "question")), 16, 0.7),
    "amc23": _Spec("amc", _free_answer(("id",), ("problem", "question")), 16, 0.7),
    "math500": _Spec("math", _free_answer(("unique_id", "id"), ("problem", "question"))),
    "olympiadbench": _Spec("olympiadbench", _free_answer(("id",), ("question", "problem"))),
    "gpqa": _Spec("gpqa", _gpqa),
    "minerva": _Spec("minerva", _free_answer(("id",), ("question", "problem"))),
    "chmath": _Spec("cn_math_2024", _free_answer(("id",), ("problem", "question")), 16, 0.7),
    "gaokao": _Spec("gaokao", _gaokao),
    "kaoyan": _Spec("kaoyan", _free_answer(("id",), ("problem", "question"))),
    "gradeschool": _Spec("grade_school_math", _free_answer(("id",), ("problem", "question"))),
}


# ------------------------------------------------------------------------------------------
# Files


def _read_records(path: Path) -> Iterable[tuple[dict, str]]:
    """(record, "file:line") from .jsonl, .json (a list, or {"data": [...]}) or .parquet."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line), f"{path}:{lineno}"
                    except json.JSONDecodeError as e:
                        raise RecordError(f"{path}:{lineno}: not JSON ({e.msg})") from e
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{e.lineno}: not JSON ({e.msg})") from e
        data = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise RecordError(f"{path}: expected a list of records or {{'data': [...]}}")
        for i, record in enumerate(data):
            yield record, f"{path}[{i}]"
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install limo-engine[parquet])") from e
        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield record, f"{path}[{i}]"
    else:
        raise RecordError(f"{path}: unknown file type {path.suffix!r} (expected .jsonl, .json or .parquet)")


def _hub_file(spec: str) -> Path:
    """`hf:owner/dataset/path/in/repo.jsonl[@revision]` -> a local copy from the Hugging Face hub."""
    ref, _, revision = spec[len("hf:"):].partition("@")
    parts = ref.split("/")
    if len(parts) < 3:
        raise ValueError(f"hub source {spec!r}: expected hf:owner/dataset/path/to/file.jsonl[@revision]")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]), repo_type="dataset",
                                revision=revision or None))


def load_benchmark(name: str, source: str | Path | None = None) -> Benchmark:
    """One of SUITE by name, from `source`: a folder in LIMO's layout (default ../shared/data/eval),
    a single local file, or a hub file `hf:owner/dataset/path[@revision]`."""
    if name == SYNTHETIC:  # the demo's held-out problems: generated (limo/data/synthetic.py), not read
        from limo.data.synthetic import heldout_split

        return records_benchmark(SYNTHETIC, heldout_split())
    if name not in SUITE:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(SUITE)}, {SYNTHETIC}")
    spec = SUITE[name]
    if isinstance(source, str) and source.startswith("hf:"):
        path = _hub_file(source)
    else:
        root = Path(source) if source is not None else DEFAULT_DATA
        path = root if root.is_file() else root / spec.dir / "test.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"benchmark {name!r}: {path} does not exist")
    problems = tuple(spec.read(record, i, where) for i, (record, where) in enumerate(_read_records(path)))
    return Benchmark(name, problems, spec.samples, spec.temperature)


def _as_fields(record: Any) -> dict:
    if isinstance(record, Mapping):
        return dict(record)
    if dataclasses.is_dataclass(record):
        return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    if hasattr(record, "_asdict"):  # a namedtuple
        return record._asdict()
    try:
        return vars(record)
    except TypeError as e:
        raise RecordError(f"a record must be a mapping, a dataclass or an object with attributes, got "
                          f"{type(record).__name__}") from e


def records_benchmark(name: str, records: Iterable[Any], *, samples: int = 1, temperature: float = 0.0,
                      question_keys: Sequence[str] = ("question", "problem", "prompt"),
                      answer_keys: Sequence[str] = ("answer", "gold", "final_answer")) -> Benchmark:
    """Any records with a question and a gold answer (dicts, or objects such as data.synthetic's
    samples in LIMO's schema question/solution/answer) as a benchmark, e.g. a held-out split."""
    problems = []
    for i, record in enumerate(records):
        fields = _as_fields(record)
        where = f"{name} record {i}"
        question = str(_field(fields, question_keys, where)).strip()
        gold = _answer_text(_field(fields, answer_keys, where), where)
        problems.append(Problem(_record_id(fields, ("id",), i), question, (gold,)))
    return Benchmark(name, tuple(problems), samples, temperature)
