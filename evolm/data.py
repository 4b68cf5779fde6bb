"""Stage data: read local files, split deterministically, tokenize into rows (``evolm.rows``).

Documents are split into train / validation / test before tokenizing, by a hash of their text, so
the same document always lands in the same split (no leakage, no dependence on the run seed).
Text is packed into token blocks; a Q&A example with ``loss_on: answer`` becomes one row whose
prompt is masked; a classification example one row with its class. Rows are built once on the
driver and shipped to the workers.

An example is a string (text), ``{"prompt", "answer"}`` (answer-only Q&A) or ``{"text", "label"}``
(classification).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from evolm import rows
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
        docs = [_record_example(source, path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{path}: no documents found (the file is empty or only whitespace); "
                        f"give a file with some text")
    return docs[: source.max_documents] if source.max_documents else docs


def _record_example(source: DataSource, path: Path, line_no: int, line: str) -> str | dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {line_no}: not valid JSON ({exc.msg}); format '{source.format}' "
                        f"expects one JSON object per line") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
    if source.format in ("jsonl", "classification"):
        text = str(_field(record, source.text_field, "text_field", "the text", path, line_no)).strip()
        if source.format == "jsonl" or not text:
            return text
        label = _field(record, source.label_field, "label_field", "the class", path, line_no)
        if label is None or isinstance(label, (dict, list)) or not str(label).strip():
            raise DataError(f"{path} line {line_no}: the label '{source.label_field}' is {json.dumps(label)}, "
                            f"not a class name; give every example a class (a string or number)")
        return {"text": text, "label": str(label).strip()}
    try:
        full = source.template.format_map(record).strip()
        if not source.answer_only:
            return full
        cut = source.template.rstrip().rindex("{" + source.answer_field + "}")
        prompt = source.template[:cut].format_map(record).lstrip()
    except KeyError as exc:
        raise DataError(f"{path} line {line_no}: template field {exc} is not in the record (fields: "
                        f"{', '.join(sorted(record))}); fix the stage's template") from None
    answer = full[len(prompt):]
    return {"prompt": prompt, "answer": answer} if answer.strip() else ""


def _field(record: dict, name: str, setting: str, what: str, path: Path, line_no: int):
    if name not in record:
        raise DataError(f"{path} line {line_no}: no field '{name}' (fields: {', '.join(sorted(record))}); "
                        f"set {setting} to the field holding {what}")
    return record[name]


def example_key(doc: str | dict) -> str:
    """The text an example is known by: what decides its split."""
    if isinstance(doc, str):
        return doc
    return doc["prompt"] + doc["answer"] if "prompt" in doc else doc["text"]


def load_splits(source: DataSource) -> dict[str, list[str]]:
    """Train / validation / test documents: given files, or derived from ``train`` by hashing."""
    if source.train is not None:
        train = read_documents(source, source.train)
    else:
        if source.format in ("classification",) or source.answer_only:
            raise DataError(f"documents: in-memory documents are plain text; a '{source.format}' stage "
                            f"needs a train file of JSON lines")
        train = [d.strip() for d in source.documents if d.strip()][: source.max_documents]
    given = {name: read_documents(source, getattr(source, name))
             for name in ("validation", "test") if getattr(source, name) is not None}
    fractions = {"validation": source.validation_fraction, "test": source.test_fraction}
    wanted = [name for name in ("validation", "test") if name not in given]
    if not wanted:
        return {"train": train, **given}
    splits = {"train": [], "validation": [], "test": []}
    for doc in train:
        u = int(hashlib.sha256(example_key(doc).encode()).hexdigest()[:12], 16) / 16**12
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


def tokenize_splits(splits: dict[str, list], tokenizer, block_size: int, where: str,
                    classes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every split as rows: packed token blocks (text), answer rows (answer-only Q&A) or class rows
    (classification: ``classes`` gives each class its index)."""
    blocks = {}
    for name, docs in splits.items():
        at = f"{where} ({name} split)"
        if docs and isinstance(docs[0], dict) and "label" in docs[0]:
            blocks[name] = class_rows(docs, tokenizer, block_size, classes or [], at)
        elif docs and isinstance(docs[0], dict):
            blocks[name] = answer_rows(docs, tokenizer, block_size, at)
        else:
            ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
            blocks[name] = pack(ids, tokenizer.eos_token_id, block_size, at)
    log.info("%s: %s", where, ", ".join(f"{k} {v.shape[0]} rows" for k, v in blocks.items()))
    return blocks


def answer_rows(examples: list[dict], tokenizer, block_size: int, where: str) -> np.ndarray:
    """One row per Q&A example: prompt, answer, EOS, padded; labels only on the answer and EOS.
    A prompt too long for the row loses its beginning; an example with no room for its answer is skipped."""
    prompts = tokenizer([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e["answer"] for e in examples], add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kept = []
    for prompt, answer in zip(prompts, answers):
        target = answer + [tokenizer.eos_token_id]
        if len(target) >= block_size or not prompt:
            continue
        kept.append((prompt[-(block_size - len(target)):], target))
    if not kept:
        raise DataError(f"{where}: no example fits a row of block_size={block_size} with its answer; "
                        f"raise block_size or shorten the answers")
    if len(kept) < len(examples):
        log.info("%s: %d of %d examples skipped (answer too long for block_size=%d)",
                    where, len(examples) - len(kept), len(examples), block_size)
    out = np.zeros(len(kept), dtype=rows.answer_dtype(block_size))
    out["input_ids"], out["labels"] = pad, rows.IGNORE
    for i, (prompt, target) in enumerate(kept):
        n = len(prompt) + len(target)
        out["input_ids"][i, :n] = prompt + target
        out["labels"][i, len(prompt):n] = target
    return out


def class_rows(examples: list[dict], tokenizer, block_size: int, classes: list[str], where: str) -> np.ndarray:
    """One row per example: its tokens (truncated to ``block_size``, padded), attention mask and class index."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({e["label"] for e in examples} - index.keys())
    if unknown:
        raise DataError(f"{where}: label '{unknown[0]}' is not a class of the training data (classes: "
                        f"{', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}); fix the label, add "
                        f"training examples of it, or list it in model.labels")
    encoded = tokenizer([e["text"] for e in examples], truncation=True, max_length=block_size)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = np.zeros(len(examples), dtype=rows.class_dtype(block_size))
    out["input_ids"] = pad
    for i, (ids, example) in enumerate(zip(encoded, examples)):
        out["input_ids"][i, :len(ids)] = ids
        out["attention_mask"][i, :len(ids)] = 1
        out["label"][i] = index[example["label"]]
    return out


def training_classes(splits: list[dict[str, list]]) -> list[str]:
    """The classes of every training split, sorted: the classifier's outputs, in order."""
    return sorted({e["label"] for s in splits for e in s["train"] if isinstance(e, dict) and "label" in e})
