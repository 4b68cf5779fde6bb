"""Winners -> new base weights.

Every strategy works on **dense weight deltas**. A LoRA adapter on a linear layer changes its weight
by ΔW = (lora_alpha / r) · B @ A (transposed for GPT-2's Conv1D, whose weight is stored (in, out)).
Adapters of different ranks and different layer masks all become deltas shaped like the base
weights, keyed by the base parameter name, and are combined entry by entry:

    best             the first winner alone, folded in with PEFT's ``merge_and_unload``
    task_arithmetic  Σ_k w_k ΔW_k
    ties             trim each ΔW_k to its largest-magnitude entries, elect a sign per entry,
                     weighted mean of the entries that agree with it (TIES-merging)
    dare             drop entries at random, rescale the survivors by 1 / density, Σ_k w_k ΔW_k
    dare_ties        DARE's drop and rescale, then TIES's sign election and disjoint mean

A module trained in full with the adapter (a classifier's head, PEFT's ``modules_to_save``) has the
delta W_trained − W_base. A key missing from an adapter (a module it does not adapt) counts as a zero delta. PEFT's
``add_weighted_adapter`` combines A and B separately, which is not a combination of the deltas
and needs equal ranks; hence the dense deltas here.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from evolm.genome import Hyperparameters, lora_config
from evolm.registry import MERGE_STRATEGIES

log = logging.getLogger(__name__)
_PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


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


# ----- adapters -> dense deltas ---------------------------------------------------------------
def lora_deltas(base_model, hp: dict, adapter: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """ΔW = (lora_alpha / r) · B @ A of every adapted module, keyed by the base parameter name.

    ``adapter`` is PEFT's state dict (``base_model.model.<module>.lora_A.weight`` / ``lora_B``),
    as ``evaluate_genome`` returns it. Each delta is float32 and shaped like the base weight
    (transposed when ``hp.fan_in_fan_out``, i.e. GPT-2's Conv1D).
    """
    params, hp = dict(base_model.named_parameters()), Hyperparameters.of(hp)
    scale = hp.scaling
    deltas = {}
    lora = {k: v for k, v in adapter.items() if any(k.endswith(s) for s in _LORA_SUFFIXES)}
    for key in adapter.keys() - lora.keys():  # trained in full (a classifier's head)
        name = key.removeprefix(_PEFT_PREFIX)
        if name not in params or tuple(np.shape(adapter[key])) != tuple(params[name].shape):
            raise ValueError(f"adapter key '{key}' is neither a LoRA A/B weight nor a weight of the base model; "
                             f"only LoRA on linear layers and whole modules can be merged as dense deltas")
        deltas[name] = torch.as_tensor(np.asarray(adapter[key])).float() - params[name].detach().float().cpu()
    for name, (a, b) in _lora_pairs(lora).items():
        if name not in params:
            raise ValueError(f"adapter module for '{name}' has no weight of that name in the base model")
        if a.shape[0] != int(hp.r) or b.shape[1] != int(hp.r):
            raise ValueError(f"'{name}': lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have "
                             f"rank r={hp.r} of the genome")
        delta = scale * (b @ a)  # (out, in), as torch.nn.Linear stores it
        if hp.fan_in_fan_out:
            delta = delta.T  # Conv1D stores (in, out)
        if delta.shape != params[name].shape:
            raise ValueError(f"'{name}': delta {tuple(delta.shape)} does not match the base weight "
                             f"{tuple(params[name].shape)}; is fan_in_fan_out set right for this model?")
        deltas[name] = delta.contiguous()
    return deltas


def _lora_pairs(adapter: dict[str, np.ndarray]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{base weight name: (A, B)} from PEFT's adapter state dict."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"adapter key '{key}' is not a LoRA A/B weight; only plain LoRA on linear "
                             f"layers can be merged as dense deltas")
        module = key[: -len(suffix)].removeprefix(_PEFT_PREFIX)
        parts.setdefault(module + ".weight", {})[_LORA_SUFFIXES[suffix]] = torch.as_tensor(np.asarray(value)).float()
    missing = [name for name, ab in parts.items() if len(ab) != 2]
    if missing:
        raise ValueError(f"adapter has lora_A without lora_B (or the reverse) for {missing[:3]}")
    return {name: (ab["A"], ab["B"]) for name, ab in parts.items()}


def apply_deltas(base_model, deltas: dict[str, torch.Tensor]):
    """A copy of ``base_model`` whose weights are W + ΔW (a plain transformers model)."""
    model = copy.deepcopy(base_model)
    params = dict(model.named_parameters())
    unknown = sorted(set(deltas) - set(params))
    if unknown:
        raise ValueError(f"deltas for parameters the model does not have: {unknown[:3]}")
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta.to(dtype=params[name].dtype, device=params[name].device))
    return model.eval()


# ----- combining deltas -----------------------------------------------------------------------
def task_arithmetic(deltas_list: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_k w_k ΔW_k for every key present in any adapter (missing = zero)."""
    _check_weights(deltas_list, weights)
    merged = {}
    for name in _union_keys(deltas_list):
        stacked, w = _stack(deltas_list, weights, name)
        merged[name] = (w * stacked).sum(dim=0)
    return merged


def ties(deltas_list: list[dict], weights: list[float], density: float) -> dict[str, torch.Tensor]:
    """TIES-merging: trim (top-``density`` by magnitude), elect signs, weighted disjoint mean.

    For each entry: the elected sign is that of Σ_k w_k t_k over the trimmed deltas t_k (a zero sum
    elects +); the result is Σ_k w_k t_k / Σ_k w_k over the adapters k whose t_k is non-zero and has
    the elected sign, or 0 where none has. Weights must be positive; only their ratios matter.
    """
    _check_weights(deltas_list, weights, positive=True)
    _check_density(density)
    merged = {}
    for name in _union_keys(deltas_list):
        stacked, w = _stack(deltas_list, weights, name)
        trimmed = torch.stack([magnitude_trim(t, density) for t in stacked])
        merged[name] = disjoint_mean(trimmed, w)
    return merged


def dare(deltas_list: list[dict], weights: list[float], density: float, seed: int,
         use_ties: bool = False) -> dict[str, torch.Tensor]:
    """DARE: keep each entry with probability ``density`` and rescale it by 1 / density, then
    combine by weighted sum (``use_ties=False``) or by TIES's sign election and disjoint mean.

    The keep masks come from one ``torch.Generator`` seeded with ``seed``, drawn adapter by adapter
    (list order) and, within an adapter, key by key in sorted order: ``torch.rand(shape) < density``.
    """
    _check_weights(deltas_list, weights, positive=use_ties)
    _check_density(density)
    generator = torch.Generator().manual_seed(int(seed))
    dropped = [{name: random_drop(d[name], density, generator) for name in sorted(d)} for d in deltas_list]
    if use_ties:
        merged = {}
        for name in _union_keys(dropped):
            stacked, w = _stack(dropped, weights, name)
            merged[name] = disjoint_mean(stacked, w)
        return merged
    return task_arithmetic(dropped, weights)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its k = int(density · numel) largest-magnitude entries set to zero
    (PEFT's ``magnitude_based_pruning``)."""
    from peft.utils.merge_utils import magnitude_based_pruning

    return delta.clone() if density >= 1.0 else magnitude_based_pruning(delta, density)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop-and-rescale: each entry survives with probability ``density``, times 1 / density.
    Not PEFT's ``random_pruning``, which draws from torch's global generator: a seeded generator of
    its own makes a merge the same whatever else drew random numbers before it (exact resume)."""
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES's elect + disjoint merge over ``stacked`` (adapters on dim 0) with per-adapter ``weights``.
    PEFT's ``ties`` elects signs on the unweighted sum and divides by the number of agreeing adapters,
    so its result scales with the weights; here the weights only set each adapter's share (a weighted
    mean), as docs/design.md defines TIES."""
    weighted = weights * stacked
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (stacked != 0) & (torch.sign(stacked) == elected)
    numerator = (weighted * agree).sum(dim=0)
    denominator = (weights * agree).sum(dim=0)
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), torch.zeros_like(numerator))


