"""The docs against the code: fast, no servers.

Every fenced code block (```bash, ```sh or plain ```) of README.md and docs/*.md is read as
shell: `\\` continuations joined, comments dropped, `&&`, `||`, `;` and `|` split into
commands, `[optional]` arguments unwrapped. Each command is checked by what it runs:

- `python -m dual_sampling ...` (the Hydra app) composes under Hydra and passes the schema's
  checks (`to_run_config`), for every point of a `-m` sweep. A file the schema requires to
  exist (`data.prompts`, `data.path`) that is not in the repository is a placeholder
  (`prompts.jsonl`) and is replaced by a temporary file. A command with `...` stands for a
  longer one: only there are missing required keys filled in.
- `start_vllm.sh` (`./start_vllm.sh`, `dual-sampling-serve`): every flag is one of the
  script's `case` labels, and a flag that takes a value has one.
- `python -m dual_sampling.<tool>` answers `--help` with exit 0; `dual_sampling.report`
  arguments also resolve to runs (`<time>` is a fake Hydra multirun directory, its jobs
  holding one record each, next to the `multirun.yaml` report refuses).
- `bash scripts/x.sh --flag`: the script exists and names the flag.

Every repository path a doc names (`docs/...`, `dual_sampling/...`, `scripts/...`,
`experiments/...`, `tests/...`, `conf/...`, and the package's subfolders) exists or matches
a file; Markdown links resolve, anchors included. Paths the commands make (`.cache/`,
`runs/`) are not checked. The reference pages under docs/reference/ equal what
`python -m dual_sampling.docs_reference` makes now, and every field it documents has a
description and every description a field.
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from dual_sampling import docs_reference
from dual_sampling.config import register_schemas, to_run_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)[ \t]*\n(.*?)^ *```[ \t]*$", re.M | re.S)
SHELL_LANGUAGES = ("", "bash", "sh")
SEPARATORS = ("&&", "||", ";", "|")
# files the schema checks for: keys whose value must name an existing file
FILE_KEYS = ("data.prompts", "data.path")
REQUIRED_FOR_PARTIAL = {"sample": ["data.prompts=prompts.jsonl"], "score": ["data.path=x.jsonl"],
                        "topk": ["data.path=x.txt"], "perplexity": ["data.path=x.txt"]}
START_VLLM = ("start_vllm.sh", "./start_vllm.sh", "dual-sampling-serve")
MADE_BY_COMMANDS = (".cache/", "runs/", "ckpt/")
PATH_PREFIXES = ("docs/", "dual_sampling/", "scripts/", "experiments/", "tests/", "conf/")
PACKAGE_DIRS = ("vllm_plugin/", "transports/", "modes/", "fused/")


@dataclasses.dataclass
class Command:
    doc: str
    argv: list[str]

    def __str__(self) -> str:
        return f"{self.doc}: {' '.join(self.argv)}"


def shell_commands(text: str) -> list[list[str]]:
    """The commands of one shell block, as argv lists."""
    joined = re.sub(r"\\\n", " ", text)
    commands = []
    for line in joined.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not shell (output shown in a plain block)
            continue
        current: list[str] = []
        for word in words:
            if word in SEPARATORS:
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [c for c in commands if c]


def doc_commands() -> list[Command]:
    found = []
    for doc in DOCS:
        for indent, language, body in FENCE.findall(doc.read_text()):
            if language not in SHELL_LANGUAGES:
                continue
            body = "\n".join(line[len(indent):] for line in body.splitlines())
            found += [Command(doc.name, argv) for argv in shell_commands(body)]
    return found


def strip_env(argv: list[str]) -> list[str]:
    """Drop leading VAR=value assignments."""
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        argv = argv[1:]
    return argv


def unwrap_optional(argv: list[str]) -> list[list[str]]:
    """`[x]` -> x; `[k=a|b]` gives one argv per alternative; a lone `[`/`]` pair of words
    (`[runs/y ...]`) is dropped with what it holds."""
    out, alternatives, depth = [], [], 0
    for word in argv:
        if word.startswith("[") and word.endswith("]") and "=" not in word.split("[", 1)[0]:
            inner = word[1:-1]
            if "=" in inner and "|" in inner:
                key, values = inner.split("=", 1)
                alternatives.append([f"{key}={v}" for v in values.split("|")])
                out.append(None)
            else:
                out.append(inner)
        elif word.startswith("["):
            depth += 1
        elif word.endswith("]") and depth:
            depth -= 1
        elif not depth:
            out.append(word)
    variants = []
    for choice in itertools.product(*alternatives) if alternatives else [()]:
        picks = iter(choice)
        variants.append([next(picks) if w is None else w for w in out])
    return variants


COMMANDS = doc_commands()


def commands_of(predicate) -> list[Command]:
    return [Command(c.doc, v) for c in COMMANDS for v in unwrap_optional(strip_env(c.argv))
            if v and predicate(v)]


def _id(command: Command) -> str:
    return str(command)[:90]


# -- python -m dual_sampling ...: Hydra ---------------------------------------------------

def is_hydra_app(argv: list[str]) -> bool:
    return argv[:3] == ["python", "-m", "dual_sampling"] or argv[0] == "dual-sampling"


HYDRA_COMMANDS = commands_of(is_hydra_app)


@pytest.fixture(scope="module")
def placeholder_files(tmp_path_factory):
    """Stand-ins for files a doc names but the repository does not hold."""
    root = tmp_path_factory.mktemp("placeholders")
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "text": "hi", "completion": " there"}) + "\n")
    return root, prompts


def _fill_file(value: str, root: Path, stand_in: Path) -> str:
    """A repository file stays (absolute); anything else becomes the stand-in."""
    def one(path: str) -> str:
        return str(REPO / path) if (REPO / path).is_file() else str(stand_in)
    if value.startswith("[") and value.endswith("]"):
        return "[" + ",".join(one(p) for p in value[1:-1].split(",")) + "]"
    return one(value)


def hydra_jobs(argv: list[str], root: Path, stand_in: Path) -> list[list[str]]:
    """The overrides of each job the command runs (each sweep point with -m)."""
    words = argv[3:] if argv[0] == "python" else argv[1:]
    multirun = "-m" in words or "--multirun" in words
    partial = "..." in words
    overrides = [w for w in words if w not in ("-m", "--multirun", "...")]
    assert not [w for w in overrides if w.startswith("-")], f"unknown option in {argv}"
    overrides = [f"{k}={_fill_file(v, root, stand_in)}" if k in FILE_KEYS else w
                 for w in overrides for k, _, v in [w.partition("=")]]
    mode = next((w.split("=", 1)[1] for w in overrides if w.startswith("mode=")), "sample")
    if partial:
        given = {w.split("=", 1)[0] for w in overrides}
        overrides += [f"{k}={_fill_file(v, root, stand_in)}" for k, _, v in
                      (w.partition("=") for w in REQUIRED_FOR_PARTIAL[mode]) if k not in given]
    if not any(w.startswith("output_dir=") for w in overrides):
        overrides.append(f"output_dir={root / 'out'}")
    parsed = OverridesParser.create().parse_overrides(overrides)
    if not multirun:
        assert not any(o.is_sweep_override() for o in parsed), f"a sweep without -m: {argv}"
        return [overrides]
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if o.is_sweep_override() else [o.input_line] for o in parsed]
    return [list(job) for job in itertools.product(*axes)][:200]


@pytest.mark.parametrize("command", HYDRA_COMMANDS, ids=_id)
def test_hydra_command_composes_and_passes_the_schema(command, placeholder_files):
    root, stand_in = placeholder_files
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "dual_sampling" / "conf"), version_base=None):
        for overrides in hydra_jobs(command.argv, root, stand_in):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            with open_dict(cfg):
                del cfg["hydra"]
            to_run_config(OmegaConf.create(OmegaConf.to_container(cfg)))


# -- start_vllm.sh ------------------------------------------------------------------------

START_COMMANDS = commands_of(lambda v: Path(v[0]).name in START_VLLM or v[0] in START_VLLM)
SCRIPT_FLAGS = {name: takes for label, takes, _ in docs_reference.script_flags()
                for name in label.split("|")}


@pytest.mark.parametrize("command", START_COMMANDS, ids=_id)
def test_start_vllm_flags_are_the_scripts(command):
    words = command.argv[1:]
    if words[:1] == ["stop"]:
        assert words[1:] in ([], ["--run-dir", words[-1]]), command
        return
    words = words[:words.index("--")] if "--" in words else words
    i = 0
    while i < len(words):
        flag = words[i]
        assert flag in SCRIPT_FLAGS, f"{command}: start_vllm.sh takes no {flag}"
        if SCRIPT_FLAGS[flag]:
            assert i + 1 < len(words) and not words[i + 1].startswith("--"), \
                f"{command}: {flag} needs a value"
            i += 1
        i += 1


# -- python -m dual_sampling.<tool> -------------------------------------------------------

TOOL_COMMANDS = commands_of(lambda v: v[:2] == ["python", "-m"]
                            and v[2].startswith("dual_sampling."))


@pytest.mark.parametrize("module", sorted({c.argv[2] for c in TOOL_COMMANDS}))
def test_tool_answers_help(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"python -m {module} --help: {done.stderr[-500:]}"


def fake_multirun(root: Path) -> Path:
    """A Hydra multirun directory: multirun.yaml and two jobs of one sample record each."""
    sweep = root / "multirun"
    for job in ("0", "1"):
        (sweep / job / ".hydra").mkdir(parents=True, exist_ok=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- sample.alpha={job}\n")
        (sweep / job / "samples.jsonl").write_text(json.dumps(fake_record()) + "\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def fake_record() -> dict:
    from dual_sampling.core.coordinator import TOKEN_FIELDS
    record = {name: None for name in docs_reference.SAMPLES if name != "candidates"}
    record.update({name: [0.5] for name in TOKEN_FIELDS}, index=0, sample_index=0,
                  num_tokens=1, finish_reason="stop", log_w_theta=0.0, log_w_target=0.0)
    return record


@pytest.mark.parametrize("command", [c for c in TOOL_COMMANDS
                                     if c.argv[2] == "dual_sampling.report"], ids=_id)
def test_report_arguments_resolve_to_runs(command, tmp_path):
    from dual_sampling import report
    sweep = fake_multirun(tmp_path)
    paths = []
    for word in command.argv[3:]:
        if word.startswith("-"):
            break
        if "<time>" in word:
            pattern = str(sweep) + word.split("<time>", 1)[1]
            paths += glob.glob(pattern) if glob.has_magic(pattern) else [pattern]
        else:
            paths.append(str(sweep / "0"))  # a RUN_DIR placeholder: one run
    runs, skipped = report.find_runs([Path(p) for p in paths])
    assert runs and not skipped, f"{command}: skipped {skipped}"


# -- bash scripts/x.sh --------------------------------------------------------------------

SCRIPT_COMMANDS = commands_of(lambda v: v[0] == "bash" and len(v) > 1)
SCRIPT_FLAG_SOURCES = {"scripts/gpu_check.sh": ("experiments/gpu_check.py",)}


@pytest.mark.parametrize("command", SCRIPT_COMMANDS, ids=_id)
def test_scripts_exist_and_take_the_flags(command):
    script = command.argv[1]
    assert (REPO / script).is_file(), f"{command}: no {script}"
    text = "".join((REPO / p).read_text()
                   for p in (script, *SCRIPT_FLAG_SOURCES.get(script, ())))
    for flag in (w for w in command.argv[2:] if w.startswith("--")):
        assert re.search(re.escape(flag) + r"\b", text), f"{command}: {script} takes no {flag}"


# -- paths and links ----------------------------------------------------------------------

PATH_WORD = re.compile(r"(?<![\w./-])((?:%s)[\w./*-]*[\w*])" % "|".join(
    re.escape(p) for p in PATH_PREFIXES + PACKAGE_DIRS))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _exists(path: str) -> bool:
    bases = [REPO, REPO / "dual_sampling", REPO / "dual_sampling" / "vllm_plugin"]
    return any(glob.glob(str(base / path)) for base in bases)


def _anchors(doc: Path) -> set[str]:
    heads = re.findall(r"^#+ (.*)$", doc.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_paths_and_links_a_doc_names_exist(doc):
    text = doc.read_text()
    missing = sorted({p for p in PATH_WORD.findall(text)
                      if "{" not in p and not _exists(p.split("::")[0])})
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        resolved = (doc.parent / file).resolve() if file else doc
        if not resolved.exists():
            missing.append(target)
        elif anchor and anchor not in _anchors(resolved):
            missing.append(target)
    assert not missing, f"{doc.name} names what is not there: {missing}"


def test_paths_made_by_commands_are_not_repo_paths():
    assert not any(p.startswith(MADE_BY_COMMANDS) for p in PATH_PREFIXES)


# -- the reference pages ------------------------------------------------------------------

def test_reference_pages_are_up_to_date():
    stale = [rel for rel, text in docs_reference.render().items()
             if not (REPO / rel).is_file() or (REPO / rel).read_text() != text]
    assert not stale, (f"{stale} differ from the code: run `{docs_reference.COMMAND}` "
                       f"and commit the pages")


def test_every_record_field_has_a_description_and_every_description_a_field():
    fields = docs_reference.record_fields()
    for name, descriptions in docs_reference.RECORD_DESCRIPTIONS.items():
        assert set(fields[name]) == set(descriptions), (
            f"{name}: fields without a description {set(fields[name]) - set(descriptions)}, "
            f"descriptions without a field {set(descriptions) - set(fields[name])} "
            f"(dual_sampling/docs_reference.py)")


def test_every_start_vllm_flag_has_a_description_and_every_description_a_flag():
    labels = {label for label, _, _ in docs_reference.script_flags()}
    assert labels == set(docs_reference.FLAGS), (
        f"flags without a description {labels - set(docs_reference.FLAGS)}, descriptions "
        f"without a flag {set(docs_reference.FLAGS) - labels} (dual_sampling/docs_reference.py)")


def test_the_docs_hold_commands_of_every_kind():
    """The parser finds what it is meant to check (a broken fence regex checks nothing)."""
    assert len(HYDRA_COMMANDS) >= 5 and len(START_COMMANDS) >= 5 and TOOL_COMMANDS


def _marked_table(text: str, marker: str) -> str:
    """The Markdown table right after the `<!-- marker... -->` comment."""
    after = text.split(f"<!-- {marker}", 1)[1].split("-->", 1)[1].lstrip("\n")
    return "".join(itertools.takewhile(lambda line: line.startswith("|"),
                                       after.splitlines(keepends=True)))


def test_the_readme_table_is_benchmarks_table():
    """The README's one table of figures is a copy of docs/benchmarks.md's, not a fork."""
    readme = _marked_table((REPO / "README.md").read_text(), "two-commands")
    bench = _marked_table((REPO / "docs" / "benchmarks.md").read_text(), "two-commands")
    assert readme and readme == bench, "README.md's table differs from docs/benchmarks.md's"
