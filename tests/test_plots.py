"""Figures of a real tiny run: what each picture holds, on a finished and on a crashed run."""
import json

import pytest
from PIL import Image

from evolm.jsonfiles import read_jsonl
from evolm.cli import main
from evolm.evolution import pareto_front
from evolm.lineage import ancestry, operator_label
from evolm.plots import plot_pareto, plot_run
from evolm.rundir import load_run
from tests.tiny_runs import crashed_copy, make_tiny_run


@pytest.fixture(scope="module")
def run_dir(corpora, tmp_path_factory):
    return make_tiny_run(corpora, tmp_path_factory.mktemp("plots") / "tiny")


@pytest.fixture(scope="module")
def plots(run_dir):
    return plot_run(run_dir)


def test_every_figure_is_a_png_in_plots(run_dir, plots):
    assert set(plots) == {"fitness", "genes", "loss_matrix", "importance", "merge_strength", "lineage_stage1",
                          "lineage_stage2", "pareto_stage1", "pareto_stage2"}  # two objectives by default
    for name, plot in plots.items():
        assert plot.path == run_dir / "plots" / f"{name}.png"
        with Image.open(plot.path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 150


def test_fitness_has_one_point_per_generation_per_series(run_dir, plots):
    gens = read_jsonl(run_dir / "generations.jsonl")
    data = plots["fitness"].data
    assert data["keys"] == [(g["stage"], g["generation"]) for g in gens] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for series in ("best", "median", "worst"):
        assert data[series] == [g[series] for g in gens]
    assert data["partial"] == [False] * 4 and data["failed"] == []
    assert [(x, stage) for x, stage, _ in data["stages"]] == [(0, 1), (2, 2)]


def test_loss_matrix_heatmap_has_a_cell_per_row_and_column(run_dir, plots):
    lm = json.loads((run_dir / "loss_matrix.json").read_text())
    data = plots["loss_matrix"].data
    assert data["cells"] == lm["matrix"] and len(data["cells"]) == len(lm["rows"]) == 3
    assert all(len(row) == len(lm["columns"]) == 3 for row in data["cells"])
    m = lm["matrix"]  # columns: general (the base's), code (stage 1), qa (stage 2)
    assert data["learned_at"] == [0, 1, 2]
    assert data["forgetting"][1] == pytest.approx(m[2][1] - min(m[1][1], m[2][1]))
    assert data["forgetting"][2] == 0


def test_genes_panel_per_gene_with_the_right_kind(run_dir, plots):
    data = plots["genes"].data
    space = load_run(run_dir).config["search"]["space"]
    assert set(data) == set(space)
    assert data["layers"]["kind"] == "mask" and data["max_steps"]["kind"] == "numeric"
    assert data["r"]["kind"] == "categorical" and data["learning_rate"]["log"]
    for shares in data["r"]["shares"]:
        assert sum(shares) == pytest.approx(1.0)
    gens = read_jsonl(run_dir / "generations.jsonl")
    assert [len(v) for v in data["max_steps"]["values"]] == [len(g["population"]) for g in gens]


def test_lineage_reaches_the_first_ancestors_with_operators(run_dir, plots):
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = read_jsonl(run_dir / "evaluations.jsonl")
    for stage in summary["stages"]:
        graph = plots[f"lineage_stage{stage['stage']}"].data
        assert graph["root"] == stage["winner"]["id"] and graph["root"] in graph["nodes"]
        for parent, child, op in graph["edges"]:
            assert parent in graph["nodes"] and child in graph["nodes"] and op
        roots = [g for g in graph["nodes"] if not any(e[1] == g for e in graph["edges"])]
        assert all(next(e for e in evals if e["genome_id"] == g)["parents"] == [] for g in roots)


def test_lineage_of_a_made_up_family():
    evals = [{"genome_id": "a", "stage": 1, "generation": 0, "parents": [], "ops": ["random"], "status": "ok",
              "objectives": {"val_loss": 3.0}},
             {"genome_id": "b", "stage": 1, "generation": 0, "parents": [], "ops": ["random"], "status": "failed"},
             {"genome_id": "c", "stage": 1, "generation": 1, "parents": ["a", "b"], "ops": ["cx_uniform(a, b)"],
              "status": "ok", "objectives": {"val_loss": 2.0}},
             {"genome_id": "d", "stage": 1, "generation": 2, "parents": ["c"], "ops": ["mut(r 4 -> 8)"],
              "status": "ok", "objectives": {"val_loss": 1.0}}]
    graph = ancestry(evals, "d")
    assert set(graph["nodes"]) == {"a", "b", "c", "d"}
    assert sorted(graph["edges"]) == [["a", "c", "cx_uniform"], ["b", "c", "cx_uniform"], ["c", "d", "r 4 -> 8"]]
    assert graph["nodes"]["b"]["val_loss"] is None and graph["nodes"]["a"]["generation"] == 0
    assert ancestry(evals, "d", max_nodes=2)["truncated"]
    assert operator_label(["mut(" + "x" * 80 + ")"]).endswith("…")


def test_pareto_only_with_two_objectives(run_dir, tmp_path):
    run = load_run(run_dir)
    run.config["search"]["objectives"] = ["val_loss"]  # as a one-objective run says
    assert plot_pareto(run, 1, tmp_path) is None
    run.config["search"]["objectives"] = ["val_loss", "adapter_params"]
    plot = plot_pareto(run, 1, tmp_path)
    assert plot.path.name == "pareto_stage1.png" and plot.data["objectives"] == ["val_loss", "adapter_params"]
    assert plot.data["front"] == pareto_front(plot.data["points"])
    assert pareto_front([(1, 5), (2, 2), (3, 3), (5, 1)]) == [0, 1, 3]


def test_plot_a_crashed_run_shows_its_partial_generation(run_dir, tmp_path, capsys):
    crashed = crashed_copy(run_dir, tmp_path / "crashed")
    assert main(["plot", str(crashed)]) == 0
    printed = capsys.readouterr().out.split()
    assert {str(crashed / "plots" / f"{n}.png") for n in ("fitness", "lineage_stage1")} <= set(printed)
    assert not (crashed / "plots" / "lineage_stage2.png").exists()  # stage 2 never merged
    plots = plot_run(crashed)
    fitness = plots["fitness"].data
    assert fitness["keys"] == [(1, 0), (1, 1), (2, 0), (2, 1)] and fitness["partial"] == [False, False, False, True]
    assert fitness["best"][3] is not None  # from the one evaluation logged before the crash
    assert len(plots["loss_matrix"].data["cells"]) == 2
    assert plots["loss_matrix"].data["forgetting"][2] is None  # stage 2 not learned yet


def test_merge_strength_figure_has_every_scored_point(run_dir, plots):
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    data = plots["merge_strength"].data
    assert set(data) == {s["stage"] for s in summary}
    for s in summary:
        assert data[s["stage"]] == s["merge_curve"] and sum(p["chosen"] for p in s["merge_curve"]) == 1
