"""fine_tune() and evaluate(): training and measuring a model on token blocks.

No Ray, no files. The same loop serves LoRA evaluations and the full pretraining stage.
Everything random comes from the given seed: batch order from a private generator, LoRA's
initialisation and dropout from torch's global generator, which ``adapter_on`` seeds (so a caller's
global torch RNG state changes; a paused training saves and restores it).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from evolm.genome import Hyperparameters, lora_config
from evolm.privacy import private_training
from evolm.replay import replay_mix
from evolm.rows import IGNORE, model_inputs


def pick_device(use_gpu: bool) -> torch.device:
    """A GPU when asked for and present, made deterministic (a resumed run then equals an
    uninterrupted one there too); else the CPU."""
    if not (use_gpu and torch.cuda.is_available()):
        return torch.device("cpu")
    # cuBLAS needs a fixed workspace for deterministic results; it must be set before its first use.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    return torch.device("cuda")


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def lr_schedule(hp, steps: int, optimizer):
    """The learning-rate factor of each step: transformers' ``get_scheduler`` with ``warmup_ratio``."""
    from transformers import get_scheduler

    hp = Hyperparameters.of(hp)
    warmup = int(round(hp.warmup_ratio * steps))
    return get_scheduler(hp.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                         num_training_steps=steps).lr_lambdas[0]


def _backward(model, batch: np.ndarray, device: torch.device, parts: int) -> float:
    """Forward and backward of one batch of rows, in ``parts`` micro-batches (gradient accumulation:
    less activation memory, the same gradient up to rounding; answer rows of different lengths weigh
    each micro-batch's mean by its rows, not its answer tokens); returns the batch's mean loss."""
    if parts <= 1:
        with _autocast(device):
            loss = model(**model_inputs(batch, device)).loss
        if math.isfinite(loss.item()):
            loss.backward()
        return loss.item()
    total = 0.0
    for chunk in np.array_split(batch, min(parts, len(batch))):
        with _autocast(device):
            loss = model(**model_inputs(chunk, device)).loss
        if not math.isfinite(loss.item()):
            return loss.item()
        (loss * (len(chunk) / len(batch))).backward()
        total += loss.item() * len(chunk) / len(batch)
    return total


