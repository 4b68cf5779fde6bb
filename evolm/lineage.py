"""A genome's ancestry, from evaluations.jsonl: nodes, operator-labelled edges and a drawing.

Each evaluation record names the genome's parents and the operators that made it (and the parent
whose trained adapter it inherited, marked ``+weights`` on that edge), so the
winner of a stage can be traced back to random genomes of generation 0 (or to the stage before,
for a carried-over population). The drawing is a layered layout by birth (stage, generation),
made with matplotlib alone.
"""
from __future__ import annotations

import re
from collections import deque

from matplotlib.figure import Figure

from evolm.records import EvaluationRecord, read_records

MAX_NODES = 40


def ancestry(evaluations: list[EvaluationRecord], genome_id: str, max_nodes: int = MAX_NODES) -> dict:
    """``{"root": id, "nodes": {id: {stage, generation, val_loss, ops}}, "edges": [[parent, child, op]],
    "truncated": bool}``: the genome and its ancestors, nearest first, at most ``max_nodes``.
    ``evaluations``: records, or rows of evaluations.jsonl."""
    born: dict[str, EvaluationRecord] = {}
    best: dict[str, float] = {}
    for e in read_records(EvaluationRecord, evaluations):
        if not e.genome_id:
            continue
        born.setdefault(e.genome_id, e)  # the first record of a genome is its birth place
        if (v := e.val_loss) is not None and e.stage == born[e.genome_id].stage:
            best.setdefault(e.genome_id, v)
    nodes, edges, queue, truncated = {}, [], deque([genome_id]), False
    while queue:
        gid = queue.popleft()
        if gid in nodes:
            continue
        if len(nodes) >= max_nodes:
            truncated = True
            break
        record = born.get(gid) or EvaluationRecord(stage=None, generation=None)  # an ancestor not logged
        ops = list(record.ops or [])
        inherited = (record.inherited or {}).get("from")
        nodes[gid] = {"stage": record.stage, "generation": record.generation, "val_loss": best.get(gid), "ops": ops,
                      "inherited_from": inherited}
        for parent in dict.fromkeys(record.parents or []):  # a genome crossed with itself: one edge
            edges.append([parent, gid, operator_label(ops) + (" +weights" if parent == inherited else "")])
            queue.append(parent)
    edges = [e for e in edges if e[0] in nodes]
    return {"root": genome_id, "nodes": nodes, "edges": edges, "truncated": truncated}


def operator_label(ops: list[str], width: int = 40) -> str:
    """A short edge label: ``cx_uniform`` for a crossover, the mutation text otherwise."""
    text = "; ".join(ops) or "?"
    if text.startswith("cx_"):
        return text.split("(")[0]
    text = re.sub(r"^mut\((.*)\)$", r"\1", text)
    return text if len(text) <= width else text[: width - 1] + "…"


def layout(graph: dict) -> dict[str, tuple[float, float]]:
    """y: the rank of the node's birth (stage, generation), oldest at the top; x: spread evenly
    within a layer."""
    birth = {gid: (n["stage"] if n["stage"] is not None else -1, n["generation"] if n["generation"] is not None else -1)
             for gid, n in graph["nodes"].items()}
    layers = sorted(set(birth.values()))
    pos = {}
    for depth, layer in enumerate(layers):
        members = sorted(g for g, b in birth.items() if b == layer)
        for i, gid in enumerate(members):
            pos[gid] = (i - (len(members) - 1) / 2, -float(depth))
    return pos


def draw_lineage(graph: dict, title: str) -> Figure:
    pos = layout(graph)
    depth = len({y for _, y in pos.values()}) or 1
    widest = max([sum(1 for p in pos.values() if p[1] == y) for y in {p[1] for p in pos.values()}] or [1])
    fig = Figure(figsize=(min(max(2.6 * widest + 2.5, 6.5), 24), min(0.95 * depth + 1.0, 40)))
    ax = fig.add_subplot()
    for parent, child, op in graph["edges"]:
        (x0, y0), (x1, y1) = pos[parent], pos[child]
        ax.annotate("", xy=(x1, y1 + 0.22), xytext=(x0, y0 - 0.22),
                    arrowprops={"arrowstyle": "->", "color": "0.45", "lw": 1})
        ax.text((x0 + x1) / 2 + 0.06, (y0 + y1) / 2, op, fontsize=7, ha="left", va="center", color="0.2",
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85})
    for gid, (x, y) in pos.items():
        node = graph["nodes"][gid]
        loss = "failed" if node["val_loss"] is None else f"val_loss {node['val_loss']:.3f}"
        origin = " (random)" if node["ops"] == ["random"] else ""
        label = f"{gid}  stage {node['stage']} gen {node['generation']}{origin}\n{loss}"
        color = "#ffd27f" if gid == graph["root"] else "#dbe9f6"
        ax.text(x, y, label, ha="center", va="center", fontsize=7.5, family="monospace",
                bbox={"boxstyle": "round,pad=0.3", "fc": color, "ec": "0.3"})
    xs, ys = [p[0] for p in pos.values()] or [0], [p[1] for p in pos.values()] or [0]
    ax.set_xlim(min(xs) - 1.0, max(xs) + 1.0)
    ax.set_ylim(min(ys) - 0.5, max(ys) + 0.5)
    ax.axis("off")
    note = f" (nearest {len(pos)} ancestors)" if graph.get("truncated") else ""
    fig.suptitle(title + note, fontsize=10)
    fig.tight_layout()
    return fig
