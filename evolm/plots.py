"""Figures of a run, from its files only: fitness, genes, loss matrix, lineage, Pareto fronts, importance.

Every ``plot_*`` function takes a ``RunRecords`` (``evolm.rundir.load_run``) and the output folder,
writes one PNG with matplotlib's Agg canvas (no pyplot, no global backend) and returns a ``Plot``:
the path and the data it drew, so tests and the report can read what is in a picture.
``plot_run`` writes all of them into ``RUN_DIR/plots/``.
"""
from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evolm.evolution import pareto_front
from evolm.genome import value_text
from evolm.importance import gene_kind, stage_importances
from evolm.lineage import ancestry, draw_lineage
from evolm.metrics import forgetting
from evolm.rundir import RunRecords, load_run

log = logging.getLogger(__name__)
DPI = 100


@dataclass
class Plot:
    path: Path
    data: dict


def plot_run(run: RunRecords | str | Path) -> dict[str, Plot]:
    """Write every figure the run's files allow into RUN_DIR/plots/; name -> Plot.
    Takes the run directory, or its records already read (the report reads them once)."""
    run = run if isinstance(run, RunRecords) else load_run(run)
    out = run.path / "plots"
    out.mkdir(exist_ok=True)
    plots = {"fitness": plot_fitness(run, out), "genes": plot_genes(run, out),
             "loss_matrix": plot_loss_matrix(run, out), "importance": plot_importance(run, out),
             "merge_strength": plot_merge_strength(run, out)}
    for stage in run.finished_stages():
        plots[f"lineage_stage{stage}"] = plot_lineage(run, stage, out)
        plots[f"pareto_stage{stage}"] = plot_pareto(run, stage, out)
    return {name: p for name, p in plots.items() if p is not None}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


# ----- generations on one axis ------------------------------------------------------------------
def generation_keys(run: RunRecords) -> list[tuple[int, int]]:
    """Every (stage, generation) the logs mention, in order: the global generation axis."""
    keys = {(g.stage, g.generation) for g in run.generations}
    keys |= {(e.stage, e.generation) for e in run.evaluations}
    return sorted(k for k in keys if all(isinstance(v, int) for v in k))


def fitness_series(run: RunRecords) -> dict:
    """best / median / worst of the first objective per generation (None where unknown), as people
    read it (a maximised one un-negated); a generation without a generations.jsonl line yet is
    ``partial``: its values come from the evaluations done so far."""
    keys, logged = generation_keys(run), {(g.stage, g.generation): g for g in run.generations}
    first = run.objectives()[0]
    series = {"x": list(range(len(keys))), "keys": keys, "objective": first, "best": [], "median": [],
              "worst": [], "partial": []}
    for key in keys:
        if key in logged:
            g = logged[key]
            stats = {"best": g.best, "median": g.median, "worst": g.worst}
        else:
            losses = sorted(v for e in run.evaluations if (e.stage, e.generation) == key
                            if (v := e.objective(first)) is not None)
            stats = ({"best": losses[0], "median": statistics.median(losses), "worst": losses[-1]} if losses
                     else {"best": None, "median": None, "worst": None})
        for s, v in stats.items():
            series[s].append(run.natural(first, v) if isinstance(v, (int, float)) else None)
        series["partial"].append(key not in logged)
    index = {k: i for i, k in enumerate(keys)}
    series["failed"] = [(index[(e.stage, e.generation)], e.genome_id, e.error)
                        for e in run.evaluated() if not e.ok and (e.stage, e.generation) in index]
    names, first = run.stage_names(), {}
    for i, (stage, _) in enumerate(keys):
        first.setdefault(stage, i)
    series["stages"] = [(i, stage, names.get(stage, str(stage))) for stage, i in first.items()]
    return series


def _mark_stages(ax, stages: list[tuple[int, int, str]], end: int) -> None:
    for n, (x0, stage, name) in enumerate(stages):
        x1 = stages[n + 1][0] if n + 1 < len(stages) else end
        if n:
            ax.axvline(x0 - 0.5, color="0.5", linestyle="--", linewidth=1)
        ax.text((x0 + x1 - 1) / 2, 1.01, f"stage {stage}: {name}", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=9)


