"""Reading training records: layouts, file types, and an error naming the file, line and field for bad input."""

import json
import sys

import pytest

from limo.data.sources import DataError, load_records

LIMO = [
    {"question": "What is 2 + 3?", "solution": "2 + 3 = 5.\n\\boxed{5}", "answer": "5"},
    {"question": "What is 7 * 6?", "solution": "7 * 6 = 42.\n\\boxed{42}", "answer": "42"},
]


def write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_limo_jsonl_becomes_user_and_assistant_turns(tmp_path):
    path = tmp_path / "limo.jsonl"
    path.write_text(json.dumps(LIMO[0]) + "\n\n" + json.dumps(LIMO[1]) + "\n")  # a blank line is skipped
    samples, report = load_records(str(path))
    assert [s.messages for s in samples] == [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["solution"]}] for r in LIMO
    ]
    assert [s.answer for s in samples] == ["5", "42"]
    assert [s.where for s in samples] == [f"{path}:1", f"{path}:3"]
    assert (report.records, report.format, report.duplicates) == (2, "limo", [])


def test_json_list_messages_and_alpaca_layouts(tmp_path):
    turns = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    messages = {"messages": turns}
    (tmp_path / "chat.json").write_text(json.dumps([messages]))
    samples, report = load_records(str(tmp_path / "chat.json"))
    assert samples[0].messages == messages["messages"] and samples[0].where == f"{tmp_path / 'chat.json'}[0]"
    assert report.format == "messages"

    alpaca = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "input": "", "output": "hi"}]
    samples, report = load_records(str(write_jsonl(tmp_path / "alpaca.jsonl", alpaca)))
    assert [s.messages[0]["content"] for s in samples] == ["Add.\n\n2 and 3", "Say hi."]
    assert [s.messages[1] for s in samples] == [{"role": "assistant", "content": "5"}, {"role": "assistant", "content": "hi"}]
    assert report.format == "alpaca"


def test_duplicates_are_kept_and_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [LIMO[0], LIMO[1], LIMO[0], LIMO[0]])
    samples, report = load_records(str(path))
    assert len(samples) == 4
    assert report.duplicates == [(f"{path}:3", f"{path}:1"), (f"{path}:4", f"{path}:1")]
    assert "2 duplicates" in report.summary() and f"{path}:3 = {path}:1" in report.summary()


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", LIMO, raw_lines=['{"question": "unterminated'])
    with pytest.raises(DataError, match=f"^{path}:3: not valid JSON"):
        load_records(str(path))


def test_malformed_json_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"question": "q", "solution": "s", "answer": "a"},\n{"question": }\n]')
    with pytest.raises(DataError, match=f"^{path}:3: not valid JSON"):
        load_records(str(path))


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "q", "answer": "1"}, "field 'solution' is missing"),
        ({"question": "q", "solution": "   ", "answer": "1"}, "field 'solution' is empty"),
        ({"question": "", "solution": "s", "answer": "1"}, "field 'question' is empty"),
        ({"question": "q", "solution": "s"}, "field 'answer' is missing"),
        ({"question": "q", "solution": ["s"], "answer": "1"}, "field 'solution' is a list, not a string"),
    ],
)
def test_missing_or_empty_limo_field_names_record_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "limo.jsonl", [LIMO[0], record])
    with pytest.raises(DataError, match=f"^{path}:2: {message}"):
        load_records(str(path))


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "field 'messages' must be a non-empty list"),
        ([{"role": "user", "content": "q"}], "must end with an assistant turn"),
        ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], r"field 'messages\[1\].role' is 'bot'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], r"messages\[1\]: field 'content' is empty"),
        ([{"role": "user", "content": "q"}, {"role": "assistant"}], r"messages\[1\]: field 'content' is missing"),
        (
            [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
            "a system turn may only come first",
        ),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "must open with a user turn"),
        (["hello"], r"field 'messages\[0\]' is a str"),
    ],
)
def test_bad_messages_name_record_and_field(tmp_path, messages, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match=f"^{path}:1[: ].*{message}"):
        load_records(str(path))


def test_alpaca_missing_output_and_unknown_layout(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "input": "x"}])
    with pytest.raises(DataError, match=f"^{path}:1: field 'output' is missing"):
        load_records(str(path))
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=rf"^{path}:1: cannot tell the record layout from \['completion', 'prompt'\]"):
        load_records(str(path))
    path = write_jsonl(tmp_path / "n.jsonl", [[1, 2]])
    with pytest.raises(DataError, match=f"^{path}:1: cannot tell the record layout from list"):
        load_records(str(path))


