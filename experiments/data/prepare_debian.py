"""Prepare a labelled classification stream from Debian's package descriptions, offline.

``apt-cache dumpavail`` prints every package the machine's package lists know (tens of thousands on
a Debian system after one ``apt-get update``), each with its ``Section`` (libs, python, doc, ...)
and its ``Description``. A package's description as the lists carry it (the one-line synopsis, with
the long text where the lists include it; never the package name) is the text; its section (``contrib/net`` counts as ``net``) is the label. The most frequent
``--classes`` sections are kept and dealt to ``--stages`` stages in turn by frequency (stage 1 gets
the 1st, (stages+1)-th, ... most frequent, so every stage brings common and rarer classes): new
classes arrive stage by stage while the earlier ones keep coming, as new kinds of tickets reach a
support classifier that still gets the old kinds. Stage k holds every class that has arrived by then.

Each stage gets ``stage-<k>.train.jsonl``, ``.validation.jsonl`` and ``.test.jsonl`` (``{"text",
"label"}`` lines; a seeded sample of at most ``--train`` / ``--validation`` / ``--test`` distinct
descriptions per class, never the same text twice: a class's later stages get other packages), and
``manifest.json`` says what was kept. Deterministic for a given package list and arguments. (The encoder the example experiment
uses comes from ``make minilm``.)

Usage: python experiments/data/prepare_debian.py [--out DIR] [--classes 8] [--stages 2]
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "prepared" / "debian"
MAX_CHARS = 600


class SourceError(Exception):
    pass


def dumpavail() -> str:
    try:
        out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, errors="replace", check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SourceError(f"cannot run `apt-cache dumpavail` ({exc}); this needs a Debian-based system") from None
    return out.stdout


def parse(text: str) -> list[dict]:
    """``{"package", "section", "text"}`` for every stanza with a section and a description."""
    records = []
    for stanza in text.split("\n\n"):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Section") and fields.get("Description"):
            records.append({"package": fields.get("Package", ""), "section": fields["Section"].rsplit("/", 1)[-1],
                            "text": describe(fields["Description"])})
    return records


def describe(description: str) -> str:
    """The synopsis and long description as plain text: Debian's `` .`` lines are paragraph breaks."""
    lines = [" " if line == "." else line for line in description.splitlines()]
    text = " ".join(lines).replace("   ", " ").strip()
    return text[:MAX_CHARS]


def stream(records: list[dict], n_classes: int, n_stages: int) -> list[list[str]]:
    """The classes of each stage: the most frequent sections, dealt out by frequency."""
    counts = collections.Counter(r["section"] for r in {r["text"]: r for r in records}.values())
    top = [s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_classes]]
    if len(top) < 2 * n_stages:
        raise SourceError(f"only {len(top)} sections found; need at least two per stage ({n_stages} stages): "
                          f"run `sudo apt-get update` so apt knows the archive's packages")
    return [top[k::n_stages] for k in range(n_stages)]


def carve(texts: list[str], sizes: dict[str, int], stages: int, rng: random.Random) -> list[dict[str, list[str]]]:
    """A class's texts in ``stages`` disjoint parts, each split into test, validation and train (the
    evaluation splits first: a small class keeps them full)."""
    texts = sorted(set(texts))
    rng.shuffle(texts)
    parts, start = [], 0
    for _ in range(stages):
        part = {}
        for split in ("test", "validation", "train"):
            part[split] = texts[start:start + sizes[split]]
            start += sizes[split]
        parts.append(part)
    return parts


def prepare(out_dir: Path, n_classes: int = 8, n_stages: int = 2, sizes: dict | None = None, seed: int = 0,
            text: str | None = None) -> dict:
    sizes = sizes or {"train": 200, "validation": 30, "test": 60}
    records = parse(dumpavail() if text is None else text)
    if not records:
        raise SourceError("apt-cache dumpavail printed no package with a section and a description: run "
                          "`sudo apt-get update` once so apt knows the archive's packages")
    by_section = collections.defaultdict(list)
    for r in records:
        by_section[r["section"]].append(r["text"])
    ambiguous = {t for t, secs in _sections_of(records).items() if len(secs) > 1}  # one text, two labels: dropped
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"seed": seed, "sizes": sizes, "packages": len(records), "stages": []}
    arrivals = stream(records, n_classes, n_stages)
    parts = {}  # class -> its texts for each stage from its arrival on
    for k, classes in enumerate(arrivals):
        for section in classes:
            pool = [t for t in by_section[section] if t not in ambiguous]
            parts[section] = carve(pool, sizes, n_stages - k, random.Random(f"{seed}:{section}"))
    for k in range(1, n_stages + 1):
        present = [c for arrived in arrivals[:k] for c in arrived]
        rng = random.Random(f"{seed}:{k}")
        files = {}
        for split in sizes:
            rows = [{"text": t, "label": c} for c in present
                    for t in parts[c][k - 1 - next(i for i, a in enumerate(arrivals) if c in a)][split]]
            rng.shuffle(rows)
            path = out_dir / f"stage-{k}.{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            files[split] = {"file": path.name, "examples": len(rows)}
        manifest["stages"].append({"stage": k, "classes": present, "new_classes": arrivals[k - 1], "files": files})
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _sections_of(records: list[dict]) -> dict[str, set]:
    seen = collections.defaultdict(set)
    for r in records:
        seen[r["text"]].add(r["section"])
    return seen


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--classes", type=int, default=8, help="how many of the most frequent sections")
    parser.add_argument("--stages", type=int, default=2, help="stages the classes are dealt to")
    parser.add_argument("--train", type=int, default=200, help="training examples per class and stage (at most)")
    parser.add_argument("--validation", type=int, default=30, help="validation examples per class and stage")
    parser.add_argument("--test", type=int, default=60, help="test examples per class and stage")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.out, args.classes, args.stages,
                           {"train": args.train, "validation": args.validation, "test": args.test}, args.seed)
    except SourceError as exc:
        raise SystemExit(f"prepare_debian: {exc}") from None
    for s in manifest["stages"]:
        counts = ", ".join(f"{split} {f['examples']}" for split, f in s["files"].items())
        print(f"stage {s['stage']}: {', '.join(s['classes'])} ({counts})")
    return manifest


if __name__ == "__main__":
    main()