def plot_fitness(run: RunRecords, out: Path) -> Plot:
    s = fitness_series(run)
    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    style = {"best": ("tab:green", "o"), "median": ("tab:blue", "s"), "worst": ("tab:orange", "^")}
    bounds = [x0 for x0, _, _ in s["stages"]] + [len(s["x"])]
    for name, (color, marker) in style.items():
        y = np.array([np.nan if v is None else v for v in s[name]], dtype=float)
        for a, b in zip(bounds, bounds[1:]):  # one line per stage: each stage starts from a new base
            ax.plot(s["x"][a:b], y[a:b], color=color, marker=marker, markersize=4, label=None if a else name)
        partial = [i for i, p in enumerate(s["partial"]) if p]
        if partial:
            ax.scatter(partial, y[partial], s=70, facecolors="none", edgecolors="k", zorder=3)
    if s["failed"]:
        xs = [f[0] for f in s["failed"]]
        ax.scatter(xs, [0.97] * len(xs), transform=ax.get_xaxis_transform(), marker="x", color="red",
                   s=40, label=f"failed ({len(xs)})", zorder=4)
    if any(s["partial"]):
        ax.scatter([], [], s=70, facecolors="none", edgecolors="k", label="partial generation")
    _mark_stages(ax, s["stages"], len(s["x"]))
    ax.set_xticks(s["x"], [str(g) for _, g in s["keys"]])
    ax.set_xlabel("generation (within stage)")
    ax.set_ylabel("validation loss" if s["objective"] == "val_loss" else _axis_label(run, s["objective"]))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.suptitle(f"{run.name}: fitness per generation", fontsize=11)
    fig.tight_layout()
    return Plot(_save(fig, out / "fitness.png"), s)


# ----- genes over generations -------------------------------------------------------------------
def _genomes_by_generation(run: RunRecords) -> tuple[list[tuple[int, int]], list[list[dict]]]:
    """The values of the genomes of each generation: its population when logged, else those
    evaluated so far."""
    values = {}
    for e in run.evaluations:
        if isinstance(e.values, dict):
            values.setdefault(e.genome_id, e.values)
    logged = {(g.stage, g.generation): g.population or [] for g in run.generations}
    keys, groups = generation_keys(run), []
    for key in keys:
        if key in logged:
            groups.append([values[i] for i in logged[key] if i in values])
        else:
            groups.append([e.values for e in run.evaluations
                           if (e.stage, e.generation) == key and isinstance(e.values, dict)])
    return keys, groups


def gene_series(run: RunRecords) -> dict[str, dict]:
    """Per gene: ``kind`` (numeric / categorical / mask) and what its panel shows per generation."""
    keys, groups = _genomes_by_generation(run)
    space = (run.config.get("search") or {}).get("space") or {}
    genes = list(space) + sorted({g for grp in groups for v in grp for g in v} - set(space))
    out = {}
    for gene in genes:
        seen = [[v[gene] for v in grp if gene in v] for grp in groups]
        flat = [v for grp in seen for v in grp]
        if not flat:
            continue
        spec = space.get(gene) or {}
        kind = gene_kind(spec, flat)
        entry = {"kind": kind, "x": list(range(len(keys))), "log": spec.get("type") == "log_uniform"}
        if kind == "numeric":
            entry["values"] = seen
        elif kind == "mask":
            n = max(len(v) for v in flat)
            entry["shares"] = [[(sum(1 for v in grp if i < len(v) and v[i]) / len(grp)) if grp else 0.0
                                for i in range(n)] for grp in seen]
        else:
            cats = sorted({json.dumps(v) for v in flat}, key=lambda c: (len(c), c))
            entry["categories"] = [value_text(json.loads(c)) for c in cats]
            entry["shares"] = [[(sum(1 for v in grp if json.dumps(v) == c) / len(grp)) if grp else 0.0
                                for c in cats] for grp in seen]
        out[gene] = entry
    return out