# ----- the merge of a stage -------------------------------------------------------------------
# A merge strategy: (base_model, winners [(hp, adapter), ...] best first, weights, density, seed) -> model.
# ``merge.method: auto`` tries every registered strategy.


def merge_winners(base_model, winners: list[tuple[dict, dict]], strategy: str, weights: list[float] | None = None,
                  density: float = 0.5, seed: int = 0):
    """The next base: ``winners`` ([(hp, adapter), ...], best first) merged into ``base_model`` by
    the strategy registered as ``strategy``. ``weights`` default to 1 / len(winners) each (the mean
    delta); ``density`` is for ties / dare / dare_ties, ``seed`` for dare / dare_ties."""
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"merge strategy '{strategy}' is unknown; use one of {', '.join(MERGE_STRATEGIES.names())}")
    if not winners:
        raise ValueError("merge_winners needs at least one (hp, adapter) winner")
    weights = [1.0 / len(winners)] * len(winners) if weights is None else list(weights)
    return MERGE_STRATEGIES.get(strategy)(base_model, winners, weights, density, seed)


@MERGE_STRATEGIES.register("best")
def _best(base_model, winners, weights, density, seed):
    return merge_best(base_model, *winners[0])


def _dense_strategy(name: str, combine):
    """A strategy that combines the winners' dense deltas with ``combine(deltas_list, weights, density, seed)``."""
    def strategy(base_model, winners, weights, density, seed):
        deltas_list = [lora_deltas(base_model, hp, adapter) for hp, adapter in winners]
        merged = combine(deltas_list, weights, density, seed)
        log.info("merged %d adapters (%s) into %d weight matrices", len(winners), name, len(merged))
        return apply_deltas(base_model, merged)

    MERGE_STRATEGIES.register(name, strategy)


_dense_strategy("task_arithmetic", lambda d, w, density, seed: task_arithmetic(d, w))
_dense_strategy("ties", lambda d, w, density, seed: ties(d, w, density))
_dense_strategy("dare", lambda d, w, density, seed: dare(d, w, density, seed, use_ties=False))
_dense_strategy("dare_ties", lambda d, w, density, seed: dare(d, w, density, seed, use_ties=True))


def _union_keys(deltas_list: list[dict]) -> list[str]:
    return sorted({name for d in deltas_list for name in d})


def _stack(deltas_list: list[dict], weights: list[float], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The deltas of ``name`` stacked on dim 0 (zeros where an adapter lacks it) and the weights
    shaped to broadcast against them."""
    shape = next(d[name].shape for d in deltas_list if name in d)
    stacked = torch.stack([d[name].float() if name in d else torch.zeros(shape) for d in deltas_list])
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * len(shape)))
    return stacked, w


def _check_weights(deltas_list: list[dict], weights: list[float], positive: bool = False) -> None:
    if not deltas_list:
        raise ValueError("nothing to merge: the list of deltas is empty")
    if len(weights) != len(deltas_list):
        raise ValueError(f"merge weights: {len(weights)} given for {len(deltas_list)} adapters; give one each")
    if not all(np.isfinite(w) for w in weights) or (positive and not all(w > 0 for w in weights)):
        raise ValueError(f"merge weights must be finite{' and > 0' if positive else ''}. Current value: {weights}")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"merge density must be in (0, 1]. Current value: {density}")
