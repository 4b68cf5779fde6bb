"""Prepare a second offline stream of corpora from a Debian system's own files.

The first stream (``prepare.py``) reads Python's standard library; this one reads files every
Debian-based machine has, so it needs no downloads either.  Four domains, one file each:

* ``changelogs.txt``  entries of ``/usr/share/doc/*/changelog.Debian.gz``, header to `` -- `` trailer.
* ``c_headers.txt``   C declarations from ``/usr/include/**/*.h``, top-of-file license comments dropped.
* ``perl.txt``        code of ``/usr/share/perl{,5}/**/*.pm``, POD and ``__END__`` data removed.
* ``copyright.txt``   paragraphs of ``/usr/share/doc/*/copyright`` (Files/License stanzas, licenses).

Documents have 3..60 lines and no blank line (code is cut at blank lines outside braces, long
blocks at top-level declarations), so one blank line separates them; each distinct document is
kept once (license texts repeat a lot); e-mail addresses become ``<email>``.  Sorted file lists
are read in a ``--seed`` order (at most MAX_DOCS_PER_FILE documents a file, a seeded sample) until
POOL_FACTOR x ``--max-bytes`` is pooled; the pool is shuffled and written up to the cap.
Undecodable files are skipped and counted (changelogs fall back to latin-1).  Deterministic for a
given system and arguments; a domain without files or documents is a one-line error (exit
status 1) before anything is written.

Usage: python experiments/data/prepare_system.py [--out DIR] [--max-bytes N] [--seed S]
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import logging
import os
import random
import re
import zlib
from pathlib import Path

log = logging.getLogger("prepare_system")

DEFAULT_OUT = Path(__file__).parent / "prepared" / "system"
MIN_LINES, MAX_LINES = 3, 60
MAX_DOCS_PER_FILE = 20
POOL_FACTOR = 3
EMAIL = re.compile(r"<?[A-Za-z0-9._%+-]+\\?@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+>?"  # and <x at y.org>
                   r"|<[\w.+-]+ (?:at|\(at\)|\[at\]) [\w-]+(?:(?:\.| dot )[\w-]+)+>")
LICENSE = re.compile(r"copyright|licen[cs]e|warranty|permission|GNU", re.I)
# Comments (dropped), strings/escapes/preprocessor lines (kept as "x"): what brace counting ignores.
C_NOISE = re.compile(r"//[^\n]*|/\*.*?\*/|^[ \t]*#[^\n]*(?:\\\n[^\n]*)*|\"(?:\\.|[^\"\\\n])*\""
                     r"|'(?:\\.|[^'\\\n])*'", re.S | re.M)
PERL_NOISE = re.compile(r"\\.|(?<![$\w@%])#[^\n]*|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'")
C_TOP_COMMENT = re.compile(r"\s*(/\*.*?\*/|(?://[^\n]*\n)+)", re.S)
PERL_TOP_COMMENT = re.compile(r"\s*((?:#[^\n]*\n)+)")
CHANGELOG_HEADER = re.compile(r"^\w[-+.\w]* \([^()\s]+\)[^;]*;")
CHANGELOG_TRAILER = re.compile(r"^ -- \S")


class SourceError(Exception):
    """A domain's source files are missing or yield no documents."""


def scrub(text: str) -> str:
    return EMAIL.sub("<email>", text)


def sized(lines: list) -> bool:
    return MIN_LINES <= len(lines) <= MAX_LINES


# ----------------------------------------------------------------------------- parsers
def changelog_docs(text: str) -> list[str]:
    """Entries from a ``pkg (version) dist; urgency`` header to the `` -- `` trailer, blank lines out."""
    docs, cur = [], None
    for line in text.split("\n"):
        if CHANGELOG_HEADER.match(line):
            cur = [line.rstrip()]
        elif cur is not None:
            if line.strip():
                cur.append(line.rstrip())
            if CHANGELOG_TRAILER.match(line):
                if sized(cur):
                    docs.append(scrub("\n".join(cur)))
                cur = None
    return docs