def plot_genes(run: RunRecords, out: Path) -> Plot | None:
    series = gene_series(run)
    if not series:
        return None
    cols = 3
    rows = -(-len(series) // cols)
    keys = generation_keys(run)
    boundaries = [i for i in range(1, len(keys)) if keys[i][0] != keys[i - 1][0]]
    fig = Figure(figsize=(4 * cols, 2.6 * rows))
    for n, (gene, s) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, n + 1)
        if s["kind"] == "numeric":
            for x, vals in zip(s["x"], s["values"]):
                jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else [0.0]
                ax.scatter(x + np.asarray(jitter), vals, s=10, alpha=0.7, color="tab:blue")
            if s["log"]:
                ax.set_yscale("log")
        elif s["kind"] == "mask":
            shares = np.array(s["shares"], dtype=float).T  # blocks x generations
            image = ax.imshow(shares, aspect="auto", cmap="Blues", vmin=0, vmax=1, origin="lower")
            ax.set_ylabel("block", fontsize=8)
            ax.set_yticks(range(shares.shape[0]))
            fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, label="share on")
        else:
            shares = np.array(s["shares"], dtype=float)
            bottom = np.zeros(len(s["x"]))
            for c, label in enumerate(s["categories"]):
                ax.bar(s["x"], shares[:, c], bottom=bottom, width=0.9, label=label)
                bottom += shares[:, c]
            ax.set_ylim(0, 1)
            ax.legend(fontsize=6, loc="upper left", framealpha=0.6)
        for x in boundaries:
            ax.axvline(x - 0.5, color="0.4", linestyle="--", linewidth=0.8)
        ax.set_title(gene, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{run.name}: genes of each generation's population "
                 f"(x: generation across stages; dashed: a new stage)", fontsize=10)
    fig.tight_layout()
    return Plot(_save(fig, out / "genes.png"), series)


# ----- loss matrix ------------------------------------------------------------------------------
def plot_loss_matrix(run: RunRecords, out: Path) -> Plot | None:
    lm = run.loss_matrix
    if lm is None:
        return None
    cells = np.array(lm["matrix"], dtype=float)
    learned_at = run.learned_at()
    forget = forgetting(lm["matrix"], learned_at)
    fig = Figure(figsize=(1.6 * len(lm["columns"]) + 2.5, 0.7 * len(lm["rows"]) + 2))
    ax = fig.add_subplot()
    image = ax.imshow(cells, cmap="viridis_r", aspect="auto")
    mid = np.nanmean(cells)
    for i in range(cells.shape[0]):
        for j in range(cells.shape[1]):
            learned = i > 0 and learned_at[j] == i
            ax.text(j, i, f"{cells[i, j]:.3f}", ha="center", va="center", fontsize=9,
                    color="white" if cells[i, j] > mid else "black", fontweight="bold" if learned else "normal")
    ax.set_xticks(range(len(lm["columns"])),
                  [f"{c}\nforgetting {'n/a' if f is None else f'{f:+.3f}'}" for c, f in zip(lm["columns"], forget)],
                  fontsize=8)
    ax.set_yticks(range(len(lm["rows"])), [f"after {r}" if i else r for i, r in enumerate(lm["rows"])], fontsize=8)
    ax.set_xlabel(f"loss on each domain's {lm.get('split', 'test')} split")
    fig.colorbar(image, ax=ax, label="loss")
    fig.suptitle(f"{run.name}: loss matrix (bold: the stage that learned the column)", fontsize=10)
    fig.tight_layout()
    data = {"rows": lm["rows"], "columns": lm["columns"], "cells": cells.tolist(), "forgetting": forget,
            "learned_at": learned_at}
    return Plot(_save(fig, out / "loss_matrix.png"), data)


# ----- lineage, Pareto front, importance --------------------------------------------------------
def plot_lineage(run: RunRecords, stage: int, out: Path) -> Plot | None:
    winner = run.finished_stages().get(stage)
    if winner is None:
        return None
    graph = ancestry(run.evaluations, winner)
    fig = draw_lineage(graph, f"{run.name} stage {stage} ({run.stage_names().get(stage, '')}): "
                              f"ancestry of winner {winner}")
    return Plot(_save(fig, out / f"lineage_stage{stage}.png"), graph)


def plot_pareto(run: RunRecords, stage: int, out: Path) -> Plot | None:
    """Only for runs that search two or more objectives (the first two are drawn)."""
    names = run.objectives()[:2]
    if len(names) < 2:
        return None
    points = [(x, y) for e in run.evaluated() if e.stage == stage
              if (x := e.objective(names[0])) is not None and (y := e.objective(names[1])) is not None]
    if not points:
        return None
    front = pareto_front(points)  # on the stored values: every objective minimised
    shown = [(run.natural(names[0], x), run.natural(names[1], y)) for x, y in points]  # as people read them
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    ax.scatter(*zip(*shown), s=18, color="0.6", label="evaluations")
    fx = sorted(shown[i] for i in front)
    ax.plot(*zip(*fx), color="tab:red", marker="o", label="Pareto front")
    ax.set_xlabel(_axis_label(run, names[0]))
    ax.set_ylabel(_axis_label(run, names[1]))
    ax.legend(fontsize=8)
    fig.suptitle(f"{run.name} stage {stage}: objectives", fontsize=10)
    fig.tight_layout()
    return Plot(_save(fig, out / f"pareto_stage{stage}.png"),
                {"objectives": names, "points": points, "shown": shown, "front": front})


