"""Prepare small offline text corpora from the running Python's standard library.

Every machine with Python 3 has the same raw material, so the experiments need
no downloads and the repository ships no third-party text.  Four domains:

* ``general.txt``      English prose: the language reference (``pydoc_data.topics``).
* ``code.txt``         stdlib function/class definitions with docstrings removed.
* ``docstrings.jsonl`` API documentation of public functions, classes and methods.
* ``api_qa.jsonl``     question/answer pairs derived from that documentation.

Stdlib modules are never imported (some have side effects, e.g. ``antigravity``);
they are read as text and parsed with ``ast``.  Output is deterministic for a
given Python install and arguments.

Usage: python experiments/data/prepare.py [--out DIR] [--max-bytes N] [--seed S]
"""
from __future__ import annotations

import argparse
import ast
import builtins
import gc
import hashlib
import inspect
import json
import logging
import os
import random
import re
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger("prepare")

DEFAULT_OUT = Path(__file__).parent / "prepared"
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__",
             "turtledemo", "ensurepip"}
MAX_DEF_LINES = 60
MIN_DOC_CHARS = 40
MAX_ANSWER_CHARS = 400
RULE_LINE = re.compile(r"^[\W_]+$")  # only punctuation / underscores / = / - / + ...
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


# ----------------------------------------------------------------------------- stdlib
def stdlib_modules(root: Path) -> tuple[list[tuple[str, str, ast.Module]], int]:
    """Return sorted (module name, source, tree) for parseable stdlib files, and #skipped."""
    modules, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)  # sorted walk
        for fname in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath, fname)
            try:
                source = path.read_text(encoding="utf-8")  # universal newlines -> "\n"
                tree = ast.parse(source)
            except (UnicodeDecodeError, SyntaxError, ValueError):
                skipped += 1  # e.g. deliberately broken or non-UTF-8 files
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules.append((".".join(parts), source, tree))
    modules.sort(key=lambda m: m[0])
    return modules, skipped


def is_public_module(module: str) -> bool:
    return bool(module) and not any(p.startswith("_") for p in module.split("."))


def public_defs(tree: ast.Module):
    """Yield (qualified name, kind, node) for public top-level defs and their methods."""
    for node in tree.body:
        if not isinstance(node, DEFS) or node.name.startswith("_"):
            continue
        if isinstance(node, ast.ClassDef):
            yield node.name, "class", node
            for sub in node.body:
                if isinstance(sub, FUNCS) and not sub.name.startswith("_"):
                    yield f"{node.name}.{sub.name}", "method", sub
        else:
            yield node.name, "function", node


def docstring(node) -> str | None:
    doc = ast.get_docstring(node, clean=False)
    doc = inspect.cleandoc(doc) if doc else ""
    return doc if len(doc) >= MIN_DOC_CHARS else None


# ----------------------------------------------------------------------------- corpora
def general_docs() -> list[str]:
    """Paragraphs of the language reference: spaces collapsed, rule lines dropped."""
    from pydoc_data.topics import topics  # a pure data module, safe to import

    docs = []
    for key in sorted(topics):
        para: list[str] = []
        for raw in topics[key].split("\n") + [""]:
            line = " ".join(raw.split())
            if line and RULE_LINE.match(line):
                continue  # "*****", "=====", "+----+" are layout, not language
            if line:
                para.append(line)
            elif para:
                docs.append("\n".join(para))
                para = []
    return docs


def nested_defs(node):
    """Yield ``node`` and every def/class inside it, visiting statements only.

    Docstrings live only on defs, and defs only in statement lists, so this skips
    the expression nodes that make up most of the tree (much faster than ast.walk).
    """
    stack = [node]
    while stack:
        stmt = stack.pop()
        if isinstance(stmt, DEFS):
            yield stmt
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            stack.extend(getattr(stmt, field, None) or [])


