"""Base models and tokenizers: a hub id or local directory, or a small model built from a config.

Built models get a byte-level BPE tokenizer trained on the run's own text, so nothing is
downloaded. Models travel to Ray workers as a ``ModelPayload`` (config dict + numpy weights),
which the object store shares without copying.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evolm.config import BuildConfig
from evolm.errors import ModelError

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``; it can encode any input, no unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=EOS)


def auto_class(classification: bool):
    """transformers' auto class of a causal LM, or of a sequence classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if classification else AutoModelForCausalLM


def is_classifier(model_or_config) -> bool:
    """Whether a model (or its config, or a config dict) is a sequence classifier."""
    if isinstance(model_or_config, torch.nn.Module):
        return type(model_or_config).__name__.endswith("ForSequenceClassification")
    cfg = model_or_config
    names = cfg.get("architectures") if isinstance(cfg, dict) else getattr(cfg, "architectures", None)
    return any(str(n).endswith("ForSequenceClassification") for n in names or [])


def label_config(classes: list[str]) -> dict:
    """The config fields of a classifier over ``classes`` (saved with the model, read by ``evolm predict``)."""
    return {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
            "label2id": {c: i for i, c in enumerate(classes)}}


def build_model(build: BuildConfig, vocab_size: int, block_size: int, seed: int, classes: list[str] | None = None):
    """A freshly initialised model of the given family (weights seeded): a causal LM, or a sequence
    classifier over ``classes``."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if build.family == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=build.n_embd, num_hidden_layers=build.n_layer,
                         num_attention_heads=build.n_head, intermediate_size=4 * build.n_embd,
                         max_position_embeddings=block_size, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, pad_token_id=0)
    elif build.family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=build.n_embd,
                         n_layer=build.n_layer, n_head=build.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    else:
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=build.n_embd, intermediate_size=4 * build.n_embd,
                          num_hidden_layers=build.n_layer, num_attention_heads=build.n_head,
                          num_key_value_heads=build.n_head, max_position_embeddings=block_size,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if classes is not None:
        cfg.update(label_config(classes))
        cfg.architectures = [f"{type(cfg).__name__.removesuffix('Config')}ForSequenceClassification"]
    torch.manual_seed(seed)
    return auto_class(classes is not None).from_config(cfg)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` on ``device``: auto is bfloat16 on a GPU that supports it, else float32."""
    cuda = device.type == "cuda"
    if name == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name == "float16" and not cuda:
        raise ModelError("model.dtype: float16 needs a GPU (the CPU has no fast float16 kernels); "
                         "use float32 or bfloat16")
    if name == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise ModelError("model.dtype: this GPU does not support bfloat16; use float16 or float32")
    return DTYPES[name]


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, classes: list[str] | None = None,
               seed: int = 0):
    """Model (in ``dtype``) and tokenizer from a local directory, or from the hub where the network allows.

    With ``classes``: a sequence classifier over them; a model without a classifier head (an encoder,
    a causal LM) gets a new one, initialised from ``seed``. Without: a causal LM, or the classifier
    the directory holds."""
    from transformers import AutoConfig, AutoTokenizer

    local = Path(name_or_path).expanduser()
    looks_local = local.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise ModelError(f"model.name_or_path: {local} is not a model directory (no config.json); "
                         f"give a directory saved with save_pretrained or a hub id")
    where = str(local) if looks_local else name_or_path
    try:
        saved = AutoConfig.from_pretrained(where)
        classify = classes is not None or is_classifier(saved)
        extra = {}
        if classes is not None:
            if is_classifier(saved) and saved.num_labels != len(classes):
                raise ModelError(f"model.name_or_path: its classifier has {saved.num_labels} classes, the data "
                                 f"has {len(classes)}; use a model without a classifier head (it gets a new one) "
                                 f"or data with its classes")
            extra = label_config(classes)
            torch.manual_seed(seed)  # a new head's weights
        model = auto_class(classify).from_pretrained(where, dtype=dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        hint = " (HF_HUB_OFFLINE is set: use a local directory)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelError(f"model.name_or_path: cannot load '{name_or_path}'{hint}: {str(exc).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None and tokenizer.sep_token_id is not None:  # an encoder's end of text
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"model.name_or_path: the tokenizer of '{name_or_path}' has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if classify and model.config.pad_token_id is None:  # a decoder classifier finds each row's end by it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_model(model, tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def family_and_layers(model) -> tuple[str, int]:
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not n_layers:
        raise ModelError(f"cannot tell the number of transformer blocks of model type '{cfg.model_type}'")
    return cfg.model_type, int(n_layers)


def linear_layer_names(model) -> list[tuple[str, bool]]:
    """(leaf name, inside attention) of each kind of linear layer in the transformer blocks: what LoRA
    can target, in the order the model holds them (``lm_head`` and embeddings are outside the blocks)."""
    seen = {}
    for path, module in model.named_modules():
        parts = path.split(".")
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if is_linear and any(p.isdigit() for p in parts[:-1]):
            in_attention = any("attn" in p.lower() or "attention" in p.lower() for p in parts[:-1])
            seen.setdefault(parts[-1], in_attention)
    return list(seen.items())


def uses_conv1d(model) -> bool:
    """Whether the model's linear layers are transformers' Conv1D (weights stored transposed)."""
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


@dataclass
class ModelPayload:
    """A model as plain data: its config and its weights as numpy arrays (zero-copy in Ray).

    ``buffers``: the non-persistent buffers, which ``state_dict`` leaves out (Llama's rotary
    ``inv_freq``): a model rebuilt on the meta device would otherwise keep them without data.
    """

    config: dict
    weights: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, model) -> "ModelPayload":
        state = model.state_dict()
        buffers = {k: _to_numpy(v) for k, v in model.named_buffers(remove_duplicate=False) if k not in state}
        config = model.config.to_dict() | {"architectures": [type(model).__name__]}  # what to rebuild
        return cls(config, {k: _to_numpy(v) for k, v in state.items()}, buffers)

    def build(self):
        from transformers import AutoConfig

        cfg = dict(self.config)
        cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            model = auto_class(is_classifier(cfg)).from_config(cfg)
        state = {k: _from_numpy(v) for k, v in self.weights.items()}
        model.load_state_dict(state, assign=True, strict=True)
        for name, value in self.buffers.items():
            owner, _, leaf = name.rpartition(".")
            try:
                module = model.get_submodule(owner)
            except AttributeError:
                module = None
            if module is None or leaf not in module._buffers:
                raise ModelError(f"the model payload carries buffer '{name}', which the rebuilt "
                                 f"{cfg.model_type} model does not have")
            module._buffers[leaf] = _from_numpy(value)  # stays non-persistent
        model.tie_weights()
        tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        empty = [n for n, t in tensors if t.is_meta]
        if empty:
            raise ModelError(f"rebuilding the {cfg.model_type} model left {len(empty)} tensor(s) without data "
                             f"(on the meta device): {', '.join(empty[:5])}")
        return model.eval()


# numpy has no bfloat16: such tensors travel as their raw 16 bits in a structured dtype that names them.
_BF16 = np.dtype([("bfloat16", np.uint16)])


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.view(torch.uint16).numpy().view(_BF16) if t.dtype == torch.bfloat16 else t.numpy()


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """A tensor over the array's memory, no copy: on a Ray worker that is the object store's one copy
    of the base, shared by every worker of the node. Nothing writes to a base's weights on a worker
    (adapters are separate tensors; the frozen base gets no gradient), so read-only memory is fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if a.dtype == _BF16:
            return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(a)
