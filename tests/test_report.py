"""report.html of a real tiny run: content, escaping, embedded images, and a real browser's view."""
import base64
import html
import io
import json
import re
import shutil
import subprocess

import pytest
import yaml
from PIL import Image

from evolm.jsonfiles import append_jsonl, read_jsonl
from evolm.records import EvaluationRecord, read_records, trained_evaluations
from evolm.report import time_accounting, write_report
from evolm.rundir import load_run
from evolm.status import format_status, run_status
from tests.tiny_runs import PROMPTS, crashed_copy, make_tiny_run

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def run_dir(corpora, tmp_path_factory):
    return make_tiny_run(corpora, tmp_path_factory.mktemp("report") / "tiny")


@pytest.fixture(scope="module")
def page(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_names_every_stage_and_winner(run_dir, page):
    summary = json.loads((run_dir / "summary.json").read_text())
    for stage in summary["stages"]:
        assert f"stage {stage['stage']}: {stage['name']}" in page
        assert stage["winner"]["id"] in page
        assert f"{stage['start_loss']:.4f} → {stage['end_loss']:.4f}" in page
    for heading in ("Stages", "Figures", "Loss matrix", "Best genomes", "Failed evaluations", "Generation samples",
                    "Time"):
        assert f"<h2>{heading}" in page
    assert "Backward transfer BWT" in page and "ppl" in page and "seed" in page


def test_images_are_embedded_pngs_and_nothing_is_fetched(page):
    images = DATA_URI.findall(page)
    assert len(images) == 9  # fitness, genes, loss matrix, importance, merge strength, two lineages, two Pareto fronts
    for data in images:
        raw = base64.b64decode(data)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(raw)) as image:
            image.verify()
    assert not re.search(r'(src|href)="(https?:|//)', page) and "<link" not in page and "<script" not in page


def test_samples_side_by_side_for_every_stage(run_dir, page):
    section = page[page.index("<h2>Generation samples"):page.index("<h2>Time")]
    assert "base (stage 0)" in section and "stage 1: code" in section and "stage 2: qa" in section
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert {s["stage"] for s in samples} == {0, 1, 2}
    for s in samples:
        assert f"<pre><b>{html.escape(s['prompt'])}</b>{html.escape(s['text'])}</pre>" in section
    assert section.count("<tr>") == 1 + len(PROMPTS)


def test_time_accounting_adds_up(run_dir):
    acc = time_accounting(load_run(run_dir))
    evals = trained_evaluations(read_records(EvaluationRecord, read_jsonl(run_dir / "evaluations.jsonl")))
    assert acc["workers"] == 1  # LocalExecutor: one worker seen, though the config asks for two
    assert acc["total"]["train"] == pytest.approx(sum(e.train_seconds for e in evals))
    assert acc["total"]["evaluation"] == pytest.approx(sum(e.seconds for e in evals))
    for stage in acc["stages"].values():
        assert 0 < stage["utilisation"] <= 1.0 and stage["wall"] >= stage["search_wall"]


def test_an_evaluation_counts_once_whatever_its_cached_flag_says():
    first = {"stage": 1, "genome_id": "a", "result_of": "a", "cached": False}
    records = read_records(EvaluationRecord, [
        first, first | {"generation": 2}, {"stage": 1, "genome_id": "b", "result_of": "a", "cached": True},
        {"stage": 2, "genome_id": "a", "result_of": "a", "cached": False}, {"stage": 1, "genome_id": "c"}])
    assert trained_evaluations(records) == [records[0], records[3], records[4]]


