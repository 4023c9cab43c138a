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

Only what the config needs is imported: `transformers` itself, its config registry and the
one model family's configuration and modeling modules (not the Auto* model classes of every
family), so `autoplan plan --model hf:...` pays for one architecture.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from autoplan.errors import AutoplanError

DEFAULT_MAX_SEQ_LEN = 2048
"""Sequence length of `hf:` models whose config allows more (override with seq_len / --seq-len)."""
_TASKS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
)
"""The task tables of `transformers.models.auto.modeling_auto` tried, in order, without `architectures`."""


def logits_loss(output, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of a Hugging Face output's logits (B, T, V) against targets (B, T)."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _transformers():
    try:
        import transformers
    except ImportError:
        raise AutoplanError("hf: models need Hugging Face Transformers: pip install transformers") from None
    return transformers


def config_file(path_text: str) -> Path:
    """The `config.json` that `hf:PATH` names (PATH itself, or PATH/config.json for a folder)."""
    path = Path(path_text)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise AutoplanError(
            f"hf:{path_text}: no such file" + (" (the folder holds no config.json)" if path.is_dir() else "")
        )
    return file


def load_hf_config(path_text: str):
    """The transformers config a `config.json` (or a folder holding one) describes; an
    AutoplanError names the file and the field that is wrong."""
    file = config_file(path_text)
    try:
        fields = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AutoplanError(f"{file}: not valid JSON: {error}") from None
    if not isinstance(fields, dict):
        raise AutoplanError(f"{file}: expected a JSON object of config fields, got a {type(fields).__name__}")
    if "model_type" not in fields:
        raise AutoplanError(
            f"{file}: field 'model_type' is missing (a Hugging Face config.json names its "
            f'architecture family there, e.g. "llama")'
        )
    transformers = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = fields.pop("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise AutoplanError(
            f"{file}: field 'model_type' is {model_type!r}, which transformers {transformers.__version__} does not know"
        )
    try:
        config = CONFIG_MAPPING[model_type].from_dict(fields)
        config.use_cache = False
    except _config_errors() as error:
        raise AutoplanError(f"{file}: {_one_line(error)}") from None
    return config


def _config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config field it rejects: TypeError / ValueError, and
    huggingface_hub's strict-dataclass validation errors (transformers >= 5), which are neither."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return (TypeError, ValueError)
    return (TypeError, ValueError, StrictDataclassError)


def _one_line(error: BaseException) -> str:
    """`Type: message` on one line (validation errors put the cause on a second line)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text}"


def _family_attribute(config, name: str):
    """`name` from the modeling module next to the config's class (transformers.models.llama.
    modeling_llama for LlamaConfig), else from the top-level transformers namespace; None if neither has it."""
    module_name = type(config).__module__
    if ".configuration_" in module_name:
        try:
            found = getattr(importlib.import_module(module_name.replace(".configuration_", ".modeling_")), name, None)
        except ImportError:
            found = None
        if found is not None:
            return found
    return getattr(_transformers(), name, None)


def _model_class(config, file: Path | str):
    """The class `architectures[0]` names, else the first causal / masked / seq2seq LM for the config."""
    transformers = _transformers()
    from transformers.modeling_utils import PreTrainedModel

    architectures = config.architectures or []
    if not isinstance(architectures, (list, tuple)):
        raise AutoplanError(
            f"{file}: field 'architectures' is {architectures!r}; expected a list of class "
            f'names, e.g. ["LlamaForCausalLM"]'
        )
    if architectures:
        name = architectures[0]
        cls = _family_attribute(config, name) if isinstance(name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise AutoplanError(
                f"{file}: field 'architectures' names {name!r}, which is not a model class of "
                f"transformers {transformers.__version__}"
            )
        expected = getattr(cls, "config_class", None)
        if isinstance(expected, type) and not isinstance(config, expected):
            raise AutoplanError(
                f"{file}: field 'architectures' names {name!r}, a model for "
                f"{expected.__name__}, but field 'model_type' {config.model_type!r} makes a "
                f"{type(config).__name__}"
            )
        return cls
    from transformers.models.auto import modeling_auto

    for table in _TASKS:
        name = getattr(modeling_auto, table, {}).get(config.model_type)
        cls = _family_attribute(config, name) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    raise AutoplanError(
        f"{file}: no causal, masked or seq2seq LM class for model_type {config.model_type!r}; "
        f"name one in the field 'architectures'"
    )


def _dtype_keyword() -> str:
    """`dtype` since transformers 4.56 (`torch_dtype` warns there), `torch_dtype` before."""
    major_minor = tuple(int(part) for part in re.findall(r"\d+", _transformers().__version__)[:2])
    return "dtype" if major_minor >= (4, 56) else "torch_dtype"


def build_hf(
    spec: str,
    *,
    batch_size: int,
    seq_len: int | None = None,
    device: str | torch.device = "meta",
    seed: int = 0,
    module_device: str | torch.device | None = None,
):
    """A zoo Job for `hf:PATH` (see the module docstring); the module on `module_device`
    (default: `device`), the inputs on `device`."""
    from autoplan.zoo import Job, skip_init_on

    path_text = spec[len("hf:") :]
    config = load_hf_config(path_text)
    file = config_file(path_text)
    cls = _model_class(config, file)
    device = torch.device(device)
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq_len = seq_len or min(max_len or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if max_len and seq_len > max_len:
        raise AutoplanError(f"seq_len={seq_len} > max_position_embeddings={max_len} of hf:{path_text}")
    vocab_size = getattr(config, "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise AutoplanError(f"{file}: field 'vocab_size' is {vocab_size!r}; token inputs need a positive vocabulary")
    module_device = device if module_device is None else torch.device(module_device)
    if module_device.type != "meta":
        torch.manual_seed(seed)
    try:
        with module_device, skip_init_on(module_device):
            module = cls._from_config(config, **{_dtype_keyword(): torch.float32})
    except _config_errors() + (AttributeError, KeyError, IndexError, ZeroDivisionError) as error:
        # a field combination the config class accepted but the model cannot be built from
        raise AutoplanError(f"{file}: {cls.__name__} cannot be built from this config: {_one_line(error)}") from None
    module.train()
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed + 1)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), device=device, generator=generator)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if config.is_encoder_decoder:
        example_inputs: tuple = (inputs, torch.ones_like(inputs), targets)
    else:
        example_inputs = (inputs,)
    return Job(spec, module, example_inputs, targets, logits_loss)
