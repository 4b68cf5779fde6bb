"""One self-contained HTML page about a run: ``evolm report RUN_DIR`` -> RUN_DIR/report.html.

Built from the run's files only (see ``evolm.rundir``): the experiment, the stages and their
winners, every figure of ``evolm.plots`` (embedded as base64 PNG), the loss matrix with forgetting,
backward transfer and perplexity, the best genomes, the failures, the generation samples and where
the time went. No network, no external CSS or JavaScript; everything read from files is escaped.
"""
from __future__ import annotations

import base64
import html
import math
from datetime import datetime
from pathlib import Path

from evolm.jsonfiles import write_atomic
from evolm.genome import genome_text
from evolm.plots import plot_run
from evolm.metrics import backward_transfer, forgetting, perplexity
from evolm.records import utilisation
from evolm.rundir import RunRecords, load_run

TOP_GENOMES = 5
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1150px;color:#222;
  padding:0 1em;line-height:1.4}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:.25em .5em;
  text-align:left;vertical-align:top} th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.learned{font-weight:bold;background:#eef6ee}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
pre{white-space:pre-wrap;margin:0} img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.muted{color:#777} .bad{color:#b00} figure{margin:1em 0} figcaption{color:#555;font-size:.9em}
"""


def write_report(run_dir: str | Path) -> Path:
    """(Re)draw the plots and write RUN_DIR/report.html; returns its path."""
    run = load_run(run_dir)
    plots = plot_run(run)
    sections = [_experiment(run), _stages(run), _figures(run, plots), _loss_matrix(run), _top_genomes(run),
                _failures(run), _samples(run), _time(run)]
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>evolm report: {_e(run.name)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(s for s in sections if s) + "\n</body></html>\n")
    path = run.path / "report.html"
    write_atomic(path, page)
    return path


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(x, digits: int = 4) -> str:
    return "n/a" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """``rows`` hold HTML cells (already escaped, ``<td>`` included)."""
    head = f"<tr>{''.join(f'<th>{_e(h)}</th>' for h in header)}</tr>" if header else ""
    return f"<table>{head}" + "".join(f"<tr>{''.join(r)}</tr>" for r in rows) + "</table>"


def _td(value, cls: str = "") -> str:
    return f"<td class=\"{cls}\">{_e(value)}</td>" if cls else f"<td>{_e(value)}</td>"


# ----- sections ---------------------------------------------------------------------------------
def _experiment(run: RunRecords) -> str:
    cfg, search, evaluated = run.config, run.config.get("search") or {}, run.evaluated()
    state = ("finished" if run.finished else
             "<span class=\"bad\">not finished</span> (summary.json lacks a stage: running, stopped or crashed)")
    stages = ", ".join(f"{k} {_e(n)}" for k, n in run.stage_names().items())
    model = cfg.get("model") or {}
    built = " ".join(f"{k}={v}" for k, v in (model.get("build") or {}).items())
    model_text = model.get("name_or_path") or f"built: {built}"
    if isinstance(pre := model.get("pretrain"), dict):
        model_text += f"; pretrained on '{pre.get('name')}' for {pre.get('max_steps')} steps"
    keys = ("mode", "population_size", "offspring_size", "generations", "tournament_size", "elitism",
            "crossover_prob", "mutation_prob", "immigrant_share", "inherit_weights", "scheduler", "step_budget",
            "time_budget", "run_time_budget")
    settings = [f"{k}={search[k]}" for k in keys if search.get(k) is not None]
    halving = search.get("halving")
    if isinstance(halving, dict) and (halving.get("rungs") or 1) > 1:
        factor = halving.get("reduction_factor")
        settings.append(f"halving={halving['rungs']} rungs, factor {factor:g}" if isinstance(factor, (int, float))
                        else f"halving={halving['rungs']} rungs")
    rows = [[_td("experiment"), _td(cfg.get("name", "?"))], [_td("run"), _td(run.name)],
            [_td("seed"), _td(cfg.get("seed", "?"))], [_td("model"), _td(model_text)],
            [_td("stages"), f"<td>{stages}</td>"],
            [_td("search"), _td(", ".join(settings))],
            [_td("search space"), _td(", ".join((search.get("space") or {}).keys()))],
            [_td("workers"), _td(run.workers())], [_td("state"), f"<td>{state}</td>"],
            [_td("evaluations"), _td(f"{len(evaluated)} ({sum(1 for e in evaluated if not e.ok)} failed)")]]
    return (f"<h1>evolm run {_e(run.name)}</h1><p class=\"muted\">report written "
            f"{datetime.now():%Y-%m-%d %H:%M} from {_e(run.path)}</p>" + _table([], rows))


def _other_objectives(run: RunRecords) -> list[str]:
    """The searched objectives besides val_loss (which has its own column), with their headers."""
    return [n for n in run.objectives() if n != "val_loss"]


def _objective_header(run: RunRecords, name: str) -> str:
    return f"{name} ({'higher' if run.direction(name) == 'maximize' else 'lower'} is better)"


def _stages(run: RunRecords) -> str:
    rows, evaluated, others = [], run.evaluated(), _other_objectives(run)
    for k, name in run.stage_names().items():
        s = run.summary_of(k)
        evals = [e for e in evaluated if e.stage == k]
        if s:
            rows.append([_td(k), _td(name), _td(f"{_num(s.start_loss)} → {_num(s.end_loss)}", "num"),
                         f"<td><code>{_e(s.winner_id or '?')}</code></td>", _td(_num(s.winner_val_loss), "num")]
                        + [_td(_num(run.natural(o, (s.winner_objectives or {}).get(o))), "num") for o in others]
                        + [f"<td><code>{_e(genome_text(s.winner.get('values')))}</code></td>",
                           _td(len(evals), "num"), _td(f"{s.seconds or 0:.0f} s", "num")])
        else:
            gens = [g for g in run.generations if g.stage == k]
            seconds = sum(g.seconds or 0 for g in gens)
            rows.append([_td(k), _td(name), _td("not merged", "muted"), _td(""), _td("")] + [_td("") for _ in others]
                        + [_td(f"{len(gens)} generation(s) logged"), _td(len(evals), "num"),
                           _td(f"{seconds:.0f} s", "num")])
    header = (["stage", "name", "test loss start → end", "winner", "val_loss"]
              + [_objective_header(run, o) for o in others] + ["winner genome", "evaluations", "time"])
    return "<h2>Stages</h2>" + _table(header, rows)


def _figures(run: RunRecords, plots: dict) -> str:
    captions = {"fitness": "Best / median / worst first objective of each generation's population; "
                           "red x: failed evaluations; hollow circles: a generation still in progress.",
                "genes": "Gene values of each generation's population: numeric genes as points, categorical "
                         "genes as shares, layer masks as the share of genomes adapting each block.",
                "importance": "Share of the validation-loss variance each gene explains, per stage: over all "
                              "evaluations, and over fresh (a new adapter) and inherited (started from a "
                              "parent's adapter) ones apart, where each has enough.",
                "loss_matrix": "Test loss of the model after each stage (rows) on every domain (columns)."}
    out = ["<h2>Figures</h2>"]
    for name, plot in plots.items():
        caption = captions.get(name) or ("Ancestry of the stage winner: parents, generations and the operators "
                                         "that made each child." if name.startswith("lineage") else
                                         "Objectives of the stage's evaluations and their Pareto front.")
        data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
        out.append(f"<figure><img alt=\"{_e(name)}\" src=\"data:image/png;base64,{data}\">"
                   f"<figcaption><b>{_e(plot.path.name)}</b>: {_e(caption)}</figcaption></figure>")
    return "\n".join(out)


def _loss_matrix(run: RunRecords) -> str:
    lm = run.loss_matrix
    if lm is None:
        return "<h2>Loss matrix</h2><p class=\"muted\">no loss_matrix.json yet</p>"
    learned_at = run.learned_at()
    forget = forgetting(lm["matrix"], learned_at)
    rows = []
    for i, (name, losses) in enumerate(zip(lm["rows"], lm["matrix"])):
        cells = [_td(f"after {name}" if i else name)]
        for j, loss in enumerate(losses):
            cls = "num learned" if i and learned_at[j] == i else "num"
            cells.append(_td(f"{_num(loss)} (ppl {_num(perplexity(loss), 1)})", cls))
        rows.append(cells)
    rows.append([_td("forgetting")] + [_td("n/a" if f is None else f"{f:+.4f}", "num") for f in forget])
    bwt = backward_transfer(lm["matrix"], [k or None for k in learned_at])  # stage columns only
    final = lm["matrix"][-1]
    note = (f"<p>Backward transfer BWT = mean over stages j &lt; n of (L[j][j] − L[n][j]) = "
            f"<b>{'n/a (needs two merged stages)' if bwt is None else f'{bwt:+.4f}'}</b> (negative: forgetting). "
            f"Average final loss: <b>{_num(sum(final) / len(final))}</b>. Forgetting of a domain: final loss minus "
            f"its lowest loss since it was learned. Bold: the stage that learned the column. ppl = exp(loss).</p>")
    return (f"<h2>Loss matrix ({_e(lm.get('split', 'test'))} split)</h2>"
            + _table(["after \\ on", *lm["columns"]], rows) + note + _accuracy_matrix(lm, learned_at))


def _accuracy_matrix(lm: dict, learned_at: list) -> str:
    """A classifier's test accuracy after each stage on every domain (``loss_matrix.json``'s ``accuracy``)."""
    acc = lm.get("accuracy")
    width = len(lm["columns"])
    if not (isinstance(acc, list) and acc and all(isinstance(r, list) and len(r) == width
                                                  and all(isinstance(a, (int, float)) for a in r) for r in acc)):
        return ""
    rows = [[_td(f"after {name}" if i else name)]
            + [_td(f"{a:.3f}", "num learned" if i and learned_at[j] == i else "num") for j, a in enumerate(r)]
            for i, (name, r) in enumerate(zip(lm["rows"], acc))]
    final = acc[-1]
    return ("<h3>Accuracy</h3>" + _table(["after \\ on", *lm["columns"]], rows)
            + f"<p>Average final accuracy: <b>{sum(final) / len(final):.3f}</b> (higher is better).</p>")


def _top_genomes(run: RunRecords) -> str:
    out = ["<h2>Best genomes of each stage</h2>"]
    for k, name in run.stage_names().items():
        seen, best = set(), []
        for e in sorted((e for e in run.evaluations if e.stage == k and e.val_loss is not None),
                        key=lambda e: e.val_loss):
            key = genome_text(e.values)
            if key not in seen:
                seen.add(key)
                best.append(e)
        others = _other_objectives(run)
        rows = [[f"<td><code>{_e(e.genome_id)}</code></td>", _td(e.generation, "num"), _td(_num(e.val_loss), "num")]
                + [_td(_num(run.natural(o, e.objective(o))), "num") for o in others]
                + [f"<td><code>{_e(genome_text(e.values))}</code></td>",
                   _td("; ".join(e.ops or [])), _td(f"{e.seconds or 0:.1f} s", "num")]
                for e in best[:TOP_GENOMES]]
        if rows:
            out.append(f"<h3>Stage {k}: {_e(name)}</h3>"
                       + _table(["genome", "gen", "val_loss"] + [_objective_header(run, o) for o in others]
                                + ["values", "made by", "time"], rows))
    return "\n".join(out)


def _failures(run: RunRecords) -> str:
    failed = [e for e in run.evaluated() if not e.ok]
    if not failed:
        return "<h2>Failed evaluations</h2><p>none</p>"
    rows = [[_td(e.stage), _td(e.generation, "num"), f"<td><code>{_e(e.genome_id)}</code></td>",
             f"<td><code>{_e(genome_text(e.values))}</code></td>",
             f"<td class=\"bad\">{_e(e.error)}" + (f"<details><summary>traceback</summary><pre>"
                                                   f"{_e(e.traceback)}</pre></details>" if e.traceback else "")
             + "</td>"]
            for e in failed]
    return (f"<h2>Failed evaluations ({len(failed)})</h2><p>Each got the worst fitness; the run went on.</p>"
            + _table(["stage", "gen", "genome", "values", "error"], rows))


def _samples(run: RunRecords) -> str:
    if not run.samples:
        return ("<h2>Generation samples</h2><p class=\"muted\">no samples.jsonl (set <code>prompts:</code> "
                "in the experiment to sample the model after every stage)</p>")
    stages = sorted({s.get("stage") for s in run.samples if isinstance(s.get("stage"), int)})
    names = {s["stage"]: s.get("stage_name", "") for s in run.samples if isinstance(s.get("stage"), int)}
    prompts = list(dict.fromkeys(s.get("prompt", "") for s in run.samples))
    text = {(s.get("stage"), s.get("prompt", "")): s.get("text", "") for s in run.samples}
    rows = [[f"<td><pre>{_e(p)}</pre></td>"] +
            [f"<td><pre><b>{_e(p)}</b>{_e(text[(k, p)])}</pre></td>" if (k, p) in text else _td("")
             for k in stages] for p in prompts]
    header = ["prompt"] + [f"stage {k}: {names.get(k, '')}" if k else "base (stage 0)" for k in stages]
    return ("<h2>Generation samples</h2><p>The same prompt and seed after every stage (prompt in bold).</p>"
            + _table(header, rows))


def time_accounting(run: RunRecords) -> dict:
    """Seconds by kind of work, per stage and in all. ``utilisation`` = evaluation seconds /
    (search wall seconds x workers); ``idle`` = the rest of the workers' time during the search."""
    workers, evaluated, stats = run.workers(), run.evaluated(), {}
    for k in run.stage_names():
        evals = [e for e in evaluated if e.stage == k]
        search_wall = sum(g.seconds or 0 for g in run.generations if g.stage == k)
        total = sum(e.seconds or 0 for e in evals)
        train = sum(e.train_seconds or 0 for e in evals)
        stage_wall = (s.seconds if (s := run.summary_of(k)) else 0) or search_wall
        stats[k] = {"train": train, "validation": max(0.0, total - train), "evaluation": total,
                    "search_wall": search_wall, "idle": max(0.0, search_wall * workers - total),
                    "merge_and_test": max(0.0, stage_wall - search_wall), "wall": stage_wall}
    all_ = {key: sum(s[key] for s in stats.values()) for key in next(iter(stats.values()), {})}
    for s in [*stats.values(), all_]:
        s["utilisation"] = utilisation(s.get("evaluation", 0), s.get("search_wall", 0), workers)
    return {"workers": workers, "stages": stats, "total": all_}


def _time(run: RunRecords) -> str:
    acc = time_accounting(run)
    names = run.stage_names()
    keys = ["wall", "search_wall", "merge_and_test", "train", "validation", "idle"]

    def row(label, s):
        util = s.get("utilisation")
        return [_td(label)] + [_td(f"{s.get(k, 0):.1f}", "num") for k in keys] + \
            [_td("n/a" if util is None else f"{100 * util:.0f}%", "num")]

    rows = [row(f"{k} {names.get(k, '')}", s) for k, s in acc["stages"].items()]
    if acc["total"]:
        rows.append(row("all stages", acc["total"]))
    header = ["stage", "wall s", "search wall s", "merge + test s", "training s (workers)",
              "validation s (workers)", "idle s (workers)", "worker utilisation"]
    return (f"<h2>Time</h2><p>{acc['workers']} worker(s). Training and validation seconds are summed over "
            f"workers; idle = search wall × workers − evaluation seconds (start-up, waiting for the slowest "
            f"evaluation, the driver's work between evaluations). Worker utilisation = evaluation seconds / "
            f"(search wall × workers).</p>" + _table(header, rows))
