"""A stage's best adapters in PEFT's own format, loadable without evolm.

    adapters/stage-<k>/peft/<genome id>/adapter_config.json        PEFT's LoraConfig
    adapters/stage-<k>/peft/<genome id>/adapter_model.safetensors  the trained LoRA weights
    adapters/stage-<k>/peft/ranking.json                           the exported ids, best first

Each adapter was trained on the base of its stage, ``models/stage-<k-1>``:

    base = AutoModelForCausalLM.from_pretrained("results/<run>/models/stage-0")
    model = PeftModel.from_pretrained(base, "results/<run>/adapters/stage-1/peft/<genome id>")
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from evolm import safenames
from evolm.diskfull import raise_naming


def export_peft_adapter(directory: Path, hp: dict, adapter: dict[str, np.ndarray], base_dir: Path) -> None:
    """Write one adapter in PEFT's format; a kill mid-write leaves the previous export (or none)."""
    import torch
    from safetensors.torch import save_file

    from evolm.genome import lora_config

    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = lora_config(hp)
    config.base_model_name_or_path = str(Path(base_dir).resolve())
    try:
        config.save_pretrained(str(tmp))
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in adapter.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: half an export must not keep the space
        raise_naming(directory, exc)
        raise
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def export_stage_adapters(run_dir: Path, stage: int, ranked: list[tuple[str, dict, dict, dict]]) -> list[str]:
    """``ranked``: (genome id, hp, adapter arrays, objectives), best first. Returns the paths written,
    relative to ``run_dir``."""
    folder = Path(run_dir) / "adapters" / f"stage-{stage}" / "peft"
    folder.mkdir(parents=True, exist_ok=True)
    base_dir = Path(run_dir) / "models" / f"stage-{stage - 1}"
    paths = []
    for genome_id, hp, adapter, _ in ranked:  # the folder is replaced: its name must stay inside peft/
        export_peft_adapter(folder / safenames.genome_id(genome_id, folder), hp, adapter, base_dir)
        paths.append(str((folder / genome_id).relative_to(run_dir)))
    from evolm.jsonfiles import write_json

    write_json(folder / "ranking.json", [{"genome_id": g, "objectives": o, "path": p}
                                         for (g, _, _, o), p in zip(ranked, paths)])
    return paths
