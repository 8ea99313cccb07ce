"""The one way this plugin replaces a vLLM method: `replace`, which records what it replaced.

Every replaced method goes through `replace(owner, name, make, feature=...)`: it calls
`make(original)` for the new function, keeps the original on it (`_dual_sampling_original`,
whose signature compat.py checks), replaces it once a process per `setting` (vLLM may load
the plugin twice; a new setting replaces the wrapper, never wraps it again), and records it
in `APPLIED` under its compat.py feature. tests/test_patches.py installs every patch and
checks that each replaced name is listed in compat.PRIVATE under that feature, so an upgrade
of vLLM that moves one fails one clear test, and `undo` puts vLLM back (for tests).

`owner` is a class, or one object (the session gate wraps one engine client's method);
a classmethod stays a classmethod, and `make` gets its plain function (call it with `cls`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

ORIGINAL, SETTING = "_dual_sampling_original", "_dual_sampling_setting"


@dataclass(frozen=True)
class Replaced:
    """One replaced method: the compat.py feature, the class's module and dotted name."""

    feature: str
    module: str
    name: str  # "Class.method"


APPLIED: dict[tuple[str, str], Replaced] = {}
_UNDO: list[tuple[Any, str, Any, bool]] = []  # (owner, name, what was there, was in __dict__)


def replace(owner: Any, name: str, make: Callable[[Callable], Callable], *, feature: str,
            setting: Any = True) -> None:
    """Set `owner.name` to `make(original)` unless it is already ours with this `setting`."""
    cls = owner if isinstance(owner, type) else type(owner)
    raw = owner.__dict__.get(name) if isinstance(owner, type) else None
    is_classmethod = isinstance(raw, classmethod)
    current = raw.__func__ if is_classmethod else getattr(owner, name)
    if getattr(current, SETTING, None) == setting:
        return
    original = getattr(current, ORIGINAL, None)
    if original is None:
        had = name in vars(owner)
        _UNDO.append((owner, name, vars(owner).get(name), had))
        original = current
    patched = make(original)
    setattr(patched, SETTING, setting)
    setattr(patched, ORIGINAL, original)
    setattr(owner, name, classmethod(patched) if is_classmethod else patched)
    APPLIED[(cls.__module__, f"{cls.__qualname__}.{name}")] = Replaced(
        feature, cls.__module__, f"{cls.__qualname__}.{name}")


def original_of(func: Any) -> Any:
    """vLLM's own function behind one of ours (itself when not replaced)."""
    return getattr(func, ORIGINAL, func)


def undo() -> None:
    """Put back every method `replace` changed in this process (tests)."""
    while _UNDO:
        owner, name, value, had = _UNDO.pop()
        if had:
            setattr(owner, name, value)
        else:
            delattr(owner, name)
    APPLIED.clear()