def test_explicit_format_checks_every_record_against_it(tmp_path):
    path = write_jsonl(tmp_path / "limo.jsonl", LIMO)
    with pytest.raises(DataError, match=f"^{path}:1: field 'instruction' is missing"):
        load_records(str(path), "alpaca")
    with pytest.raises(DataError, match="data.format='sharegpt'; allowed: auto, limo, messages, alpaca"):
        load_records(str(path), "sharegpt")


def test_layout_is_detected_per_file_from_its_first_record(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [LIMO[0], {"instruction": "i", "output": "o"}])
    with pytest.raises(DataError, match=f"^{path}:2: field 'question' is missing"):
        load_records(str(path))


def test_file_level_errors(tmp_path):
    (tmp_path / "obj.json").write_text('{"question": "q"}')
    with pytest.raises(DataError, match="obj.json: expected a JSON list of records at the top level, got dict"):
        load_records(str(tmp_path / "obj.json"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: contains no records"):
        load_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="empty.jsonl: contains no records"):
        load_records(str(tmp_path / "empty.jsonl"), "limo")
    (tmp_path / "data.csv").write_text("question,solution\n")
    with pytest.raises(DataError, match=r"data.csv: unknown file type '.csv'; expected one of .jsonl, .json, .parquet"):
        load_records(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="missing.jsonl: no such data file"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="is neither a data file .* nor a hub dataset id"):
        load_records("not a dataset")


def test_unreachable_hub_id_is_named(monkeypatch, tmp_path):
    """Offline (as CI is), a hub id that is not in the local cache is an error naming the id."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="hub dataset 'limo-engine-tests/no-such-dataset' could not be fetched"):
        load_records("limo-engine-tests/no-such-dataset")


def test_parquet_rows_load_with_their_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "limo.parquet"
    pq.write_table(pa.Table.from_pylist(LIMO), path)
    samples, report = load_records(str(path))
    assert [s.messages[1]["content"] for s in samples] == [r["solution"] for r in LIMO]
    assert [s.answer for s in samples] == ["5", "42"]
    assert samples[1].where == f"{path} row 1" and report.format == "limo"


def test_parquet_errors_name_the_file_and_row(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match=rf"{broken}: not a readable parquet file"):
        load_records(str(broken))
    empty_field = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([LIMO[0], {**LIMO[1], "solution": ""}]), empty_field)
    with pytest.raises(DataError, match=rf"{empty_field} row 1.*solution"):
        load_records(str(empty_field))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if the `parquet` extra were not installed
    with pytest.raises(DataError, match=rf"{broken}: reading .parquet needs pyarrow: pip install -e '.\[parquet\]'"):
        load_records(str(broken))


def test_hub_dataset_uses_its_train_data_files(monkeypatch, tmp_path):
    """A reachable hub id (the download stubbed): metadata .json and test splits are not training data."""
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    write_jsonl(snapshot / "data" / "train.jsonl", LIMO)
    write_jsonl(snapshot / "data" / "test.jsonl", [{"question": "held out", "solution": "s", "answer": "a"}])
    (snapshot / "dataset_infos.json").write_text('{"default": {}}')
    asked = []

    def fake_download(repo_id, **kw):
        asked.append((repo_id, kw["repo_type"]))
        return str(snapshot if repo_id == "GAIR/LIMO" else tmp_path / "empty")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    samples, report = load_records("GAIR/LIMO")
    assert asked == [("GAIR/LIMO", "dataset")]
    assert [s.messages[0]["content"] for s in samples] == [r["question"] for r in LIMO]
    assert report.files == [str(snapshot / "data" / "train.jsonl")] and samples[0].where == f"{snapshot / 'data' / 'train.jsonl'}:1"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="hub dataset 'owner/empty' has no .jsonl, .json, .parquet files"):
        load_records("owner/empty")


def test_non_utf8_and_numeric_answers(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(LIMO[0]).encode() + b"\n" + b'{"question": "caf\xe9", "solution": "s", "answer": "1"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 \(byte 0xe9 at column 18\)"):
        load_records(str(path))
    as_json = tmp_path / "latin1.json"
    as_json.write_bytes(b'[{"question": "caf\xe9"}]')
    with pytest.raises(DataError, match=rf"{as_json}: not UTF-8 \(byte 0xe9 at offset 18\)"):
        load_records(str(as_json))
    numeric = write_jsonl(tmp_path / "numeric.jsonl", [{**LIMO[0], "answer": 5}])
    samples, _ = load_records(str(numeric))
    assert samples[0].answer == "5"