def _axis_label(run: RunRecords, name: str) -> str:
    return f"{name} ({'higher' if run.direction(name) == 'maximize' else 'lower'} is better)"


def plot_importance(run: RunRecords, out: Path) -> Plot | None:
    """Per stage, each gene's share of the val_loss variance: over all evaluations, and (where each has
    enough) over fresh and over inherited ones apart."""
    space = (run.config.get("search") or {}).get("space") or {}
    evaluated = run.evaluated()
    shares = stage_importances(evaluated, space)
    if not shares:
        return None
    apart = {start: stage_importances(evaluated, space, start) for start in ("fresh", "inherited")}
    names = run.stage_names()
    fig = Figure(figsize=(3.6 * len(shares) + 1, 0.45 * max(len(s) for s in shares.values()) + 1.8))
    series = [("all", "tab:purple"), ("fresh", "tab:blue"), ("inherited", "tab:orange")]
    for n, (stage, imp) in enumerate(shares.items()):
        ax = fig.add_subplot(1, len(shares), n + 1)
        genes = list(imp)[::-1]
        drawn = [(label, color, imp if label == "all" else apart[label].get(stage)) for label, color in series]
        drawn = [d for d in drawn if d[2]]
        height = 0.8 / len(drawn)
        for i, (label, color, values) in enumerate(drawn):
            ax.barh(np.arange(len(genes)) + (i - (len(drawn) - 1) / 2) * height, [values.get(g, 0.0) for g in genes],
                    height=height, color=color, label=label)
        ax.set_yticks(np.arange(len(genes)), genes)
        ax.set_xlim(0, 1)
        ax.set_title(f"stage {stage}: {names.get(stage, '')}", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("share of val_loss variance", fontsize=8)
        if len(drawn) > 1:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{run.name}: gene importance (all, fresh and inherited evaluations)", fontsize=10)
    fig.tight_layout()
    return Plot(_save(fig, out / "importance.png"), {"all": shares} | apart)


def plot_merge_strength(run: RunRecords, out: Path) -> Plot | None:
    """Each stage's merge-strength curve: this stage's val_loss against forgetting of earlier domains (or the
    strength, where nothing earlier is retained), one line per merge method; the choice starred."""
    curves = {s.stage: s.merge_curve for s in run.summaries if len(s.merge_curve or []) > 1}
    if not curves:
        return None
    names = run.stage_names()
    fig = Figure(figsize=(4.2 * len(curves) + 0.5, 4))
    for n, (stage, points) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), n + 1)
        retained = all(p.get("forgetting") is not None for p in points)
        def label(p):
            return " ".join([p["method"]] + list(p.get("genomes") or [])[:1])

        for name in dict.fromkeys(label(p) for p in points):
            line = sorted((p for p in points if label(p) == name), key=lambda p: p["strength"])
            xs = [p["val_loss"] for p in line]
            ys = [p["forgetting"] if retained else p["strength"] for p in line]
            ax.plot(xs, ys, marker="o", ms=4, label=name)
            for p, x, y in zip(line, xs, ys):
                ax.annotate(f"{p['strength']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for p in points:
            y = p["forgetting"] if retained else p["strength"]
            if p.get("chosen"):
                ax.scatter([p["val_loss"]], [y], marker="*", s=180, color="tab:red", zorder=3, label="chosen")
        ax.set_xlabel(f"val_loss on '{names.get(stage, stage)}'", fontsize=8)
        ax.set_ylabel("forgetting of earlier domains (nats)" if retained else "strength", fontsize=8)
        ax.set_title(f"stage {stage}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"{run.name}: merge strength (labels: s in base + s·(merged − base))", fontsize=10)
    fig.tight_layout()
    return Plot(_save(fig, out / "merge_strength.png"), curves)
