"""experiments/data/prepare_debian.py: Debian package synopses by section, as a classification stream."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from tests.conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("prepare_debian", ROOT / "experiments" / "data" / "prepare_debian.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stanza(package, section, description):
    return f"Package: {package}\nVersion: 1.0\nSection: {section}\nDescription: {description}\nHomepage: x\n"


def listing(per_section: dict[str, int]) -> str:
    return "\n".join(stanza(f"{s}-pkg{i}", s if i % 2 else f"contrib/{s}", f"{s} tool number {i}\n .\n more about {i}")
                     for s, n in per_section.items() for i in range(n))


def test_sections_are_dealt_to_stages_and_splits_never_share_a_text(tmp_path):
    prep = _module()
    text = listing({"libs": 60, "python": 50, "doc": 45, "net": 40, "games": 3})
    text += "\n" + stanza("dup-a", "libs", "same words") + "\n" + stanza("dup-b", "net", "same words")
    manifest = prep.prepare(tmp_path, n_classes=4, n_stages=2, sizes={"train": 8, "validation": 2, "test": 3}, text=text)
    assert [s["new_classes"] for s in manifest["stages"]] == [["libs", "doc"], ["python", "net"]]
    assert [s["classes"] for s in manifest["stages"]] == [["libs", "doc"], ["libs", "doc", "python", "net"]]
    seen = {}
    for k in (1, 2):
        for split in ("train", "validation", "test"):
            rows = [json.loads(line) for line in (tmp_path / f"stage-{k}.{split}.jsonl").read_text().splitlines()]
            assert len(rows) == {"train": 8, "validation": 2, "test": 3}[split] * 2 * k  # earlier classes go on
            for r in rows:
                assert r["text"] not in seen, "a text in two splits"
                seen[r["text"]] = split
                assert "pkg" not in r["text"] and r["text"] != "same words"  # no names; ambiguous texts dropped
    assert "more about" in next(iter(seen))  # the long description joins the synopsis
    again = prep.prepare(tmp_path / "again", 4, 2, {"train": 8, "validation": 2, "test": 3}, text=text)
    assert again["stages"] == manifest["stages"]


def test_too_few_sections_is_one_clear_message(tmp_path):
    prep = _module()
    with pytest.raises(prep.SourceError, match="apt-get update"):
        prep.prepare(tmp_path, 8, 2, text=listing({"libs": 5, "doc": 5}))
    with pytest.raises(prep.SourceError, match="apt-get update"):
        prep.prepare(tmp_path, 8, 2, text="")


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="not a Debian-based system (no apt-cache)")
def test_the_machines_package_lists_give_a_stream(tmp_path):
    prep = _module()
    try:
        manifest = prep.prepare(tmp_path, 4, 2, {"train": 20, "validation": 5, "test": 5})
    except prep.SourceError as exc:
        pytest.skip(f"apt knows too few packages here: {exc}")
    assert [len(s["classes"]) for s in manifest["stages"]] == [2, 4]
    assert all(s["files"]["train"]["examples"] > 0 for s in manifest["stages"])