def train_loop(model, blocks: np.ndarray, hp: Hyperparameters | dict, seed: int, device: torch.device,
               replay: np.ndarray | None = None, resume: dict | None = None,
               stop_at: int | None = None, penalty=None, privacy_history: list | None = None) -> dict:
    """AdamW over ``max_steps`` random batches of ``blocks``, the learning rate following
    ``lr_scheduler_type`` (transformers' schedulers; default linear warmup over ``warmup_ratio``, then
    linear decay), each batch in ``gradient_accumulation_steps`` micro-batches.

    With ``replay`` blocks (earlier stages) and ``hp.replay_ratio`` > 0, that share of every
    batch comes from ``replay`` (``evolm.replay.mix_batch_indices``); otherwise nothing changes.
    ``stop_at`` pauses after that many steps (the schedule still spans ``max_steps``) and the
    returned curve carries ``state``: what ``resume`` needs to go on exactly as if never paused
    (successive halving). ``penalty()`` (optional): a term added to every step's loss (its gradient
    only; the curve reports the model's loss). With ``hp.privacy`` every step is DP-SGD's (per-sample
    clipping and noise, ``evolm.privacy``) and the curve says the ε spent, ``privacy_history`` (an
    inherited adapter's trainings) included. Returns a summary of the training curve; stops early
    when the loss stops being finite.
    """
    params, hp = {n: p for n, p in model.named_parameters() if p.requires_grad}, Hyperparameters.of(hp)
    steps, batch = int(hp.max_steps), int(hp.per_device_train_batch_size)
    stop = steps if stop_at is None else max(1, min(int(stop_at), steps))
    lr = hp.learning_rate
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=hp.weight_decay)
    schedule, parts = lr_schedule(hp, steps, optimizer), int(hp.gradient_accumulation_steps)
    generator = torch.Generator().manual_seed(seed)
    mix = replay_mix(blocks, replay, float(hp.replay_ratio), batch, steps, seed)  # None: no replay
    data = blocks if mix is None else mix[0]
    start, losses = 0, []
    if resume is not None:
        start, losses = _restore(resume, params, optimizer, generator, device)
    private = private_training(model, hp, seed, len(blocks), 0 if mix is None else len(replay), resume,
                               privacy_history)  # None: privacy off
    backward = _backward if private is None else private.backward
    model.train()
    for step in range(start, stop):
        idx = torch.randint(len(data), (batch,), generator=generator).numpy() if mix is None else mix[1][step]
        losses.append(backward(model, data[idx], device, parts))
        if not math.isfinite(losses[-1]):
            break
        if penalty:
            penalty().backward()
        if private is None:  # with privacy the per-sample clip takes this one's place
            torch.nn.utils.clip_grad_norm_(list(params.values()), hp.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    curve = {"steps": len(losses), "first": losses[0], "last": losses[-1],
             "min": min(losses), "tail_mean": float(np.mean(tail))}
    if len(losses) < steps and math.isfinite(losses[-1]):
        curve["state"] = _snapshot(len(losses), losses, params, optimizer, generator, device)
    if private is not None:
        if "state" in curve:
            curve["state"] |= private.state()
        curve |= private.finish(len(losses))
    return curve


def _snapshot(step: int, losses: list[float], params: dict, optimizer, generator,
              device: torch.device) -> dict[str, np.ndarray]:
    """Everything a paused training needs, as numpy arrays (small on the wire, safetensors on disk)."""
    state = {"step": np.array([step], dtype=np.int64), "losses": np.array(losses, dtype=np.float64),
             "rng.batch": generator.get_state().numpy().copy(), "rng.torch": torch.get_rng_state().numpy().copy()}
    if device.type == "cuda":  # dropout on a GPU draws from the GPU's generator
        state["rng.cuda"] = torch.cuda.get_rng_state(device).numpy().copy()
    for name, p in params.items():
        state[f"param.{name}"] = p.detach().cpu().numpy().copy()
        moments = optimizer.state[p]
        state[f"exp_avg.{name}"] = moments["exp_avg"].detach().cpu().numpy().copy()
        state[f"exp_avg_sq.{name}"] = moments["exp_avg_sq"].detach().cpu().numpy().copy()
    return state


def _restore(state: dict, params: dict, optimizer, generator, device) -> tuple[int, list[float]]:
    step = int(state["step"][0])
    missing = [n for n in params if f"param.{n}" not in state]
    if missing:
        raise ValueError(f"the saved training state does not match this adapter (missing {missing[0]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(state[f"param.{name}"]))
            # AdamW's default (not fused, not capturable) path keeps ``step`` as a float32 CPU scalar
            optimizer.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32),
                                  "exp_avg": torch.from_numpy(state[f"exp_avg.{name}"].copy()).to(p.device),
                                  "exp_avg_sq": torch.from_numpy(state[f"exp_avg_sq.{name}"].copy()).to(p.device)}
    generator.set_state(torch.from_numpy(state["rng.batch"].copy()))
    torch.set_rng_state(torch.from_numpy(state["rng.torch"].copy()))  # dropout continues its own stream
    if device.type == "cuda" and "rng.cuda" in state:
        torch.cuda.set_rng_state(torch.from_numpy(state["rng.cuda"].copy()), device)
    return step, [float(v) for v in state["losses"]]