def copyright_docs(text: str) -> list[str]:
    """Blank-line separated paragraphs: Files/License stanzas, license texts."""
    docs = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = [line.rstrip() for line in para.split("\n") if line.strip()]
        if sized(lines):
            docs.append(scrub("\n".join(lines)))
    return docs


def code_docs(text: str, noise: re.Pattern, comment: tuple, top: re.Pattern) -> list[str]:
    """Blocks of code cut at blank lines outside braces; long blocks cut at depth-0 line ends."""
    while (m := top.match(text)) and LICENSE.search(m.group(1)):
        text = text[m.end():]  # license comments at the top of the file

    def mask(m):
        s = m.group()
        return ("" if s.startswith(comment) else "x") + "\n" * s.count("\n")

    blocks, depth, prev_blank = [[]], 0, True
    for line, code in zip(text.split("\n"), noise.sub(mask, text).split("\n")):
        line = line.rstrip()
        if not line.strip():
            if depth == 0:
                blocks.append([])
            prev_blank = True
            continue
        if prev_blank and depth and line[0] not in " \t#})" and not line.endswith(":"):
            blocks.append([])  # a top-level line after a blank inside braces: extern "C" {, unbalanced
            depth = 0
        prev_blank = False
        depth = max(0, depth + code.count("{") - code.count("}"))
        blocks[-1].append((line, code, depth))
    docs = []
    for block in blocks:
        pieces = [block]
        if len(block) > MAX_LINES:  # pack whole top-level units into pieces of <= MAX_LINES
            pieces, unit = [[]], []
            for item in block:
                unit.append(item)
                if item[2] == 0:
                    if len(pieces[-1]) + len(unit) > MAX_LINES:
                        pieces.append([])
                    pieces[-1] += unit
                    unit = []
            pieces.append(unit)
        for piece in pieces:
            if sized(piece) and any(code.strip() for _line, code, _d in piece):  # not only comments
                docs.append(scrub("\n".join(line for line, _code, _d in piece)))
    return docs


def strip_pod(text: str) -> str:
    """Drop POD (``=head1`` .. ``=cut``) and everything after ``__END__`` / ``__DATA__``."""
    out, pod = [], False
    for line in text.split("\n"):
        if re.match(r"__(END|DATA)__\s*$", line):
            break
        if re.match(r"=[a-zA-Z]", line):
            pod = not line.startswith("=cut")
            continue
        if not pod:
            out.append(line)
    return "\n".join(out)


# ----------------------------------------------------------------------------- sources
def walk(suffix: str, *roots: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in (w for root in roots for w in os.walk(root)):
        dirnames.sort()  # sorted walk; symlinked directories are not followed
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(suffix)]
    return found


def domains(root: Path) -> dict:
    """name -> (output file, sorted source paths, pattern shown in errors, parser)."""
    doc = root / "usr/share/doc"
    return {
        "changelogs": ("changelogs.txt", sorted(glob.glob(str(doc / "*/changelog.Debian.gz"))),
                       doc / "*/changelog.Debian.gz", changelog_docs),
        "c-headers": ("c_headers.txt", walk(".h", root / "usr/include"), root / "usr/include/**/*.h",
                      lambda t: code_docs(t, C_NOISE, ("/",), C_TOP_COMMENT)),
        "perl": ("perl.txt", walk(".pm", root / "usr/share/perl", root / "usr/share/perl5"),
                 root / "usr/share/perl{,5}/**/*.pm",
                 lambda t: code_docs(strip_pod(t), PERL_NOISE, ("#",), PERL_TOP_COMMENT)),
        "copyright": ("copyright.txt", sorted(glob.glob(str(doc / "*/copyright"))), doc / "*/copyright",
                      copyright_docs),
    }


def read(path: str, stats: dict) -> str | None:
    """Text of a file (gunzipped for .gz); None (counted as skipped) if unreadable or undecodable."""
    try:
        data = Path(path).read_bytes()
        data = gzip.decompress(data) if path.endswith(".gz") else data
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError:
        if path.endswith("changelog.Debian.gz"):
            stats["latin1_fallback"] += 1
            return data.decode("latin-1").replace("\r\n", "\n")
    except (OSError, EOFError, zlib.error):
        pass
    stats["skipped_files"] += 1
    return None


