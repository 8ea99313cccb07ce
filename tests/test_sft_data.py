"""Datasets in and SFT rows out (issue 36): prompts from JSONL, Parquet and a `datasets`
folder through per-model templates, the row's other fields carried into the records, and
`merge --format messages` rows that TRL's SFTTrainer trains on as they are."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dual_sampling.errors import DataError
from dual_sampling.files.data import read_prompts
from dual_sampling.files.records import to_messages

ROWS = [{"problem": "What is 2 + 3?", "solution": "5", "id": "a1"},
        {"problem": "Capital of France?", "solution": "Paris", "id": "a2"}]
HINTED = "{problem}\n\n## Hint\n{solution}"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "datasets"])
def test_templates_build_each_models_prompt_and_carry_the_other_fields(tmp_path, kind):
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        import datasets
        path = tmp_path / "ds"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    prompts = read_prompts(path, theta_template="Question: {problem}\nAnswer:",
                           target_template=HINTED, theta_chat=False)
    assert prompts[0] == {
        "index": 0, "prompt": "Question: What is 2 + 3?\nAnswer:",
        "target": {"messages": [{"role": "user", "content": "What is 2 + 3?\n\n## Hint\n5"}]},
        "fields": {"id": "a1"}}
    assert [p["fields"]["id"] for p in prompts] == ["a1", "a2"]


def test_per_model_rows_and_rows_as_before(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"theta_prompt": "Q: 2+3?", "target_messages": [{"role": "user", "content": "2+3? (5)"}]},
        {"prompt": "plain", "answer": 5}])
    first, second = read_prompts(path)
    assert first == {"index": 0, "prompt": "Q: 2+3?",
                     "target": {"messages": [{"role": "user", "content": "2+3? (5)"}]}}
    assert second == {"index": 1, "prompt": "plain", "fields": {"answer": 5}}


def test_a_missing_field_names_the_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"problem": "no solution here"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: no field `solution`.*target_template"):
        read_prompts(path, theta_template="{problem}", target_template=HINTED)


def test_data_fields_map_the_datasets_own_column_names(tmp_path):
    """data.fields.solution=answer reads a set whose columns are `question`/`answer` through
    templates that say {problem}/{solution}; the unmapped columns keep their names."""
    path = write_jsonl(tmp_path / "p.jsonl",
                       [{"question": "2+3?", "answer": "5", "id": "a1"}])
    [prompt] = read_prompts(path, theta_template="{problem}", target_template=HINTED,
                            fields={"problem": "question", "solution": "answer"})
    assert prompt["messages"][0]["content"] == "2+3?"
    assert prompt["target"]["messages"][0]["content"] == "2+3?\n\n## Hint\n5"
    assert prompt["fields"] == {"id": "a1"}
    with pytest.raises(DataError, match=r"no field `solution`.*data\.fields\.solution=<column>"):
        read_prompts(path, theta_template="{problem}", target_template=HINTED,
                     fields={"problem": "question"})


def test_messages_rows_load_in_datasets_and_train_one_sft_step(tiny_models, tmp_path):
    """merge --format messages on one run's output_dir; the rows load with
    datasets.load_dataset as TRL documents its conversational format, and one SFTTrainer
    step on the tiny theta runs on them (TRL is in the test extra)."""
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"index": 0, "sample_index": 0, "prompt": "Question: 2+3?\nAnswer:", "completion": " 5",
         "log_w_theta": -0.1, "log_w_target": 0.2, "mean_alpha": 0.4, "finish_reason": "stop",
         "fields": {"id": "a1"}},
        {"index": 1, "sample_index": 0,
         "prompt": json.dumps([{"role": "user", "content": "Capital of France?"}]),
         "completion": "Paris.", "log_w_theta": 0.0, "log_w_target": 0.1, "mean_alpha": 0.5,
         "finish_reason": "length"}]
    write_jsonl(run / "samples.jsonl", records)
    done = subprocess.run([sys.executable, "-m", "dual_sampling.merge", "--format", "messages",
                           str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import datasets
    rows = datasets.load_dataset("json", data_files=str(run / "messages.jsonl"), split="train")
    assert rows[0]["messages"] == [{"role": "user", "content": "Question: 2+3?\nAnswer:"},
                                   {"role": "assistant", "content": " 5"}]
    assert rows[1]["messages"][0] == {"role": "user", "content": "Capital of France?"}
    assert rows[0]["id"] == "a1" and rows[0]["log_w_theta"] == -0.1
    assert to_messages(records[1])["messages"][-1] == {"role": "assistant", "content": "Paris."}

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["theta"]))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["theta"]))
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer,
        train_dataset=rows.select_columns(["messages"]),
        args=SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1,
                       per_device_train_batch_size=2, report_to=[], use_cpu=True,
                       save_strategy="no", logging_steps=1, max_length=64))
    result = trainer.train()
    assert result.global_step == 1 and result.training_loss > 0
