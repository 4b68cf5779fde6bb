"""Tests for experiments/data/prepare.py (stdlib-derived offline corpora)."""
import ast
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "data" / "prepare.py"
CAP = 60_000
FILES = ["general.txt", "code.txt", "docstrings.jsonl", "api_qa.jsonl"]


def _load():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prep = _load()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return out, prep.prepare(out, max_bytes=CAP, seed=0)


def _text_docs(path):
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n\n")


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_files_exist_nonempty_and_capped(prepared):
    out, _ = prepared
    for name in FILES + ["manifest.json"]:
        assert (out / name).is_file(), name
    for name in FILES:
        size = (out / name).stat().st_size
        assert 0 < size <= CAP, (name, size)
        # Close to the cap: the stdlib has far more than CAP bytes of each domain.
        assert size > CAP // 2, (name, size)


def test_general_is_prose(prepared):
    out, _ = prepared
    text = (out / "general.txt").read_text(encoding="utf-8")
    assert "\n\n\n" not in text and text.endswith("\n") and not text.endswith("\n\n")
    assert " the " in text and " is " in text
    for line in text.split("\n")[:-1]:
        assert line == line.strip()
        assert "  " not in line  # runs of spaces collapsed
        if line:
            assert not set(line) <= set("=-_*+~^#|:. "), line  # rule lines dropped


def test_code_has_definitions_without_docstrings(prepared):
    out, _ = prepared
    text = (out / "code.txt").read_text(encoding="utf-8")
    assert "def " in text and "\n\n\n" not in text
    docs = _text_docs(out / "code.txt")
    parsed = 0
    for doc in docs:
        assert doc.strip() and doc.count("\n") < 60
        try:
            tree = ast.parse(doc)
        except SyntaxError:
            continue
        parsed += 1
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = node.body[0]
                assert not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                            and isinstance(first.value.value, str)), doc[:200]
    assert parsed >= 0.9 * len(docs)


def test_docstrings_records(prepared):
    out, _ = prepared
    records = _jsonl(out / "docstrings.jsonl")
    assert records
    for rec in records:
        assert set(rec) == {"module", "name", "kind", "text"}
        assert all(isinstance(v, str) and v for v in rec.values())
        assert rec["kind"] in {"function", "class", "method"}
        assert len(rec["text"]) >= 40
        assert not rec["name"].split(".")[-1].startswith("_")
        assert not rec["module"].endswith(".py") and "/" not in rec["module"]
    assert len({r["module"] for r in records}) > 10  # spread over the stdlib


def test_api_qa_records(prepared):
    out, _ = prepared
    records = _jsonl(out / "api_qa.jsonl")
    assert records
    for rec in records:
        assert set(rec) == {"question", "answer"}
        assert isinstance(rec["question"], str) and rec["question"].endswith("?")
        assert isinstance(rec["answer"], str) and rec["answer"]
        assert len(rec["answer"]) <= 400
    kinds = {" ".join(r["question"].split()[:2]) for r in records}
    assert len(kinds) >= 2, kinds
    assert not all(a["question"] == b["question"] for a, b in zip(records, records[1:]))


def test_manifest_matches_files(prepared):
    out, manifest = prepared
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert manifest["python_version"] and manifest["stdlib"]
    assert isinstance(manifest["skipped_files"], int) and manifest["skipped_files"] >= 0
    for name in FILES:
        info, path = manifest["files"][name], out / name
        data = path.read_bytes()
        assert info["bytes"] == len(data)
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        count = len(_jsonl(path)) if name.endswith(".jsonl") else len(_text_docs(path))
        assert info["documents"] == count, name


def test_rerun_is_byte_identical(prepared, tmp_path):
    out, manifest = prepared
    # Second run goes through the CLI entry point to cover argument parsing too.
    again = prep.main(["--out", str(tmp_path), "--max-bytes", str(CAP), "--seed", "0"])
    assert again == manifest
    for name in FILES + ["manifest.json"]:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