def definition_source(lines: list[str], node) -> str | None:
    """Source of a top-level definition (with decorators) minus all its docstrings.

    Slices the file's lines directly: ``ast.get_source_segment`` re-splits the whole
    file on every call, which is quadratic on large modules.
    """
    first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    out = {i: lines[i] for i in range(first, node.end_lineno)}
    last = node.end_lineno - 1  # cut anything after the definition on its last line
    out[last] = out[last].encode("utf-8")[:node.end_col_offset].decode("utf-8", "ignore")
    for sub in nested_defs(node):
        if ast.get_docstring(sub, clean=False) is None:
            continue
        doc = sub.body[0]
        if doc.lineno == sub.lineno or (len(sub.body) > 1 and sub.body[1].lineno <= doc.end_lineno):
            return None  # docstring shares a line with other code; too rare to bother
        for i in range(doc.lineno - 1, doc.end_lineno):
            out[i] = ""
        if len(sub.body) == 1:  # body was only the docstring: keep it valid Python
            out[doc.lineno - 1] = " " * doc.col_offset + "pass"
    # Dropping empty lines keeps "one blank line" free to mean "next document".
    return "\n".join(line.rstrip() for _i, line in sorted(out.items()) if line.strip())


def code_docs(modules) -> list[str]:
    """Top-level definitions of every module, without docstrings and blank lines."""
    docs = []
    for _module, source, tree in modules:
        lines = source.split("\n")
        for node in tree.body:
            if isinstance(node, DEFS):
                code = definition_source(lines, node)
                if code and code.count("\n") < MAX_DEF_LINES:
                    docs.append(code)
    return docs


def docstring_records(modules) -> list[dict]:
    records = []
    for module, _source, tree in modules:
        if not is_public_module(module):
            continue
        for name, kind, node in public_defs(tree):
            doc = docstring(node)
            if doc:
                records.append({"module": module, "name": name, "kind": kind, "text": doc})
    return records


