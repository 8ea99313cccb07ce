"""An HTML report of sample runs, side by side: a summary table and PNG plots, no server.

    python -m dual_sampling.report RUN_DIR [RUN_DIR ...] [-o OUT_DIR]

A RUN_DIR is a sample run's output_dir (it holds samples.jsonl) or a Hydra multirun
directory (each job folder a run: `<sweep>/0, 1, ...`, or `output_dir/job0, job1, ...` for a
sweep with an explicit output_dir). The report goes to OUT_DIR/report.html, its figures to
OUT_DIR/report_files/*.png; OUT_DIR defaults to the RUN_DIR when there is one, else
./report. Sample mode writes the report of its own output_dir at the end of each run
(`sample.report=true`).

The table has one row per run (its swept values, read from the job's Hydra overrides, and
its summary recomputed from samples.jsonl); the figures overlay the runs: alpha histogram,
alpha and KL both ways by position, coverage by k, log-weight distributions with ESS, group
ESS (n > 1), tokens/s, and every summary figure against each swept value. A job that is not
a readable sample run (another mode, no complete record, foreign records) is skipped and
named in the report with the reason; with no run left the command fails with one line.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dual_sampling.errors import DataError, DualSamplingError
from dual_sampling.files.records import read_records
from dual_sampling.files.run_files import SAMPLES_FILE, SUMMARY_FILE
from dual_sampling.maths import sample_stats
from dual_sampling.maths import groups

REPORT_FILE, FIGURES_DIR = "report.html", "report_files"
OVERRIDE_FILES = (".hydra/overrides.yaml", "overrides.yaml")
# overrides that say where a run ran, not what it sampled: never "swept"
PLUMBING = re.compile(r"^(output_dir|progress|wandb\..*|.*\.(url|timeout_s|max_retries))$")
JOB_MARKERS = (SAMPLES_FILE, SUMMARY_FILE, ".hydra", "overrides.yaml")
TABLE_KEYS = ("alpha_method", "exact", "num_sequences", "num_tokens", "mean_alpha",
              "mean_kl_q_theta",
              "mean_kl_q_target", "mean_coverage_theta", "mean_coverage_target",
              "ess_theta_fraction", "ess_target_fraction", "mean_group_ess_theta_fraction",
              "mean_group_ess_target_fraction", "tokens_per_s")
SWEEP_KEYS = ("ess_theta_fraction", "ess_target_fraction", "mean_kl_q_theta",
              "mean_kl_q_target", "mean_alpha", "tokens_per_s")


@dataclass
class Run:
    """One sample run: where it is, what was swept for it, its records and summary."""

    path: Path
    overrides: dict[str, str]
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    label: str = ""


# -- finding and reading runs ------------------------------------------------------------------
def _read_overrides(job: Path) -> dict[str, str]:
    """`key=value` overrides a job was started with (Hydra's, or those sample mode keeps).

    Raises DataError naming the file when it is not a YAML list."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for name in OVERRIDE_FILES:
        if (job / name).is_file():
            try:
                items = OmegaConf.to_container(OmegaConf.load(job / name))
            except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
                raise DataError(f"{job / name}: unreadable ({exc})") from exc
            if not isinstance(items, list):
                raise DataError(f"{job / name}: not a list of key=value overrides")
            return dict(str(item).lstrip("+~").split("=", 1) for item in items
                        if "=" in str(item) and not str(item).startswith("hydra"))
    return {}


def _job_dirs(path: Path) -> list[Path]:
    """Job folders of a multirun directory, in numeric order (0, 1, ..., 10; job0, job1)."""
    def number(p: Path) -> tuple[int, str]:
        digits = re.sub(r"\D", "", p.name)
        return (int(digits) if digits else -1, p.name)

    return sorted((p for p in path.iterdir() if p.is_dir()
                   and any((p / marker).exists() for marker in JOB_MARKERS)), key=number)


def _load(job: Path, run: Run) -> Optional[str]:
    """Read a job's records and summary into `run`; the reason to skip it, or None."""
    mode = run.overrides.get("mode", "sample")
    if mode != "sample":
        return f"mode={mode}: the report covers sample runs"
    if not (job / SAMPLES_FILE).is_file():
        return f"no {SAMPLES_FILE} (not a sample run's output_dir, or it wrote nothing yet)"
    data = (job / SAMPLES_FILE).read_bytes()
    if data and not data.endswith(b"\n"):
        run.notes.append(f"a half-written last line of {SAMPLES_FILE} was ignored (a run "
                         f"killed mid-write; running it again resumes and removes it)")
    run.records = list(read_records(job / SAMPLES_FILE))
    if not run.records:
        return f"{SAMPLES_FILE} holds no complete record"
    try:
        saved = json.loads((job / SUMMARY_FILE).read_text()) if (job / SUMMARY_FILE).is_file() \
            else {}
        n = int(saved.get("n") or max(r.get("sample_index", 0) for r in run.records) + 1)
        run.summary = sample_stats.summarize(run.records, n)
        run.summary.update({key: saved[key] for key in (
            "tokens_per_s", "transport", "top_k", "temperature", "alpha_method", "alpha_min",
            "alpha_max", "exact") if key in saved})
        run.summary["n"] = n
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return (f"the {SAMPLES_FILE} records or {SUMMARY_FILE} lack or garble a field "
                f"({type(exc).__name__}: {exc}): not written by this version of "
                f"dual_sampling's sample mode")
    return None


def find_runs(paths: list[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every sample run under `paths` and every skipped job with its reason.

    Raises DataError for a path that is neither a run nor a multirun directory, or when no
    readable run is left (the message lists the skipped jobs and why).
    """
    runs: list[Run] = []
    skipped: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise DataError(f"{path}: no such directory; give a sample run's output_dir or a "
                            f"Hydra multirun directory.")
        jobs = [path] if (path / SAMPLES_FILE).exists() else _job_dirs(path)
        if not jobs:
            raise DataError(f"{path} holds no {SAMPLES_FILE} and no job folders: give a "
                            f"sample run's output_dir (where {SAMPLES_FILE} is) or a Hydra "
                            f"multirun directory.")
        for job in jobs:
            run = Run(path=job, overrides={})
            try:
                run.overrides = _read_overrides(job)
                reason = _load(job, run)
            except DataError as exc:
                reason = str(exc)
            if reason is None:
                runs.append(run)
            else:
                skipped.append((job, reason))
    if not runs:
        raise DataError("no sample run to report on: " + "; ".join(
            f"{job}: {reason}" for job, reason in skipped))
    _label(runs)
    return runs, skipped


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys with different values in the runs that set them (where-it-ran keys
    such as output_dir and URLs aside), in first-seen order."""
    keys = dict.fromkeys(k for run in runs for k in run.overrides if not PLUMBING.match(k))
    return [k for k in keys if len({run.overrides[k] for run in runs if k in run.overrides}) > 1]


def _label(runs: list[Run]) -> None:
    """Legend names: the folder (with its parent where two share a name), and the swept
    values while there are at most two (the table has them all)."""
    swept = swept_keys(runs)
    names = [run.path.name for run in runs]
    for run in runs:
        name = run.path.name if names.count(run.path.name) == 1 else \
            f"{run.path.parent.name}/{run.path.name}"
        values = ", ".join(f"{k}={run.overrides.get(k, '-')}" for k in swept)
        run.label = f"{name} ({values})" if values and len(swept) <= 2 else name


# -- figures ---------------------------------------------------------------------------------
def _figure(ncols: int = 1, nrows: int = 1):
    """A matplotlib Figure (no pyplot: no global state) and its axes, flat."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 3.8 * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def _save(fig: Any, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
    return path


def _alpha_histogram(runs: list[Run], path: Path) -> Path:
    fig, (ax,) = _figure()
    for run in runs:
        alpha = sample_stats.column(run.records, "alpha")
        ax.hist(alpha[~np.isnan(alpha)], bins=np.linspace(0, 1, 41), histtype="step",
                density=True, label=run.label)
    ax.set(title="alpha per token", xlabel="alpha (0 = theta, 1 = target)", ylabel="density")
    return _save(fig, path)


def _by_position(runs: list[Run], path: Path, names: tuple[str, ...], title: str) -> Path:
    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names):
        for run in runs:
            ax.plot(sample_stats.by_position(run.records, name), label=run.label)
        ax.set(title=f"{title}: {name}", xlabel="completion position", ylabel="mean")
    return _save(fig, path)


def _coverage(runs: list[Run], path: Path) -> Path:
    fig, axes = _figure(2)
    for ax, model in zip(axes, groups.MODELS):
        for run in runs:
            curve = sample_stats.coverage_by_k(run.records, model)
            line = ax.plot(np.arange(1, len(curve) + 1), curve, label=run.label) \
                if curve is not None else None
            top_k = run.summary.get("top_k")
            if top_k is not None:
                ax.plot([top_k], [run.summary[f"mean_coverage_{model}"]], "o",
                        color=line[0].get_color() if line else None,
                        label=None if line else run.label)
        ax.set(title=f"{model}: mass of its top-k", xlabel="k", ylabel="mean coverage",
               ylim=(0, 1.02), xlim=(0, None))
    return _save(fig, path)


def _log_weights(runs: list[Run], path: Path) -> Path:
    with_groups = any(run.summary.get("n", 1) > 1 for run in runs)
    fig, axes = _figure(3 if with_groups else 2)
    for ax, model in zip(axes, groups.MODELS):
        for run in runs:
            log_w = sample_stats.sequence_log_weights(run.records, model)
            finite = log_w[np.isfinite(log_w)]
            ax.hist(finite - (finite.max() if finite.size else 0), bins=30, histtype="step",
                    label=f"{run.label}: ESS {run.summary[f'ess_{model}_fraction']:.3g}")
        ax.set(title=f"log w_{model} - max (sequence)", xlabel="nats", ylabel="sequences")
    if with_groups:
        ax = axes[2]
        for run in (run for run in runs if run.summary.get("n", 1) > 1):
            rows = groups.group_weights(run.records, run.summary["n"])
            for model in groups.MODELS:
                ax.hist([r[f"ess_{model}_fraction"] for r in rows], bins=np.linspace(0, 1, 21),
                        histtype="step", label=f"{run.label}: {model}")
        ax.set(title="ESS / n per complete group", xlabel="ESS fraction", ylabel="groups")
    return _save(fig, path)


def _throughput(runs: list[Run], path: Path) -> Path:
    fig, (ax,) = _figure()
    values = [run.summary.get("tokens_per_s") or 0.0 for run in runs]
    ax.bar(range(len(runs)), values)
    ax.set_xticks(range(len(runs)), [run.label for run in runs], rotation=20, ha="right",
                  fontsize=7)
    ax.set(title="tokens/s (last session of each run)", ylabel="tokens/s")
    return _save(fig, path)


def _as_number(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _against(runs: list[Run], key: str, path: Path) -> Path:
    """Summary figures against one swept key: a line through the runs that share the other
    swept values where the key is numeric, points where it is not ("-": not set)."""
    others = [k for k in swept_keys(runs) if k != key]
    value = {id(run): run.overrides.get(key, "-") for run in runs}
    numeric = all(_as_number(v) is not None for v in value.values())
    ticks = sorted(set(value.values()), key=lambda v: _as_number(v) if numeric else v)
    x = {i: _as_number(v) if numeric else float(ticks.index(v)) for i, v in value.items()}
    series: dict[str, list[Run]] = {}
    for run in runs:
        series.setdefault(", ".join(f"{k}={run.overrides.get(k, '-')}" for k in others),
                          []).append(run)
    fig, axes = _figure(3, math.ceil(len(SWEEP_KEYS) / 3))
    for ax, metric in zip(axes, SWEEP_KEYS):
        for name, members in series.items():
            members = sorted(members, key=lambda r: x[id(r)])
            ax.plot([x[id(r)] for r in members],
                    [np.nan if r.summary.get(metric) is None else r.summary[metric]
                     for r in members], "o-" if numeric else "o", label=name or None)
        if not numeric:
            ax.set_xticks(range(len(ticks)), ticks)
        ax.set(title=metric, xlabel=key)
    return _save(fig, path)


def make_figures(runs: list[Run], folder: Path) -> list[Path]:
    """Write every figure of these runs as PNG files in `folder` (replacing the figures of
    an earlier report there); their paths, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    figures = [
        _alpha_histogram(runs, folder / "alpha_histogram.png"),
        _by_position(runs, folder / "alpha_by_position.png", ("alpha",), "alpha"),
        _by_position(runs, folder / "kl_by_position.png", ("kl_q_theta", "kl_q_target"), "KL"),
        _coverage(runs, folder / "coverage_by_k.png"),
        _log_weights(runs, folder / "log_weights_ess.png"),
        _throughput(runs, folder / "tokens_per_s.png"),
    ]
    for key in swept_keys(runs):
        name = re.sub(r"[^\w.-]", "_", key)
        figures.append(_against(runs, key, folder / f"against_{name}.png"))
    return figures


# -- the page ----------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def render_html(runs: list[Run], skipped: list[tuple[Path, str]], figures: list[Path],
                out_dir: Path) -> str:
    """The report page: runs and notes, skipped jobs, the summary table, the figures."""
    e = html.escape
    swept = swept_keys(runs)
    head = "".join(f"<th>{e(k)}</th>" for k in ("run", *swept, *TABLE_KEYS))
    rows = "".join(
        "<tr>" + f'<td data-key="run">{e(run.label)}</td>'
        + "".join(f'<td data-key="{e(k)}">{e(_cell(run.overrides.get(k)))}</td>' for k in swept)
        + "".join(f'<td data-key="{e(k)}">{e(_cell(run.summary.get(k)))}</td>'
                  for k in TABLE_KEYS) + "</tr>\n" for run in runs)
    listing = "".join(f"<li>{e(run.label)}: <code>{e(str(run.path))}</code>"
                      + "".join(f"<br><em>note: {e(note)}</em>" for note in run.notes) + "</li>"
                      for run in runs)
    skips = "".join(f"<li><code>{e(str(job))}</code>: {e(reason)}</li>" for job, reason in skipped)
    images = "".join(f'<figure><img src="{e(fig.relative_to(out_dir).as_posix())}" '
                     f'alt="{e(fig.stem)}"><figcaption>{e(fig.stem)}</figcaption></figure>\n'
                     for fig in figures)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>dual_sampling report</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #bbb;padding:3px 6px;text-align:right}} img{{max-width:100%}}
figure{{display:inline-block;margin:0.5em}}</style></head><body>
<h1>dual_sampling report</h1>
<h2>Runs</h2><ul>{listing}</ul>
{f"<h2>Skipped jobs</h2><ul id='skipped'>{skips}</ul>" if skipped else ""}
<h2>Summary</h2>
<table id="summary"><thead><tr>{head}</tr></thead><tbody>
{rows}</tbody></table>
<h2>Figures</h2>
{images}</body></html>
"""


def write_report(paths: list[Path], out_dir: Path) -> list[Path]:
    """Write OUT_DIR/report.html and its figures for the runs under `paths`; the figures.

    Raises DataError as `find_runs` does.
    """
    runs, skipped = find_runs(paths)
    out_dir = Path(out_dir)
    figures = make_figures(runs, out_dir / FIGURES_DIR)
    (out_dir / REPORT_FILE).write_text(render_html(runs, skipped, figures, out_dir))
    return figures


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dual_sampling.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a sample run's output_dir or a Hydra multirun directory")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="where report.html goes (default: the RUN_DIR if one, else ./report)")
    args = parser.parse_args(argv)
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else Path("report"))
    try:
        write_report(args.run_dirs, out)
    except DualSamplingError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"report: {out / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
