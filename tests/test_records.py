"""The resumable writer: exactly-once records, a half-written last line cut off on reopen."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from dual_sampling.errors import DataError
from dual_sampling.files.records import FieldsKey, ResumableJsonlWriter, read_records


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 60), max_size=12), min_size=1, max_size=5),
       garbage=st.binary(min_size=0, max_size=40).filter(lambda b: b"\n" not in b))
def test_interrupted_runs_write_every_index_once(tmp_path_factory, batches, garbage):
    path = tmp_path_factory.mktemp("rec") / "samples.jsonl"
    for batch in batches:  # each batch is one run that dies after writing what it wrote
        with ResumableJsonlWriter(path) as writer:
            for index in batch:
                if index not in writer.done:
                    writer.write({"index": index, "text": "ü" * (index % 5)})
        with path.open("ab") as fh:  # a kill in the middle of a line
            fh.write(garbage)
    with ResumableJsonlWriter(path) as writer:
        expected = {i for batch in batches for i in batch}
        assert writer.done == expected
    indices = [r["index"] for r in read_records(path)]
    assert sorted(indices) == sorted(expected)
    assert path.read_bytes().endswith(b"\n") or path.stat().st_size == 0


def test_double_write_is_refused(tmp_path):
    with ResumableJsonlWriter(tmp_path / "s.jsonl") as writer:
        writer.write({"index": 3})
        with pytest.raises(DataError, match="written twice"):
            writer.write({"index": 3})


def test_foreign_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=str(path)):
        ResumableJsonlWriter(path)


def test_compound_key_resumes_per_completion(tmp_path):
    """One record per (index, completion_index): a prompt half written resumes its missing half."""
    path = tmp_path / "scores.jsonl"
    key = FieldsKey(("index", "completion_index"))
    with ResumableJsonlWriter(path, key=key) as writer:
        writer.write({"index": 0, "completion_index": 0})
        writer.write({"index": 0, "completion_index": 1})
        writer.write({"index": 1, "completion_index": 0})
    with path.open("ab") as fh:
        fh.write(b'{"index": 1, "completion_in')
    with ResumableJsonlWriter(path, key=key) as writer:
        assert writer.done == {(0, 0), (0, 1), (1, 0)}
        writer.write({"index": 1, "completion_index": 1})
        with pytest.raises(DataError, match=r"`index, completion_index`=\(0, 1\) written twice"):
            writer.write({"index": 0, "completion_index": 1})
    foreign = tmp_path / "other.jsonl"
    foreign.write_text(json.dumps({"index": 2}) + "\n")
    with pytest.raises(DataError, match="without an integer `index, completion_index`"):
        ResumableJsonlWriter(foreign, key=key)
