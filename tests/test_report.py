"""dual_sampling.report: the page, its table and figures, bad input, and Chromium showing it.

Pure tests build run directories from synthetic records; the server tests report on a real
small run and a real two-job sweep (through `python -m dual_sampling`, as users run it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from dual_sampling import report
from dual_sampling.errors import DataError
from dual_sampling.files.records import read_records
from dual_sampling.maths import sample_stats
from helpers import check_figures, check_table_row, read_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def fake_records(n_prompts: int, n: int, seed: int, top_k: int = 4) -> list[dict]:
    """Records shaped like sample mode's, with random values."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(n_prompts):
        for sample_index in range(n):
            length = int(rng.integers(2, 7))
            logp = np.log(rng.dirichlet(np.ones(top_k + 2), size=length))[:, :top_k]
            records.append({
                "index": index, "sample_index": sample_index, "num_tokens": length,
                "alpha": rng.uniform(0, 1, length).tolist(),
                "kl_q_theta": rng.uniform(0, 1, length).tolist(),
                "kl_q_target": [None] + rng.uniform(0, 1, length - 1).tolist(),
                "coverage_theta": np.exp(logp).sum(1).tolist(),
                "coverage_target": rng.uniform(0.5, 1, length).tolist(),
                "log_w_theta": float(rng.normal()), "log_w_target": float(rng.normal()),
                "finish_reason": "length",
                "candidates": [{"logp_theta": row.tolist(), "logp_target": row.tolist()}
                               for row in logp]})
    return records


