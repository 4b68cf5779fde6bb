"""Tests for experiments/data/prepare_system.py (the second stream, from Debian system files)."""
import glob
import gzip
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "data" / "prepare_system.py"
CAP = 20_000
FILES = ["changelogs.txt", "c_headers.txt", "perl.txt", "copyright.txt"]
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+\\?@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
ON_DEBIAN = bool(glob.glob("/usr/share/doc/*/changelog.Debian.gz") and glob.glob("/usr/share/doc/*/copyright")
                 and Path("/usr/include").is_dir() and Path("/usr/share/perl5").is_dir())


def _load():
    spec = importlib.util.spec_from_file_location("prepare_system", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prep = _load()


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _docs(path):
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n\n")


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    if not ON_DEBIAN:
        pytest.skip("no Debian system files here (/usr/share/doc, /usr/include, /usr/share/perl5)")
    outs = [tmp_path_factory.mktemp(f"system{i}") for i in range(2)]
    for out in outs:
        result = _run("--out", out, "--max-bytes", CAP, "--seed", 3)
        assert result.returncode == 0, result.stderr
    return outs


def test_files_exist_nonempty_capped_and_in_manifest(twice):
    out = twice[0]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(manifest["files"]) == sorted(FILES) and manifest["max_bytes"] == CAP
    for name in FILES:
        size = (out / name).stat().st_size
        assert CAP // 2 < size <= CAP, (name, size)
        assert manifest["files"][name]["bytes"] == size
        assert manifest["files"][name]["documents"] == len(_docs(out / name))


def test_documents_separated_by_one_blank_line(twice):
    for name in FILES:
        text = (twice[0] / name).read_text(encoding="utf-8")
        assert text.endswith("\n") and not text.endswith("\n\n") and "\n\n\n" not in text, name
        for doc in _docs(twice[0] / name):
            lines = doc.split("\n")
            assert 3 <= len(lines) <= 60, (name, doc[:200])
            assert all(line.strip() and line == line.rstrip() for line in lines), (name, doc[:200])


def test_domains_look_right(twice):
    out = twice[0]
    for doc in _docs(out / "changelogs.txt"):
        lines = doc.split("\n")
        assert re.match(r"\S+ \(\S+\) .*;", lines[0]) and lines[-1].startswith(" -- "), doc[:200]
    perl = (out / "perl.txt").read_text(encoding="utf-8")
    assert "sub " in perl and not re.search(r"^=(head\d|pod|cut|item)\b", perl, re.M)
    assert re.search(r"^(struct|typedef|#define|extern) ", (out / "c_headers.txt").read_text(), re.M)
    for name in FILES:  # each distinct document once (license texts repeat across copyright files)
        docs = _docs(out / name)
        assert len(docs) == len(set(docs)), name


def test_no_email_addresses(twice):
    for name in FILES:
        text = (twice[0] / name).read_text(encoding="utf-8")
        assert not EMAIL.search(text), (name, EMAIL.search(text))
    assert "<email>" in (twice[0] / "changelogs.txt").read_text(encoding="utf-8")


def test_deterministic(twice):
    for name in FILES + ["manifest.json"]:
        assert (twice[0] / name).read_bytes() == (twice[1] / name).read_bytes(), name


def _fake_root(root: Path) -> Path:
    """A tiny Debian-like tree with one file per domain and the cases each parser handles."""
    for pkg in ("alpha", "beta"):
        (root / "usr/share/doc" / pkg).mkdir(parents=True)
        (root / "usr/share/doc" / pkg / "copyright").write_text(
            f"Files: *\nCopyright: 2020 {pkg} Maker <{pkg}@example.org>\nLicense: MIT\n\n"
            "License: MIT\n Permission is hereby granted, free of charge,\n to any person.\n")
    changelog = ("alpha (1.1-1) unstable; urgency=medium\n\n  * New upstream release.\n"
                 "  * Thanks to Jos\xe9.\n\n -- Ann Maker <ann@example.org>  Mon, 01 Jan 2024 10:00:00 +0000"
                 "\n\n"
                 "alpha (1.0-1) unstable; urgency=low\n\n  * Initial release. (Closes: #1)\n\n"
                 " -- Ann Maker <ann at example.org>  Sun, 31 Dec 2023 10:00:00 +0000\n")
    (root / "usr/share/doc/alpha/changelog.Debian.gz").write_bytes(gzip.compress(changelog.encode("latin-1")))
    (root / "usr/include/sub").mkdir(parents=True)
    (root / "usr/include/sub/a.h").write_text(
        "/* Copyright (C) 2020 Somebody.\n   This library is free software; see the GNU LGPL. */\n\n"
        "#ifndef A_H\n#define A_H\n\n#ifdef __cplusplus\nextern \"C\" {\n#endif\n\n"
        "struct point {\n    int x;\n\n    int y;  /* } in a comment */\n};\n\n"
        "/* Add two points. */\nextern struct point add(struct point a,\n    struct point b);\n\n"
        "#ifdef __cplusplus\n}\n#endif\n#endif\n")
    (root / "usr/share/perl5/Foo").mkdir(parents=True)
    (root / "usr/share/perl5/Foo/Bar.pm").write_text(
        "package Foo::Bar;\nuse strict;\nuse warnings;\n\n=head1 NAME\n\nFoo::Bar - POD TEXT\n\n=cut\n\n"
        "sub new {\n    my ($class) = @_;\n\n    return bless {}, $class;\n}\n\n1;\n__END__\n\nDATA TEXT\n")
    return root


def test_fake_tree(tmp_path):
    manifest = prep.prepare(tmp_path / "out", max_bytes=10_000, seed=0, root=_fake_root(tmp_path / "root"))
    out = tmp_path / "out"
    changelogs = _docs(out / "changelogs.txt")
    assert len(changelogs) == 2 and manifest["domains"]["changelogs"]["latin1_fallback"] == 1
    assert "  * Thanks to Jos\xe9.\n -- Ann Maker <email>  Mon" in "\n\n".join(changelogs)
    headers = (out / "c_headers.txt").read_text(encoding="utf-8")
    assert "Copyright" not in headers and "GNU" not in headers  # the license comment is dropped
    assert "struct point {\n    int x;\n    int y;  /* } in a comment */\n};" in _docs(out / "c_headers.txt")
    assert "/* Add two points. */\nextern struct point add(struct point a,\n    struct point b);" in headers
    perl = (out / "perl.txt").read_text(encoding="utf-8")
    assert "sub new {\n    my ($class) = @_;\n    return bless {}, $class;\n}" in perl
    assert "POD TEXT" not in perl and "DATA TEXT" not in perl
    copyright = _docs(out / "copyright.txt")
    assert sorted(copyright) == sorted([
        "Files: *\nCopyright: 2020 alpha Maker <email>\nLicense: MIT",
        "Files: *\nCopyright: 2020 beta Maker <email>\nLicense: MIT",
        "License: MIT\n Permission is hereby granted, free of charge,\n to any person."])  # kept once
    for name in FILES:
        assert not EMAIL.search((out / name).read_text(encoding="utf-8")), name


def _assert_one_line_error(result, *words):
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("prepare_system: ") and all(w in message for w in words), message


def test_missing_source_root_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _run("--root", tmp_path / "empty", "--out", tmp_path / "out")
    _assert_one_line_error(result, "changelogs", "changelog.Debian.gz")
    assert not (tmp_path / "out").exists()  # nothing written before the sources are checked


def test_empty_source_is_one_line_error(tmp_path):
    root = _fake_root(tmp_path / "root")
    (root / "usr/share/perl5/Foo/Bar.pm").write_text("1;\n")
    result = _run("--root", root, "--out", tmp_path / "out")
    _assert_one_line_error(result, "perl", "no documents")
    assert not (tmp_path / "out").exists()