def test_the_search_row_says_how_the_search_ran(run_dir, page, tmp_path):
    row = re.search(r"<tr><td>search</td><td>([^<]*)</td></tr>", page).group(1)
    assert "mode=generational" in row and "inherit_weights=True" in row and "halving" not in row
    assert "step_budget" not in row  # unset budgets are not shown
    copy = tmp_path / "steady"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("plots", "report.html"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["search"].update(mode="steady_state", halving={"rungs": 3, "reduction_factor": 3}, step_budget=900)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    row = re.search(r"<tr><td>search</td><td>([^<]*)</td></tr>", write_report(copy).read_text()).group(1)
    assert "mode=steady_state" in row and "halving=3 rungs, factor 3" in row and "step_budget=900" in row


def test_text_from_files_is_escaped(run_dir, tmp_path):
    copy = tmp_path / "hostile"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("plots", "report.html"))
    record = read_jsonl(copy / "evaluations.jsonl")[-1] | {
        "status": "failed", "objectives": None, "cached": False, "genome_id": "evil0001", "result_of": "evil0001",
        "error": "<script>alert('x')</script>", "traceback": "Traceback <b>here</b>"}
    append_jsonl(copy / "evaluations.jsonl", record)
    append_jsonl(copy / "samples.jsonl", {"stage": 1, "stage_name": "code", "prompt": "<img src=x>", "text": "&"})
    page = write_report(copy).read_text()
    assert "<script>" not in page and "<img src=x>" not in page and "<b>here</b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "evil0001" in page
    assert "Failed evaluations (1)" in page


def test_report_of_a_crashed_run(run_dir, tmp_path):
    page = write_report(crashed_copy(run_dir, tmp_path / "crashed")).read_text()
    assert "not finished" in page and "not merged" in page
    assert len(DATA_URI.findall(page)) == 6  # no lineage, no Pareto front for the stage that never merged


def report_count(page: str) -> int:
    """The report's evaluation count: the "evaluations" row of its experiment table."""
    return int(re.search(r"<tr><td>evaluations</td><td>(\d+) \(\d+ failed\)</td></tr>", page).group(1))


def test_status_counts_the_evaluations_the_report_counts(run_dir, page, tmp_path):
    """One definition of an evaluation: status's "evaluated" is the report's count, finished or crashed."""
    status = run_status(run_dir)
    assert status["state"] == "finished" and status["evaluations_done"] == report_count(page) > 0
    assert status["evaluations_planned"] == status["evaluations_done"]  # finished: what it did is the plan
    assert status["estimated_seconds_left"] is None
    assert f"evaluated  {report_count(page)} (0 failed" in format_status(status)
    crashed = crashed_copy(run_dir, tmp_path / "crashed")
    crashed_status = run_status(crashed)
    crashed_page = write_report(crashed).read_text()
    assert crashed_status["state"] != "finished"  # "running": run.json names this test's process
    assert crashed_status["evaluations_done"] == report_count(crashed_page) <= status["evaluations_done"]
    # not finished: the upper bound, population + generations x offspring per stage
    assert crashed_status["evaluations_planned"] == 2 * (3 + 1 * 3)
    assert (f"evaluated  {crashed_status['evaluations_done']} of at most 12 planned"
            in format_status(crashed_status))
    assert crashed_status["estimated_seconds_left"] > 0


def test_a_run_with_stages_appended_is_not_finished_until_every_stage_is_summarised(run_dir, tmp_path):
    grown = tmp_path / "grown"
    shutil.copytree(run_dir, grown, ignore=shutil.ignore_patterns("plots", "report.html"))
    experiment = json.loads((grown / "experiment.json").read_text())
    experiment["stages"].append(dict(experiment["stages"][-1], name="more"))
    (grown / "experiment.json").write_text(json.dumps(experiment))  # as `resume --experiment` leaves it mid-way
    run = load_run(grown)
    assert len(run.summaries) == 2 and run.configured_stages == 3 and not run.finished
    assert run_status(grown)["state"] != "finished" and load_run(run_dir).finished


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (apt-get install chromium); "
                    ".ci/run installs it")
def test_every_image_loads_in_headless_chromium(run_dir, page, tmp_path):
    marker = ('<script>window.addEventListener("load", () => {for (const i of document.images) '
              '{i.setAttribute("data-natural-width", i.naturalWidth)} '
              'document.body.setAttribute("data-images", document.images.length)})</script></body>')
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", marker), encoding="utf-8")
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                           "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120)
    dom = done.stdout
    assert 'data-images="9"' in dom, done.stderr[-2000:]
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == 9 and all(w > 0 for w in widths)
