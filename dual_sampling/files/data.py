"""Input files: prompts for sample mode, texts or token-id sequences for topk and perplexity,
(prompt, completions) records for score mode.

Accepted: JSONL (one object a line) or plain text (one item a non-empty line). Every
problem raises DataError naming the file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

from dual_sampling.errors import DataError

T = TypeVar("T")


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc}); each line of a "
                                f".jsonl file must be one JSON object.") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
            rows.append((number, row))
    return rows


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist: check the `data.*` path.")
    return path


PER_MODEL_KEYS = ("theta_prompt", "theta_messages", "target_prompt", "target_messages")


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(row number, record) of a JSONL, a Parquet file or a `datasets` folder saved with
    `save_to_disk` (its train split when it holds several)."""
    if path.is_dir():
        try:
            import datasets
        except ImportError as exc:
            raise DataError(f"{path} is a folder: reading a `datasets` folder needs the "
                            f"`datasets` package (pip install datasets)") from exc
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path}: not a folder written by datasets' save_to_disk "
                            f"({exc})") from exc
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return [(number, dict(row)) for number, row in enumerate(loaded, start=1)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    return _jsonl(path)


def _render(template: str, row: dict[str, Any], where: str, which: str) -> tuple[str, set]:
    """The template filled from the row's fields, and the fields it used."""
    import string
    template = template.replace("\\n", "\n")  # `\n` typed on a command line: a newline
    used = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    missing = sorted(name for name in used if name not in row)
    if missing:
        raise DataError(f"{where}: no field `{missing[0]}`, which data.{which} "
                        f"({template!r}) uses; the row has {sorted(row)[:12]}. A column of "
                        f"another name maps with data.fields.{missing[0]}=<column>, or edit "
                        f"the template.")
    return template.format(**{name: row[name] for name in used}), used


def _side(row: dict[str, Any], model: str, template: Optional[str], chat: bool, where: str
          ) -> tuple[Optional[dict[str, Any]], set]:
    """A model's own prompt from the row (`<model>_prompt` / `<model>_messages`) or its
    template, as {"prompt": text} or {"messages": [...]}; None when it has neither."""
    if isinstance(row.get(f"{model}_messages"), list) and row[f"{model}_messages"]:
        return {"messages": row[f"{model}_messages"]}, {f"{model}_messages"}
    if isinstance(row.get(f"{model}_prompt"), str) and row[f"{model}_prompt"]:
        return {"prompt": row[f"{model}_prompt"]}, {f"{model}_prompt"}
    if template is None:
        return None, set()
    text, used = _render(template, row, where, f"{model}_template")
    return ({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text},
            used)


def renamed(row: dict[str, Any], fields: Optional[dict[str, str]]) -> dict[str, Any]:
    """The row with each dataset column `fields[name]` renamed to `name` (data.fields:
    {"solution": "answer"} lets templates and readers say `solution` for a set whose column is
    `answer`). A name the row already has is kept as it is."""
    if not fields:
        return row
    row = dict(row)
    for name, column in fields.items():
        if column and column != name and column in row and name not in row:
            row[name] = row.pop(column)
    return row


def read_prompts(path: str | Path, prompt_field: str = "prompt", *,
                 theta_template: Optional[str] = None, target_template: Optional[str] = None,
                 theta_chat: bool = True, target_chat: bool = True,
                 fields: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
    """Prompts as `{"index": i, "prompt": str}` or `{"index": i, "messages": [...]}` (theta's,
    which the target reads too), with `"target": {"prompt"|"messages"}` when the target has
    its own and `"fields"` holding the row's other fields.

    Rows come from a JSONL, a Parquet file, a `datasets` folder or a text file (one prompt a
    line). Each model's prompt: `theta_prompt`/`theta_messages` (`target_...`) in the row,
    else its template (`"{problem}"`, `"{problem}\n\n## Hint\n{solution}"`: the row's
    fields by name) as one user message through that model's chat template (`*_chat`) or as
    plain text, else (theta) `prompt_field` or `messages`. `fields` renames the dataset's
    columns first ({"solution": "answer"}: its `answer` column is `solution`). Raises
    DataError naming the file, the row and the field on an empty file or a row that lacks
    what it needs.
    """
    path = _check_file(path) if not Path(path).is_dir() else Path(path)
    prompts: list[dict[str, Any]] = []
    if path.is_dir() or path.suffix in (".jsonl", ".json", ".parquet"):
        for number, row in _rows(path):
            row = renamed(row, fields)
            where = f"{path}:{number}" if path.suffix in (".jsonl", ".json") \
                else f"{path} row {number}"
            theta, used = _side(row, "theta", theta_template, theta_chat, where)
            if theta is None:
                if isinstance(row.get(prompt_field), str) and row[prompt_field]:
                    theta, used = {"prompt": row[prompt_field]}, {prompt_field}
                elif isinstance(row.get("messages"), list) and row["messages"]:
                    theta, used = {"messages": row["messages"]}, {"messages"}
                else:
                    raise DataError(f"{where}: no non-empty `{prompt_field}` string and no "
                                    f"`messages` list; set `data.prompt_field` to the right "
                                    f"key, or data.theta_template.")
            target, used_target = _side(row, "target", target_template, target_chat, where)
            record = {"index": len(prompts), **theta}
            if target is not None:
                record["target"] = target
            fields = {key: value for key, value in row.items()
                      if key not in used | used_target | set(PER_MODEL_KEYS)}
            if fields:  # carried into the records as they are (an id, an answer...)
                record["fields"] = fields
            prompts.append(record)
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [{"index": i, "prompt": line} for i, line in
                   enumerate(line for line in lines if line.strip())]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts: give a file with at least one.")
    return prompts


def read_sequences(path: str | Path, text_field: str = "text") -> list[str | list[int]]:
    """Texts (`text_field`) or token-id lists (`token_ids`) from JSONL, or text lines."""
    path = _check_file(path)
    items: list[str | list[int]] = []
    if path.suffix in (".jsonl", ".json"):
        for number, row in _jsonl(path):
            if isinstance(row.get("token_ids"), list) and row["token_ids"]:
                items.append([int(t) for t in row["token_ids"]])
            elif isinstance(row.get(text_field), str) and row[text_field]:
                items.append(row[text_field])
            else:
                raise DataError(f"{path}:{number}: no non-empty `{text_field}` or `token_ids`.")
    else:
        items = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise DataError(f"input file {path} is empty: give a file with at least one sequence.")
    return items


@dataclass
class ScoreItem:
    """One prompt and the completions to score after it, as read from a score-mode input."""

    index: int
    """Position in the file (before sharding): the output's `index`."""
    where: str
    """`file:line`, for messages."""
    prompt: dict[str, Any]
    """`{"index", "prompt"}` or `{"index", "messages"}`, as read_prompts gives them."""
    prompt_token_ids: Optional[list[int]]
    """Given ids (used as they are, no BOS added), or None to tokenise `prompt`."""
    completions: list[Optional[str]]
    """Completion texts (None where only ids were given)."""
    completion_token_ids: Optional[list[list[int]]]
    """Given ids per completion, or None to tokenise the texts."""
    labels: bool
    """Given as a list (`completions`, or a list of id lists): probabilities are normalised
    over them."""
    target_prompt: Optional[dict[str, Any]] = None
    """The target's own prompt (`{"prompt"}` / `{"messages"}`), or None: theta's."""
    target_prompt_token_ids: Optional[list[int]] = None
    """The target's own prompt as given ids (a sample run's records carry them)."""


def read_score_items(path: str | Path, prompt_field: str = "prompt") -> list[ScoreItem]:
    """Score-mode records from a JSONL file; DataError naming file:line on a bad record.

    Prompt: `prompt_token_ids` (a non-empty id list), else `prompt_field` (a non-empty
    string), else chat `messages`. Completions: `completion_token_ids` (one id list, or a
    list of them), else `completions` (a list of strings: the label case), else `completion`
    (a string). Empty completions and records with no completion field are refused.
    samples.jsonl of sample mode reads as it is (its token ids are used).
    """
    path = _check_file(path)
    items = [score_item(f"{path}:{number}", index, row, prompt_field)
             for index, (number, row) in enumerate(_jsonl(path))]
    if not items:
        raise DataError(f"input file {path} holds no records: give a JSONL file with at least "
                        f"one prompt and completion.")
    return items


def score_item(where: str, index: int, row: dict[str, Any], prompt_field: str) -> ScoreItem:
    """One score-mode record; the target's own prompt, if the row gives one
    (`target_prompt_token_ids`, `target_prompt`, `target_messages`), rides along."""
    import dataclasses
    item = _score_item(where, index, row, prompt_field)
    target_ids = _token_ids(where, "target_prompt_token_ids", row.get("target_prompt_token_ids"))
    target, _ = _side(row, "target", None, True, where)
    if target is None and target_ids is None:
        return item
    if target is not None and "prompt" in target and target["prompt"].startswith("["):
        try:  # a sample run's record stores a chat prompt as its JSON
            target = {"messages": json.loads(target["prompt"])}
        except ValueError:
            pass
    return dataclasses.replace(item, target_prompt=target, target_prompt_token_ids=target_ids)


def _score_item(where: str, index: int, row: dict[str, Any], prompt_field: str) -> ScoreItem:
    prompt_ids = _token_ids(where, "prompt_token_ids", row.get("prompt_token_ids"))
    if isinstance(row.get(prompt_field), str) and row[prompt_field]:
        prompt = {"index": index, "prompt": row[prompt_field]}
    elif isinstance(row.get("messages"), list) and row["messages"]:
        prompt = {"index": index, "messages": row["messages"]}
    elif prompt_ids is not None:
        prompt = {"index": index, "prompt": None}
    else:
        raise DataError(f"{where}: no non-empty `prompt_token_ids`, `{prompt_field}` string or "
                        f"`messages` list; set `data.prompt_field` to the right key.")
    given = row.get("completion_token_ids")
    if isinstance(given, list) and given and all(isinstance(c, list) for c in given):
        ids = [_token_ids(f"{where} completion {i}", "completion_token_ids", c)
               for i, c in enumerate(given)]
        texts = row.get("completions") if isinstance(row.get("completions"), list) else [None]
        return ScoreItem(index, where, prompt, prompt_ids,
                         texts if len(texts) == len(ids) else [None] * len(ids), ids, True)
    if given is not None:
        return ScoreItem(index, where, prompt, prompt_ids, [row.get("completion")],
                         [_token_ids(where, "completion_token_ids", given)], False)
    if "completions" in row:
        texts = row["completions"]
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
            raise DataError(f"{where}: `completions` must be a non-empty list of strings.")
        labels = True
    elif isinstance(row.get("completion"), str):
        texts, labels = [row["completion"]], False
    else:
        raise DataError(f"{where}: no `completion` string, `completions` list or "
                        f"`completion_token_ids`: give each record the text(s) to score.")
    for i, text in enumerate(texts):
        if not text:
            raise DataError(f"{where}: completion {i} is empty: there is nothing to score; "
                            f"remove it or the record.")
    return ScoreItem(index, where, prompt, prompt_ids, texts, None, labels)


def _token_ids(where: str, key: str, value: Any) -> Optional[list[int]]:
    """A non-empty list of int ids, None when absent; DataError otherwise."""
    if value is None:
        return None
    if not (isinstance(value, list) and value and
            all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
        raise DataError(f"{where}: `{key}` must be a non-empty list of token ids (ints >= 0).")
    return value


def read_corpus(path: str | Path) -> str:
    """A whole text file as one string (perplexity corpora)."""
    path = _check_file(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"corpus {path} is empty: give a text file with content.")
    return text


def select(items: Sequence[T], shard_index: int, num_shards: int,
           limit: Optional[int] = None) -> list[T]:
    """This job's items: every `num_shards`-th from `shard_index` (shards are disjoint and
    cover all), then the first `limit` of those (None: all)."""
    return list(items[shard_index::num_shards])[:limit]
