"""Stage data: read local files, split deterministically, tokenize and pack into blocks.

Documents are split into train / validation / test before packing, by a hash of their text, so
the same document always lands in the same split (no leakage, no dependence on the run seed).
Tokenized blocks are built once on the driver and shipped to the workers.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from evolm.config import DataSource
from evolm.errors import DataError

log = logging.getLogger(__name__)


def read_documents(source: DataSource, path: Path) -> list[str]:
    """The documents of one file, as the source's format defines them."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found; fix the path or prepare the data") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); convert the file to UTF-8") from None
    if source.format == "text":
        docs = [d.strip() for d in text.split("\n\n")]
    else:
        docs = [_record_text(source, path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{path}: no documents found (the file is empty or only whitespace); "
                        f"give a file with some text")
    return docs[: source.max_documents] if source.max_documents else docs


def _record_text(source: DataSource, path: Path, line_no: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {line_no}: not valid JSON ({exc.msg}); format '{source.format}' "
                        f"expects one JSON object per line") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
    if source.format == "jsonl":
        if source.text_field not in record:
            raise DataError(f"{path} line {line_no}: no field '{source.text_field}' (fields: "
                            f"{', '.join(sorted(record))}); set text_field to the field holding the text")
        return str(record[source.text_field]).strip()
    try:
        return source.template.format_map(record).strip()
    except KeyError as exc:
        raise DataError(f"{path} line {line_no}: template field {exc} is not in the record (fields: "
                        f"{', '.join(sorted(record))}); fix the stage's template") from None


def load_splits(source: DataSource) -> dict[str, list[str]]:
    """Train / validation / test documents: given files, or derived from ``train`` by hashing."""
    if source.train is not None:
        train = read_documents(source, source.train)
    else:
        train = [d.strip() for d in source.documents if d.strip()][: source.max_documents]
    given = {name: read_documents(source, getattr(source, name))
             for name in ("validation", "test") if getattr(source, name) is not None}
    fractions = {"validation": source.validation_fraction, "test": source.test_fraction}
    wanted = [name for name in ("validation", "test") if name not in given]
    if not wanted:
        return {"train": train, **given}
    splits = {"train": [], "validation": [], "test": []}
    for doc in train:
        u = int(hashlib.sha256(doc.encode()).hexdigest()[:12], 16) / 16**12
        if "validation" in wanted and u < fractions["validation"]:
            splits["validation"].append(doc)
        elif "test" in wanted and 1 - u <= fractions["test"]:
            splits["test"].append(doc)
        else:
            splits["train"].append(doc)
    for name in wanted:  # a small file may hash no document into a split: take one from train
        if not splits[name] and len(splits["train"]) > 1:
            splits[name].append(splits["train"].pop())
    splits.update(given)
    return splits


def pack(token_ids: list[list[int]], eos_id: int, block_size: int, where: str) -> np.ndarray:
    """Concatenate documents (EOS between) and cut into ``(n_blocks, block_size)`` int32 blocks."""
    flat = []
    for ids in token_ids:
        flat.extend(ids)
        flat.append(eos_id)
    n_blocks = len(flat) // block_size
    if n_blocks == 0:
        raise DataError(f"{where}: only {len(flat)} tokens, fewer than one block of block_size="
                        f"{block_size}; add data or lower block_size")
    return np.asarray(flat[: n_blocks * block_size], dtype=np.int32).reshape(n_blocks, block_size)


def tokenize_splits(splits: dict[str, list[str]], tokenizer, block_size: int, where: str) -> dict[str, np.ndarray]:
    blocks = {}
    for name, docs in splits.items():
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        blocks[name] = pack(ids, tokenizer.eos_token_id, block_size, f"{where} ({name} split)")
    log.info("%s: %s", where, ", ".join(f"{k} {v.shape[0]} blocks" for k, v in blocks.items()))
    return blocks
