"""Winners -> new base weights.

``best``: the stage winner's adapter is loaded onto a copy of the base and folded in with PEFT's
``merge_and_unload`` (W + (alpha / r) * B @ A, transposed for GPT-2's Conv1D layers).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from evolm.genome import lora_config


def attach_adapter(base_model, hp: dict, adapter: dict[str, np.ndarray]):
    """A PEFT model: a copy of ``base_model`` with the given trained adapter weights."""
    from peft import get_peft_model, set_peft_model_state_dict

    model = get_peft_model(copy.deepcopy(base_model), lora_config(hp))
    result = set_peft_model_state_dict(model, {k: torch.from_numpy(np.array(v)) for k, v in adapter.items()})
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter weights do not fit the genome's LoRA config: {unexpected[:3]}")
    return model.eval()


def merge_best(base_model, hp: dict, adapter: dict[str, np.ndarray]):
    """The base with the winner's adapter folded into its weights (a plain transformers model)."""
    return attach_adapter(base_model, hp, adapter).merge_and_unload().eval()
