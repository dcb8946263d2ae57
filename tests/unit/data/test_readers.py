"""Readers: format detection, newline-aligned chunk planning, row iteration and its errors."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ift.data import readers
from ift.data.readers import ReadTask, detect_format, iter_raw, plan_reads

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "formats")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def read_all(path: str, fmt: str = "auto", chunk_bytes: int = 0):
    tasks, infos = plan_reads("src", 0, [path], fmt, chunk_bytes, 0)
    return [row for t in tasks for row in iter_raw(t)], tasks, infos


# ---------------------------------------------------------------------------------------
# detect_format
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("alpaca.json", "alpaca"),
        ("alpaca_cot_multiturn.jsonl", "alpaca_cot_multiturn"),
        ("sharegpt.json", "sharegpt"),
        ("openai.jsonl", "openai"),
        ("moss.jsonl", "moss"),
        ("flan_cot.tsv", "flan_cot_tsv"),
        ("table.csv", "table"),
    ],
)
def test_detect_format_of_fixtures(name, fmt):
    path = fixture(name)
    with open(path, "rb") as f:
        head = f.read(4096)
    assert detect_format(path, head) == fmt


def test_detect_format_by_extension_needs_no_content():
    assert detect_format("s3://b/x/data.parquet", b"") == "table"
    assert detect_format("/d/cot.TSV", b"") == "flan_cot_tsv"


def test_detect_format_unknown_keys_names_file_and_keys():
    with pytest.raises(ValueError) as e:
        detect_format("/data/odd.jsonl", b'{"prompt": "a", "completion": "b"}\n')
    msg = str(e.value)
    assert "/data/odd.jsonl" in msg and "'prompt'" in msg and "'completion'" in msg


def test_detect_format_skips_a_malformed_first_line():
    head = b'{"instruction": oops\n{"instruction": "a", "input": "", "output": "b"}\n'
    assert detect_format("x.jsonl", head) == "alpaca"


def test_detect_format_json_list_with_leading_bom_and_whitespace():
    head = b'\xef\xbb\xbf\n  [ {"messages": [{"role": "user", "content": "x"}]} ]'
    assert detect_format("x.json", head) == "openai"


def test_plan_reads_detects_when_first_record_exceeds_the_head(tmp_path):
    big = {"instruction": "x" * (200 * 1024), "input": "", "output": "y"}
    path = tmp_path / "big.json"
    path.write_text(json.dumps([big, {"instruction": "a", "input": "", "output": "b"}]))
    tasks, infos = plan_reads("s", 0, [str(path)], "auto", 1024, 0)
    assert infos[0]["format"] == "alpaca"
    assert len(tasks) == 1 and tasks[0].format == "alpaca"


def test_plan_reads_auto_on_empty_file_raises(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jsonl"):
        plan_reads("s", 0, [str(path)], "auto", 1024, 0)


# ---------------------------------------------------------------------------------------
# plan_reads: chunking
# ---------------------------------------------------------------------------------------


def _make_jsonl(rng: random.Random, n: int, crlf: bool, blank_every: int) -> bytes:
    out = []
    for i in range(n):
        if blank_every and i % blank_every == 0:
            out.append(b"")
        rec = {"instruction": "q" * rng.randint(0, 90) + str(i), "input": "", "output": f"a{i}"}
        out.append(json.dumps(rec).encode())
    sep = b"\r\n" if crlf else b"\n"
    return sep.join(out) + sep


def _expected_rows(data: bytes) -> list[tuple[int, str]]:
    """(1-based line number, output) of every non-blank line, computed independently."""
    rows = []
    for no, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            rows.append((no, json.loads(line)["output"]))
    return rows


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1, 37, 200, 1000, 10**9])
@pytest.mark.parametrize("block_bytes", [5, 64, 8 * 1024 * 1024])
def test_chunks_cover_file_on_newlines_with_absolute_line_numbers(
    tmp_path, monkeypatch, crlf, chunk_bytes, block_bytes
):
    # Small read blocks put chunk borders and newlines across block borders too.
    monkeypatch.setattr(readers, "_BLOCK_BYTES", block_bytes)
    data = _make_jsonl(random.Random(7), 60, crlf, blank_every=7)
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)

    tasks, infos = plan_reads("src", 2, [str(path)], "alpaca", chunk_bytes, 5)

    assert infos == [{"path": str(path), "format": "alpaca", "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest(), "line_based": True}]
    assert tasks[0].start == 0 and tasks[-1].end == len(data)
    for a, b in zip(tasks, tasks[1:]):
        assert a.end == b.start
    for t in tasks:
        assert (t.source, t.source_index, t.file_index, t.format) == ("src", 2, 5, "alpaca")
        assert t.end > t.start
        if t.start:
            assert data[t.start - 1:t.start] == b"\n"  # every chunk starts a line
        assert t.first_line == data[:t.start].count(b"\n") + 1
        if chunk_bytes < len(data) and t is not tasks[-1]:
            assert t.end - t.start >= chunk_bytes
    if chunk_bytes >= len(data):
        assert len(tasks) == 1

    rows = [r for t in tasks for r in iter_raw(t)]
    assert all(err is None for _, _, err, _ in rows)
    assert [(no, raw["output"]) for no, raw, _, _ in rows] == _expected_rows(data)


def test_chunk_border_inside_a_line_keeps_the_line_whole(tmp_path):
    lines = [json.dumps({"instruction": "x" * 50, "input": "", "output": str(i)}) for i in range(5)]
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    # 10 bytes lands mid-way through the first line: the chunk runs on to its newline.
    tasks, _ = plan_reads("s", 0, [str(path)], "alpaca", 10, 0)
    assert len(tasks) == 5
    assert [t.first_line for t in tasks] == [1, 2, 3, 4, 5]
    for i, t in enumerate(tasks):
        rows = list(iter_raw(t))
        assert len(rows) == 1 and rows[0][0] == i + 1 and rows[0][1]["output"] == str(i)


def test_file_without_trailing_newline(tmp_path):
    data = b'{"a": 1}\n{"a": 2}\n{"a": 3}'
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    tasks, _ = plan_reads("s", 0, [str(path)], "openai", 4, 0)
    assert [(t.start, t.end, t.first_line) for t in tasks] == [(0, 9, 1), (9, 18, 2), (18, 26, 3)]
    assert [(n, raw) for t in tasks for n, raw, _, _ in iter_raw(t)] == [
        (1, {"a": 1}), (2, {"a": 2}), (3, {"a": 3})]


def test_json_list_csv_parquet_are_whole_file_tasks(tmp_path):
    pq_path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"q": ["a"] * 50}), pq_path)
    files = [fixture("alpaca.json"), fixture("table.csv"), str(pq_path)]
    tasks, infos = plan_reads("s", 1, files, "auto", 16, 10)
    assert [(t.file_index, t.start, t.end, t.first_line) for t in tasks] == [
        (10 + i, 0, os.path.getsize(f), 1) for i, f in enumerate(files)]
    assert [i["format"] for i in infos] == ["alpaca", "table", "table"]
    with open(fixture("alpaca.json"), "rb") as f:
        assert infos[0]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    # Held-out reads record no hash: the same tasks, sha256 left out.
    same, unhashed = plan_reads("s", 1, files, "auto", 16, 10, hash_files=False)
    assert same == tasks
    assert [i["sha256"] for i in unhashed] == [None, None, None]
    assert [{**i, "sha256": None} for i in infos] == unhashed


def test_tsv_is_chunked(tmp_path):
    data = "".join(f"q{i}\t{i}\tbecause {i}\n" for i in range(40)).encode()
    path = tmp_path / "c.tsv"
    path.write_bytes(data)
    tasks, infos = plan_reads("s", 0, [str(path)], "auto", 64, 0)
    assert infos[0]["format"] == "flan_cot_tsv" and len(tasks) > 3
    rows = [r for t in tasks for r in iter_raw(t)]
    assert [(n, raw["answer"]) for n, raw, _, _ in rows] == [(i + 1, str(i)) for i in range(40)]


# ---------------------------------------------------------------------------------------
# iter_raw: rows and their errors
# ---------------------------------------------------------------------------------------


def test_jsonl_errors_bad_json_non_object_and_blank_lines():
    rows, _, _ = read_all(fixture("openai.jsonl"), chunk_bytes=100)
    by_line = {n: (raw, err) for n, raw, err, _ in rows}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert by_line[7][0] is None and by_line[7][1] == "JSONL line is a list, not an object"
    assert by_line[8][0] is None and by_line[8][1].startswith("malformed JSON:")
    assert "column" in by_line[8][1]
    assert all(err is None for n, (raw, err) in by_line.items() if n < 7)


def test_blank_lines_are_not_rows_and_keep_numbering():
    rows, _, _ = read_all(fixture("alpaca_cot_multiturn.jsonl"))
    assert [n for n, *_ in rows] == [1, 2, 3, 5, 6, 7, 8]
    bad = {n: err for n, _, err, _ in rows if err}
    assert list(bad) == [7] and bad[7].startswith("malformed JSON")


def test_non_utf8_bytes_name_the_absolute_byte_offset(tmp_path):
    good = b'{"instruction": "a", "input": "", "output": "b"}\n'
    bad = b'{"instruction": "caf\xe9", "input": "", "output": "b"}\n'
    data = good * 3 + bad + good
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    for chunk in (0, 20, 60):
        rows, tasks, _ = read_all(str(path), "alpaca", chunk)
        errs = [(n, raw, err, text) for n, raw, err, text in rows if err]
        assert len(errs) == 1, chunk
        n, raw, err, text = errs[0]
        assert n == 4 and raw is None
        assert err == f"non-UTF-8 bytes at byte offset {offset}"
        assert "caf" in text  # the line is kept, readable, for the rejects file
        assert len(rows) == 5


def test_utf8_bom_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "input": "", "output": "b"}\n')
    rows, tasks, _ = read_all(str(path))
    assert tasks[0].format == "alpaca"
    assert [(n, raw["output"], err) for n, raw, err, _ in rows] == [(1, "b", None)]


def test_tsv_rows_and_field_count_errors():
    rows, _, _ = read_all(fixture("flan_cot.tsv"), chunk_bytes=50)
    by_line = {n: (raw, err) for n, raw, err, _ in rows}
    assert sorted(by_line) == [1, 2, 4, 5, 6, 7]  # line 3 is blank
    assert by_line[1][0] == {"question": "What is 15% of 80?", "answer": "12",
                             "rationale": "15% of 80 is 0.15 * 80 = 12."}
    assert by_line[4] == (None, "TSV line has 2 tab-separated fields, expected 3 "
                                "(question, answer, rationale)")
    assert by_line[7][0] is None and "has 4 tab-separated fields" in by_line[7][1]
    # An empty field is still three fields; the converter judges it.
    assert by_line[6][0] == {"question": "An empty answer", "answer": "",
                             "rationale": "Nothing to see."}


def test_tsv_crlf(tmp_path):
    path = tmp_path / "w.tsv"
    path.write_bytes(b"q1\ta1\tr1\r\n\r\nq2\ta2\tr2\r\n")
    rows, _, _ = read_all(str(path), chunk_bytes=3)
    assert [(n, raw) for n, raw, _, _ in rows] == [
        (1, {"question": "q1", "answer": "a1", "rationale": "r1"}),
        (3, {"question": "q2", "answer": "a2", "rationale": "r2"}),
    ]


def test_json_list_items_are_indexed_from_zero():
    rows, _, _ = read_all(fixture("alpaca.json"))
    assert [n for n, *_ in rows] == list(range(10))
    assert rows[0][1]["output"] == "Red, yellow and blue."
    assert rows[9][1] is None and rows[9][2] == "list item is a string, not an object"
    assert json.loads(rows[1][3]) == rows[1][1]


def test_json_list_that_does_not_parse_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    task = ReadTask("s", 0, str(path), 0, "alpaca", 0, path.stat().st_size, 1)
    with pytest.raises(ValueError) as e:
        list(iter_raw(task))
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and "column 23" in msg


def test_json_list_with_non_utf8_bytes_reaches_validation(tmp_path):
    from ift.data.formats import convert
    from ift.data.quality import validate

    path = tmp_path / "l.json"
    path.write_bytes(b'[{"instruction": "ok", "input": "", "output": "fine"},'
                     b' {"instruction": "ok", "input": "", "output": "caf\xe9"}]')
    rows, _, _ = read_all(str(path), "alpaca")
    recs = [convert("alpaca", raw, id=str(n), source="s") for n, raw, _, _ in rows]
    assert validate(recs[0]) is None
    assert validate(recs[1]) == "non-UTF-8 bytes in turn 2"


def test_csv_quoted_newlines_and_short_rows():
    rows, tasks, _ = read_all(fixture("table.csv"), chunk_bytes=10)
    assert len(tasks) == 1
    assert [n for n, *_ in rows] == [0, 1, 2, 3]
    assert rows[0][1]["answer"] == "Soft rain on the roof\ncounting the hours\nuntil the light returns"
    assert rows[1][1]["context"] == "Ray Data runs\ntransformations in parallel."
    assert rows[2][1] is None and rows[2][2] == "CSV row has 2 fields, the header has 4"
    assert rows[3][1] == {"question": "What is 2+2?", "context": "", "answer": "4", "note": ""}


def test_parquet_rows_are_dicts_of_columns(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({
        "q": ["a", "b", None],
        "dialog": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                   [], None],
    })
    pq.write_table(table, path, row_group_size=2)
    rows, tasks, infos = read_all(str(path))
    assert infos[0]["format"] == "table"
    assert [n for n, *_ in rows] == [0, 1, 2]
    assert rows[0][1] == {"q": "a", "dialog": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "yo"}]}
    assert rows[2][1] == {"q": None, "dialog": None}
    assert all(err is None for _, _, err, _ in rows)


def test_s3_jsonl_chunks_and_parquet(s3_bucket, tmp_path):
    from ift import storage

    data = _make_jsonl(random.Random(3), 30, crlf=False, blank_every=5)
    jsonl = f"{s3_bucket}/src/d.jsonl"
    storage.write_bytes(jsonl, data)
    local_pq = tmp_path / "t.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["c", "d"]}), local_pq)
    parquet = f"{s3_bucket}/src/t.parquet"
    storage.write_bytes(parquet, local_pq.read_bytes())

    tasks, infos = plan_reads("s3src", 0, [jsonl, parquet], "auto", 300, 0)
    assert [i["format"] for i in infos] == ["alpaca", "table"]
    assert infos[0]["sha256"] == hashlib.sha256(data).hexdigest()
    jsonl_tasks = [t for t in tasks if t.file == jsonl]
    assert len(jsonl_tasks) > 2
    rows = [r for t in jsonl_tasks for r in iter_raw(t)]
    assert [(n, raw["output"]) for n, raw, _, _ in rows] == _expected_rows(data)
    pq_rows = [r for t in tasks if t.file == parquet for r in iter_raw(t)]
    assert [(n, raw) for n, raw, _, _ in pq_rows] == [
        (0, {"instruction": "a", "output": "c"}), (1, {"instruction": "b", "output": "d"})]