def fake_run(path: Path, records: list[dict], overrides: list[str] = (), n: int = 1) -> Path:
    path.mkdir(parents=True)
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps({"tokens_per_s": 123.0, "n": n, "top_k": 4}))
    if overrides:
        (path / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return path


# -- pure -------------------------------------------------------------------------------------
def test_sweep_report_table_figures_and_a_skipped_job(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [fake_run(sweep / f"job{j}", fake_records(5, 2, seed=j), ["mode=sample",
            f"sample.top_k={k}"], n=2) for j, k in enumerate((5, 20))]
    (sweep / "job2").mkdir()  # a job of another mode
    (sweep / "job2" / "overrides.yaml").write_text("- mode=topk\n- sample.top_k=50\n")
    figures = report.write_report([sweep], sweep)
    page = read_page(sweep)
    check_figures(sweep, page, at_least=7)
    assert "against_sample.top_k" in " ".join(page.images)
    assert len(page.rows) == 2
    for row, job, k in zip(page.rows, jobs, ("5", "20")):
        assert row["sample.top_k"] == k
        summary = sample_stats.summarize(list(read_records(job / "samples.jsonl")), 2)
        summary["tokens_per_s"] = 123.0
        check_table_row(row, summary)
        assert float(row["mean_group_ess_theta_fraction"]) == pytest.approx(
            summary["mean_group_ess_theta_fraction"], rel=1e-3)
    text = (sweep / "report.html").read_text()
    assert "Skipped jobs" in text and "job2" in text and "mode=topk" in text
    assert set(figures) == {sweep / src for src in page.images}


def test_hydra_multirun_layout_reads_hydra_overrides(tmp_path):
    """Hydra's own layout: <sweep>/multirun.yaml, <sweep>/0, 1, ... each with .hydra/."""
    sweep = tmp_path / "multirun"
    for job, temperature in enumerate(("0.5", "2.0", "1.0")):
        run = fake_run(sweep / str(job), fake_records(3, 1, seed=job))
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(
            f"- mode=sample\n- sample.temperature={temperature}\n- hydra.verbose=true\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    report.write_report([sweep], sweep)
    page = read_page(sweep)
    assert [row["sample.temperature"] for row in page.rows] == ["0.5", "2.0", "1.0"]
    assert "hydra.verbose" not in (sweep / "report.html").read_text()
    assert any("against_sample.temperature" in src for src in page.images)


def test_coverage_by_k_and_by_position_against_direct_formulas():
    records = fake_records(3, 1, seed=4)
    probs = np.array([np.exp(c["logp_theta"]) for r in records for c in r["candidates"]])
    want = np.cumsum(-np.sort(-probs, axis=1), axis=1).mean(0)
    np.testing.assert_allclose(sample_stats.coverage_by_k(records, "theta"), want)
    first = [r["kl_q_theta"][0] for r in records]
    assert sample_stats.by_position(records, "kl_q_theta")[0] == pytest.approx(np.mean(first))
    assert np.isnan(sample_stats.by_position(records, "kl_q_target")[0])  # all null there


def test_unreadable_summary_or_overrides_skip_the_job_by_name(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "job0", fake_records(2, 1, seed=0), ["sample.top_k=5"])
    (fake_run(sweep / "job1", fake_records(2, 1, seed=1)) / "summary.json").write_text("{")
    (fake_run(sweep / "job2", fake_records(2, 1, seed=2)) / "overrides.yaml").write_text("a: [")
    report.write_report([sweep], sweep)
    text = (sweep / "report.html").read_text()
    assert len(read_page(sweep).rows) == 1
    assert "job1</code>: the samples.jsonl records or summary.json" in text
    assert "job2/overrides.yaml: unreadable" in text


def test_half_written_last_line_is_a_note_not_a_crash(tmp_path):
    run = fake_run(tmp_path / "run", fake_records(3, 1, seed=1))
    with (run / "samples.jsonl").open("ab") as fh:
        fh.write(b'{"index": 9, "alpha": [0.')
    report.write_report([run], run)
    text = (run / "report.html").read_text()
    assert "half-written last line" in text
    assert read_page(run).rows[0]["num_sequences"] == "3"


def with_samples(text: str):
    def make(d: Path) -> Path:
        (d / "samples.jsonl").write_text(text)
        return d
    return make


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "no such directory"),
    (lambda d: d, "holds no samples.jsonl and no job folders"),
    (with_samples(""), "no complete record"),
    (with_samples('{"index": 0}\n'), "lack or garble"),
    (with_samples('{"index": 0}\nnot json\n'), ":2: not a JSON"),
    (with_samples('[1, 2]\n'), "lack or garble"),
])
def test_bad_run_dirs_give_one_clear_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DataError, match=message):
        report.write_report([path], tmp_path / "out")
    done = subprocess.run([sys.executable, "-m", "dual_sampling.report", str(path), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message.split(":")[-1].strip() in done.stderr


def chromium_image_widths(page: Path, tmp: Path) -> list[int]:
    """Open `page` in headless Chromium; the naturalWidth of each of its images once loaded.

    A copy of the page gets a script that writes the widths into the DOM, which
    --dump-dom prints after --virtual-time-budget (so every image has loaded or failed)."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", """<script>
window.addEventListener('load', () => { const p = document.createElement('pre');
  p.id = 'widths'; p.textContent = JSON.stringify(
    Array.from(document.images, i => i.complete ? i.naturalWidth : 0));
  document.body.appendChild(p); });</script></body>"""))
    profile = tempfile.mkdtemp(dir=tmp)
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--allow-file-access-from-files",
         "--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    start = done.stdout.index('<pre id="widths">') + len('<pre id="widths">')
    return json.loads(done.stdout[start:done.stdout.index("</pre>", start)])


def test_chromium_shows_every_image(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium missing in CI: scripts/setup_env.sh installs it (apt-get)")
        pytest.skip("no chromium: `apt-get install -y chromium` (scripts/setup_env.sh does it "
                    "when run as root)")
    run = fake_run(tmp_path / "run", fake_records(4, 2, seed=2), n=2)
    report.write_report([run], run)
    widths = chromium_image_widths(run / "report.html", tmp_path)
    assert len(widths) == len(read_page(run).images) >= 6
    assert all(w > 100 for w in widths), widths
