"""Weight inheritance: a child's LoRA adapter starts from its parent's trained one.

As in population-based training's exploit step, a child made by mutation or crossover need not
learn from scratch. For every adapted module the child shares with its parent:

    same rank:      A' = A,  B' = B * (s_parent / s_child)          (s = lora_alpha / r)
    other rank:     U S V^T = svd(s_parent * B A);  k = min(r_child, rank)
                    B'[:, :k] = U_k sqrt(S_k / s_child),  A'[:k] = sqrt(S_k / s_child) V_k^T

so the child's update ``s_child * B' A'`` equals the parent's (exactly, or its best rank-r_child
approximation when the child's rank is smaller). A larger child keeps its fresh rows of A and
zero columns of B beyond k, which add nothing until trained. Modules the parent did not adapt
(other layers or target modules) keep the child's fresh initialisation. Modules trained in full
(a classifier's head) are copied.
"""
from __future__ import annotations

import numpy as np
import torch

from evolm.genome import Hyperparameters


def resize_pair(a: np.ndarray, b: np.ndarray, s_parent: float, s_child: float,
                child_a: np.ndarray, child_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The child's (A, B) for one module from the parent's; ``child_a`` / ``child_b`` are its fresh ones."""
    r_child = child_a.shape[0]
    if a.shape[0] == r_child:
        return a.copy(), (b * (s_parent / s_child)).astype(b.dtype)
    delta = s_parent * (b.astype(np.float64) @ a.astype(np.float64))
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    k = min(r_child, int(np.sum(s > s[0] * 1e-12)) if s.size and s[0] > 0 else 0)
    new_a, new_b = child_a.copy(), np.zeros_like(child_b)
    root = np.sqrt(s[:k] / s_child)
    new_b[:, :k] = u[:, :k] * root
    new_a[:k] = root[:, None] * vt[:k]
    return new_a.astype(child_a.dtype), new_b.astype(child_b.dtype)


def inherit_adapter(model, parent: dict[str, np.ndarray], parent_hp, child_hp) -> dict:
    """Load the parent's adapter into the child's fresh PEFT ``model`` in place; returns what was taken."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    child = {k: v.detach().cpu().float().numpy() for k, v in get_peft_model_state_dict(model).items()}
    parent_hp, child_hp = Hyperparameters.of(parent_hp), Hyperparameters.of(child_hp)
    s_parent, s_child = parent_hp.scaling, child_hp.scaling
    new, shared, fresh = {}, 0, 0
    for key_a in (k for k in child if k.endswith("lora_A.weight")):
        key_b = key_a[: -len("lora_A.weight")] + "lora_B.weight"
        if key_a in parent and key_b in parent and parent[key_a].shape[1] == child[key_a].shape[1]:
            new[key_a], new[key_b] = resize_pair(parent[key_a], parent[key_b], s_parent, s_child,
                                                 child[key_a], child[key_b])
            shared += 1
        else:
            fresh += 1
    for key in (k for k in child if ".lora_" not in k):  # trained in full: a classifier's head
        if key in parent and parent[key].shape == child[key].shape:
            new[key] = parent[key].copy()
            shared += 1
    if new:
        loaded = set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in new.items()})
        if loaded.unexpected_keys:  # PEFT renamed something: say so instead of training from scratch silently
            raise ValueError(f"inherited adapter keys do not fit the child model: {loaded.unexpected_keys[:3]}")
    return {"modules_shared": shared, "modules_fresh": fresh,
            "rank": [int(parent_hp.r), int(child_hp.r)], "resized": int(parent_hp.r) != int(child_hp.r)}
