"""The package's layout (docs/development.md, "Layout"): groups by concern, each importing
only the groups below it, and a layout section that names every part of the tree."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dual_sampling"
DOC = Path(__file__).resolve().parents[1] / "docs" / "development.md"

# what each part may import (besides itself); a part is a subfolder or a top-level module
BELOW = {
    "errors": set(), "maths": {"errors"}, "wire": {"maths", "errors"},
    "config": {"maths", "wire", "errors"},
    "clients": {"config", "wire", "maths", "errors"},
    "files": {"config", "wire", "maths", "errors"},
    "models": {"maths", "errors"},
    "serving": {"config", "errors"},
    "vllm_plugin": {"maths", "wire", "errors"},
    "core": {"clients", "files", "config", "wire", "maths", "errors"},
    "tracking": {"config"},
    "report": {"files", "maths", "errors"},
    "modes": {"core", "clients", "files", "report", "tracking", "config", "wire", "maths",
              "errors"},
    "api": {"modes", "core", "clients", "files", "config", "errors"},
    "merge": {"core", "files", "maths", "errors"},
    "side_by_side": {"api", "files"},
    "docs_reference": {"modes", "core", "clients", "files", "config", "maths"},
    "__main__": {"modes", "serving", "files", "config", "errors"},
    "__init__": {"api"},
}


def part_of(module: str) -> str:
    """`dual_sampling.maths.mixture` -> maths, `dual_sampling.api` -> api."""
    return module.split(".")[1] if "." in module else "__init__"


def imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        part = part_of(".".join(relative.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module \
                    and node.module.startswith("dual_sampling"):
                names = [node.module] if node.module != "dual_sampling" else \
                    [f"dual_sampling.{alias.name}" for alias in node.names]
                out.setdefault(part, set()).update(part_of(n) for n in names)
    return out


def test_each_part_imports_only_the_parts_below_it():
    found = imports()
    assert set(found) <= set(BELOW), f"a part this test does not place: {set(found) - set(BELOW)}"
    wrong = {part: sorted(used - BELOW[part] - {part}) for part, used in found.items()
             if used - BELOW[part] - {part}}
    assert not wrong, f"imports up or sideways: {wrong}"


def test_the_layout_section_names_every_part_of_the_tree():
    section = DOC.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    parts = {p.name + "/" for p in PACKAGE.iterdir()
             if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py"}
    parts |= {f"{folder.name}/{p.name}" for folder in PACKAGE.iterdir() if folder.is_dir()
              and folder.name not in ("vllm_plugin",) for p in folder.glob("*.py")
              if p.name != "__init__.py"}
    named = set(re.findall(r"[\w/]+(?:\.py|/)", section))
    missing = {p for p in parts if p not in named and p.split("/")[-1] not in named}
    assert not missing, f"docs/development.md's layout does not name {sorted(missing)}"
