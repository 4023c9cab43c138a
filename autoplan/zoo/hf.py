"""Hugging Face Transformers models from a `config.json`: `hf:PATH` in the CLI and `zoo.build`.

    >>> job = build_hf("hf:examples/hf/llama3-8b.json", batch_size=8, device="meta")   # doctest: +SKIP
    >>> type(job.module).__name__, tuple(job.example_inputs[0].shape)                 # doctest: +SKIP
    ('LlamaForCausalLM', (8, 2048))

PATH is a `config.json` or a folder holding one (what `save_pretrained` writes). The model
is built with `from_config` (random init, no weights, no network) on the given device, in
float32 with `use_cache=False`; the class is the config's `architectures[0]`, else the first
of causal LM, masked LM, seq2seq LM that takes the config. Inputs are token ids of
`seq_len` (default: the config's `max_position_embeddings`, at most DEFAULT_MAX_SEQ_LEN);
an encoder-decoder model also gets an all-ones attention mask and decoder ids. The loss is
the mean cross entropy of `output.logits` against the next tokens (masked and seq2seq LMs:
against random tokens).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from autoplan.errors import AutoplanError

DEFAULT_MAX_SEQ_LEN = 2048
"""Sequence length of `hf:` models whose config allows more (override with seq_len / --seq-len)."""
_TASKS = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM")


def logits_loss(output, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of a Hugging Face output's logits (B, T, V) against targets (B, T)."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def load_hf_config(path_text: str):
    """The transformers config a `config.json` (or a folder holding one) describes; an
    AutoplanError names the file and the field that is wrong."""
    try:
        import transformers
    except ImportError:
        raise AutoplanError("hf: models need Hugging Face Transformers: pip install transformers") from None
    path = Path(path_text)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise AutoplanError(f"hf:{path_text}: no such file" + (" (the folder holds no config.json)"
                                                               if path.is_dir() else ""))
    try:
        fields = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AutoplanError(f"{file}: not valid JSON: {error}") from None
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise AutoplanError(f"{file}: field 'model_type' is missing (a Hugging Face config.json names its "
                            f"architecture family there, e.g. \"llama\")")
    model_type = fields.pop("model_type")
    mapping = transformers.CONFIG_MAPPING
    if model_type not in mapping:
        raise AutoplanError(f"{file}: model_type {model_type!r} is not known to transformers "
                            f"{transformers.__version__}")
    try:
        config = mapping[model_type].from_dict(fields)
    except (TypeError, ValueError) as error:
        raise AutoplanError(f"{file}: {type(error).__name__}: {error}") from None
    config.use_cache = False
    return config


def _model_class(config, file: str):
    import transformers

    for name in (config.architectures or [])[:1]:
        cls = getattr(transformers, name, None)
        if cls is None:
            raise AutoplanError(f"{file}: field 'architectures' names {name!r}, which transformers "
                                f"{transformers.__version__} does not have")
        return cls
    for task in _TASKS:
        try:
            return getattr(transformers, task)._model_mapping[type(config)]
        except KeyError:
            continue
    raise AutoplanError(f"{file}: no causal, masked or seq2seq LM class for model_type {config.model_type!r}; "
                        f"name one in the field 'architectures'")


def build_hf(spec: str, *, batch_size: int, seq_len: int | None = None, device: str | torch.device = "meta",
             seed: int = 0):
    """A zoo Job for `hf:PATH` (see the module docstring)."""
    from autoplan.zoo import Job, skip_init_on

    path_text = spec[len("hf:"):]
    config = load_hf_config(path_text)
    cls = _model_class(config, path_text)
    device = torch.device(device)
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq_len = seq_len or min(max_len or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if max_len and seq_len > max_len:
        raise AutoplanError(f"seq_len={seq_len} > max_position_embeddings={max_len} of hf:{path_text}")
    if device.type != "meta":
        torch.manual_seed(seed)
    with device, skip_init_on(device):
        module = cls._from_config(config, torch_dtype=torch.float32)
    module.train()
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed + 1)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=device, generator=generator)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if config.is_encoder_decoder:
        example_inputs: tuple = (inputs, torch.ones_like(inputs), targets)
    else:
        example_inputs = (inputs,)
    return Job(spec, module, example_inputs, targets, logits_loss)
