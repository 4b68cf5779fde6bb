"""Interference control: a new adapter kept out of the input directions earlier stages changed.

    U_m     = top right singular vectors of module m's update so far (base_k − base_0)   update_subspaces
    penalty = λ · Σ_m ‖A_m U_mᵀ‖²_F      A_m: the new adapter's lora_A (r × in)         OrthogonalityPenalty

As in O-LoRA (Wang et al., 2023), an adapter whose A rows are orthogonal to the earlier updates'
input subspace barely changes what the model does on inputs those updates were made for. Here the
earlier updates are the merged stages themselves (any merge method), so the subspaces come from the
weights, not from kept adapters. λ is the ``orthogonality`` gene (0: off).
"""
from __future__ import annotations

import numpy as np
import torch

_PEFT_PREFIX, _A_SUFFIX = "base_model.model.", ".lora_A.default.weight"


def update_subspaces(first: dict[str, torch.Tensor], current: dict[str, torch.Tensor], transposed: bool,
                     energy: float = 0.9, max_rank: int = 16) -> dict[str, np.ndarray]:
    """{base weight name: U (q × in)} for every 2-D weight that moved since ``first``: the fewest right
    singular vectors of (current − first) holding ``energy`` of its squared norm, at most ``max_rank``.
    ``transposed``: weights stored (in, out), as transformers' Conv1D stores them."""
    out = {}
    for name, w in current.items():
        if w.ndim != 2 or name not in first:
            continue
        delta = w.float() - first[name].float()
        if not torch.any(delta != 0):
            continue
        if transposed:  # only adapted (Conv1D) weights move between stages
            delta = delta.T
        _, s, vh = torch.linalg.svd(delta, full_matrices=False)
        share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        q = min(max_rank, int(torch.searchsorted(share, torch.tensor(energy)).item()) + 1)
        out[name] = vh[:q].contiguous().numpy()
    return out


class OrthogonalityPenalty:
    """λ · Σ ‖A Uᵀ‖²_F over the adapter's lora_A weights that have an earlier update subspace."""

    def __init__(self, model, subspaces: dict[str, np.ndarray], weight: float):
        self.weight, self.pairs = float(weight), []
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith(_A_SUFFIX):
                base_name = name[len(_PEFT_PREFIX):-len(_A_SUFFIX)] + ".weight"
                if base_name in subspaces:
                    u = torch.from_numpy(np.asarray(subspaces[base_name])).to(p.device, torch.float32)
                    if u.shape[1] == p.shape[1]:
                        self.pairs.append((p, u))

    def __bool__(self) -> bool:
        return self.weight > 0 and bool(self.pairs)

    def __call__(self) -> torch.Tensor:
        return self.weight * sum(((a.float() @ u.T) ** 2).sum() for a, u in self.pairs)


def stage_subspaces(run_dir, stage_base, k: int) -> dict[str, np.ndarray]:
    """What stages 1..k−1 changed: ``stage_base`` against the run's ``models/stage-0`` (nothing at stage 1)."""
    from pathlib import Path

    from evolm.models import load_model, uses_conv1d

    if k == 1:
        return {}
    first, _ = load_model(str(Path(run_dir) / "models" / "stage-0"), torch.float32)
    current = {n: p.detach().cpu() for n, p in stage_base.named_parameters()}
    return update_subspaces({n: p.detach() for n, p in first.named_parameters()}, current, uses_conv1d(first))