@torch.no_grad()
def evaluate(model, blocks: np.ndarray, batch_size: int, max_batches: int | None = None,
             device: torch.device = torch.device("cpu")) -> float:
    """Mean loss over (the first ``max_batches`` batches of) ``blocks``: next-token loss on token
    blocks, on the labelled tokens of answer rows, cross-entropy on classification rows."""
    model.eval()
    total, count = 0.0, 0
    for n, start in enumerate(range(0, len(blocks), batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        batch = blocks[start:start + batch_size]
        with _autocast(device):
            loss = model(**model_inputs(batch, device)).loss
        weight = _targets(batch)
        total += loss.item() * weight
        count += weight
    return total / count if count else float("nan")


def _targets(batch: np.ndarray) -> int:
    """How many predictions a batch's mean loss averages over (rows, for token blocks: all alike)."""
    if batch.dtype.names is None or "label" in batch.dtype.names:
        return len(batch)
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@contextmanager
def adapter_on(base_model, hp: dict, seed: int, device: torch.device):
    """``base_model`` with a fresh LoRA adapter injected in place (no copy of the base): the PEFT
    model. On exit the adapter is removed again (``unload``), leaving the base's weights as they were:
    the adapter never writes into them. LoRA's A matrices are drawn from torch's global generator,
    seeded here."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    hp = Hyperparameters.of(hp)
    model = get_peft_model(base_model, lora_config(hp)).to(device)
    if hp.gradient_checkpointing:  # recompute activations in the backward pass: less memory
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Modules trained in full (a classifier's head) are wrapped; unload() would leave the trained copy
    # in the base, so the base gets its own module back.
    originals = [(name.removeprefix("base_model.model."), m.original_module) for name, m in model.named_modules()
                 if hasattr(m, "original_module") and hasattr(m, "modules_to_save")]
    try:
        yield model
    finally:
        model.unload()
        for path, original in originals:
            parent, _, leaf = path.rpartition(".")
            setattr(base_model.get_submodule(parent), leaf, original)
        if hp.gradient_checkpointing:
            base_model.gradient_checkpointing_disable()


def fine_tune(model, blocks: np.ndarray, hp: dict, seed: int, device: torch.device,
              replay: np.ndarray | None = None, resume: dict | None = None, stop_at: int | None = None,
              inherit: dict | None = None, subspaces: dict | None = None) -> dict:
    """Train the adapter of ``model`` (from ``adapter_on``); returns the training curve.

    ``inherit`` (``{"adapter": arrays, "hp": parent hyperparameters}``): start from a parent's
    trained adapter instead of a fresh one (``evolm.inherit``); ``curve["inherited"]`` says what was
    taken. Its ``privacy`` (the parent's ``curve["privacy"]``): the parent's private trainings, which
    the child's ε composes with its own. ``resume`` / ``stop_at``: see ``train_loop``. ``subspaces``:
    earlier stages' update subspaces, for the ``orthogonality`` gene (``evolm.interference``).
    """
    from evolm.inherit import inherit_adapter
    from evolm.interference import OrthogonalityPenalty

    inherited, history = None, None
    if inherit is not None and resume is None:  # a resumed training already holds its own weights
        inherited = {k: v for k, v in inherit.items() if k not in ("adapter", "hp", "privacy")}  # who it came from
        inherited |= inherit_adapter(model, inherit["adapter"], inherit["hp"], hp)
        history = (inherit.get("privacy") or {}).get("history")
    penalty = OrthogonalityPenalty(model, subspaces or {}, Hyperparameters.of(hp).orthogonality)
    curve = train_loop(model, blocks, hp, seed, device, replay, resume, stop_at, penalty, history)
    if inherited is not None:
        curve["inherited"] = inherited
    return curve


def evaluate_genome(base_model, blocks: dict[str, np.ndarray], hp: dict, seed: int, training: dict,
                    device: torch.device, resume: dict | None = None, stop_at: int | None = None,
                    inherit: dict | None = None, objectives: list | None = None,
                    subspaces: dict | None = None, tokenizer=None, validation: list | None = None) -> dict:
    """One evaluation: fine-tune an adapter on ``base_model`` (in place, removed afterwards), then
    measure the objectives on validation splits.

    The adapter's weights come back as numpy arrays (small), so the driver can merge the winner
    without training it again. ``blocks["replay"]`` (optional): earlier stages' blocks to replay;
    ``blocks["retention"]`` (optional): earlier stages' validation blocks, for ``retention_loss``.
    ``objectives``: ``evolm.objectives.Objective`` objects measured besides the built-in ones; they see
    ``tokenizer`` and ``validation`` (the stage's validation examples as read).
    With ``stop_at`` below ``max_steps`` the result is a rung of successive halving: its ``state``
    lets a later call (``resume``) train on from there. ``steps``: steps this adapter has trained,
    earlier rungs included (inherited training is not counted). ``merge_scale`` below 1 scales the
    trained adapter's B before it is measured and returned (a paused training's ``state`` is unscaled).
    """
    from peft import get_peft_model_state_dict

    from evolm.objectives import EvalContext, measure_all

    start = time.perf_counter()
    with adapter_on(base_model, hp, seed, device) as model:
        curve = fine_tune(model, blocks["train"], hp, seed, device, blocks.get("replay"), resume, stop_at, inherit,
                          subspaces)
        trained = time.perf_counter()
        state, inherited = curve.pop("state", None), curve.pop("inherited", None)
        _scale_adapter(model, Hyperparameters.of(hp).merge_scale)
        adapter = {k: v.detach().cpu().float().numpy() for k, v in get_peft_model_state_dict(model).items()}
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ctx = EvalContext(model, blocks, training, device, n_params, math.isfinite(curve["last"]), tokenizer,
                          validation or [], curve)
        objectives = measure_all(objectives or [], ctx)
    return {"objectives": objectives, "curve": curve, "adapter": adapter,
            "adapter_params": n_params, "steps": curve["steps"], "state": state, "inherited": inherited,
            "train_seconds": trained - start, "eval_seconds": time.perf_counter() - trained}


def _scale_adapter(model, scale: float) -> None:
    """ΔW = scaling · B·A becomes scale · ΔW (the ``merge_scale`` gene)."""
    if scale == 1.0:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.mul_(scale)