def shorten(text: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """First real paragraph on one line, cut at a sentence end to stay under ``limit``."""
    paras = [" ".join(w for line in p.split("\n") if not RULE_LINE.match(line.strip())
                      for w in line.split()) for p in text.split("\n\n")]
    # A one-word first paragraph is a heading such as "distutils.errors"; skip it.
    para = next((p for p in paras if " " in p), paras[0])
    if len(para) <= limit:
        return para
    cut = max(para.rfind(". ", 0, limit), para.rfind("? ", 0, limit), para.rfind("! ", 0, limit))
    if cut > 0:
        return para[:cut + 1]
    return para[:limit - 3].rsplit(" ", 1)[0] + "..."


def signature(name: str, args: ast.arguments, is_method: bool) -> str:
    """Render ``name(a, b=1, *args, c, **kw)`` from ast arguments, without self/cls."""
    def arg(a: ast.arg, default=None) -> str:
        text = a.arg + (f": {ast.unparse(a.annotation)}" if a.annotation else "")
        if default is not None:
            text += (" = " if a.annotation else "=") + ast.unparse(default)
        return text

    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    parts = [arg(a, d) for a, d in zip(positional, defaults)]
    if args.posonlyargs:
        parts.insert(len(args.posonlyargs), "/")
    if args.vararg:
        parts.append("*" + arg(args.vararg))
    elif args.kwonlyargs:
        parts.append("*")
    parts += [arg(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        parts.append("**" + arg(args.kwarg))
    if is_method and positional and positional[0].arg in ("self", "cls"):
        parts.pop(0)
        if parts and parts[0] == "/":
            parts.pop(0)
    return f"{name.split('.')[-1]}({', '.join(parts)})"


def qa_records(modules, seed: int) -> list[dict]:
    """Several question kinds per documented API object, shuffled across modules."""
    public = [m for m in modules if is_public_module(m[0])]
    # "Which module defines X?" only has one right answer when X is unique (and no builtin).
    counts = {name: 2 for name in dir(builtins)}
    for _module, _source, tree in public:
        for name, kind, _node in public_defs(tree):
            if kind != "method":
                counts[name] = counts.get(name, 0) + 1

    pairs = []  # (module, record)
    for module, _source, tree in public:
        mod_doc = docstring(tree)
        qa = [(f"What is the {module} module for?", shorten(mod_doc))] if mod_doc else []
        for name, kind, node in public_defs(tree):
            doc = docstring(node)
            if not doc:
                continue
            qual = f"{module}.{name}"
            if kind == "class":
                qa.append((f"What is {qual}?", shorten(doc)))
            else:
                qa.append((f"What does {qual} do?", shorten(doc)))
                sig = signature(name, node.args, kind == "method")
                if len(sig) <= MAX_ANSWER_CHARS:
                    qa.append((f"What are the parameters of {qual}?", sig))
            if kind != "method" and counts[name] == 1:
                qa.append((f"Which module defines {name}?", f"{name} is defined in the {module} module."))
        pairs += [(module, {"question": q, "answer": a}) for q, a in qa if a]

    random.Random(seed).shuffle(pairs)
    # Repair neighbours from the same module by swapping in the next different one.
    for i in range(1, len(pairs)):
        if pairs[i][0] == pairs[i - 1][0]:
            j = next((j for j in range(i + 1, len(pairs)) if pairs[j][0] != pairs[i - 1][0]), None)
            if j is not None:
                pairs[i], pairs[j] = pairs[j], pairs[i]
    return [record for _module, record in pairs]


# ----------------------------------------------------------------------------- output
def write_capped(path: Path, items: list[str], max_bytes: int, joiner: str) -> dict:
    """Write whole items joined by ``joiner`` (+ final newline) without exceeding max_bytes."""
    kept, size = [], 1
    for item in items:
        add = len(item.encode("utf-8")) + (len(joiner) if kept else 0)
        if size + add > max_bytes:
            break  # stop at the first document that would not fit
        kept.append(item)
        size += add
    data = (joiner.join(kept) + "\n").encode("utf-8") if kept else b""
    path.write_bytes(data)
    info = {"bytes": len(data), "documents": len(kept), "sha256": hashlib.sha256(data).hexdigest()}
    log.info("%s: %d documents, %d bytes (of %d available)", path.name, len(kept), len(data), len(items))
    return info


def prepare(out_dir: Path, max_bytes: int = 400_000, seed: int = 0) -> dict:
    """Write the four corpora and ``manifest.json`` into ``out_dir``; return the manifest."""
    # With ~600 ASTs alive the cyclic GC rescans millions of nodes on every collection
    # (4x slower overall); nothing here builds reference cycles, so pause it.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _prepare(Path(out_dir), max_bytes, seed)
    finally:
        if gc_was_enabled:
            gc.enable()


def _prepare(out_dir: Path, max_bytes: int, seed: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules, skipped = stdlib_modules(stdlib)

    rng = random.Random(seed)
    code = code_docs(modules)
    rng.shuffle(code)  # sorted order would fill the cap with the first few modules only
    docs = docstring_records(modules)
    rng.shuffle(docs)

    def jsonl(records):
        return [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records]

    files = {
        "general.txt": write_capped(out_dir / "general.txt", general_docs(), max_bytes, "\n\n"),
        "code.txt": write_capped(out_dir / "code.txt", code, max_bytes, "\n\n"),
        "docstrings.jsonl": write_capped(out_dir / "docstrings.jsonl", jsonl(docs), max_bytes, "\n"),
        "api_qa.jsonl": write_capped(out_dir / "api_qa.jsonl", jsonl(qa_records(modules, seed)),
                                     max_bytes, "\n"),
    }
    manifest = {
        "python_version": sys.version.split()[0],
        "stdlib": str(stdlib),
        "modules_parsed": len(modules),
        "skipped_files": skipped,
        "max_bytes": max_bytes,
        "seed": seed,
        "files": files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")
    return manifest


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--max-bytes", type=int, default=400_000, help="size cap per file")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    manifest = prepare(args.out, args.max_bytes, args.seed)
    sizes = ", ".join(f"{k}={v['bytes']}B/{v['documents']}" for k, v in manifest["files"].items())
    print(f"prepared {args.out}: {sizes} (skipped {manifest['skipped_files']} files)")
    return manifest


if __name__ == "__main__":
    main()