def collect(paths: list[str], parse, budget: int, rng: random.Random, stats: dict) -> list[str]:
    """Documents from files in a seeded order until ``budget`` bytes are pooled."""
    pool, size, seen = [], 0, set()
    for path in rng.sample(paths, len(paths)):
        text = read(path, stats)
        if text is None:
            continue
        stats["files_read"] += 1
        docs = [d for d in dict.fromkeys(parse(text)) if d not in seen]  # each distinct document once
        seen.update(docs)
        if len(docs) > MAX_DOCS_PER_FILE:
            docs = [docs[i] for i in sorted(rng.sample(range(len(docs)), MAX_DOCS_PER_FILE))]
        pool += docs
        size += sum(len(d.encode("utf-8")) + 2 for d in docs)
        if size >= budget:
            break
    return pool


# ----------------------------------------------------------------------------- output
def write_capped(path: Path, docs: list[str], max_bytes: int) -> dict:
    """Write whole documents joined by a blank line, skipping any that would exceed max_bytes."""
    kept, size = [], 1
    for doc in docs:
        add = len(doc.encode("utf-8")) + (2 if kept else 0)
        if size + add <= max_bytes:
            kept.append(doc)
            size += add
    data = ("\n\n".join(kept) + "\n").encode("utf-8") if kept else b""
    path.write_bytes(data)
    log.info("%s: %d documents, %d bytes (of %d pooled)", path.name, len(kept), len(data), len(docs))
    return {"bytes": len(data), "documents": len(kept), "sha256": hashlib.sha256(data).hexdigest()}


def prepare(out_dir: Path, max_bytes: int = 400_000, seed: int = 0, root: Path = Path("/")) -> dict:
    """Write the four corpora and ``manifest.json`` into ``out_dir``; return the manifest."""
    root = Path(root)
    sources = {}
    for name, (fname, paths, pattern, parse) in domains(root).items():
        # Symlinked doc dirs (g++ -> cpp) would repeat files: keep the first path to each file.
        real = {os.path.realpath(p): p for p in reversed(paths) if os.path.isfile(p)}
        if not real:
            raise SourceError(f"{name}: no source files match {pattern}")
        sources[name] = (fname, sorted(real.values()), parse)
    pools, domain_stats = {}, {}  # every domain is checked before anything is written
    for name, (fname, paths, parse) in sources.items():
        stats = {"files_found": len(paths), "files_read": 0, "skipped_files": 0, "latin1_fallback": 0}
        rng = random.Random(f"{seed}:{name}")  # str seeds are hashed deterministically
        pools[fname] = pool = collect(paths, parse, POOL_FACTOR * max_bytes, rng, stats)
        if not pool:
            raise SourceError(f"{name}: {len(paths)} source files but no documents of "
                              f"{MIN_LINES}..{MAX_LINES} lines in them")
        rng.shuffle(pool)
        stats["documents_pooled"] = len(pool)
        domain_stats[name] = stats
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {fname: write_capped(out_dir / fname, pool, max_bytes) for fname, pool in pools.items()}
    manifest = {"root": str(root), "max_bytes": max_bytes, "seed": seed, "domains": domain_stats,
                "files": files}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")
    return manifest


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--max-bytes", type=int, default=400_000, help="size cap per file")
    parser.add_argument("--seed", type=int, default=0, help="file order / sampling seed")
    parser.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        manifest = prepare(args.out, args.max_bytes, args.seed, args.root)
    except SourceError as exc:
        raise SystemExit(f"prepare_system: {exc}") from None
    sizes = ", ".join(f"{k}={v['bytes']}B/{v['documents']}" for k, v in manifest["files"].items())
    skipped = sum(d["skipped_files"] for d in manifest["domains"].values())
    print(f"prepared {args.out}: {sizes} (skipped {skipped} files)")
    return manifest


if __name__ == "__main__":
    main()
