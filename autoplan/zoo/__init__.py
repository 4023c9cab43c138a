"""The model zoo: named models with example inputs, targets and a loss.

    >>> from autoplan import zoo
    >>> job = zoo.build("gpt2-small", batch_size=8, device="meta")
    >>> job.module.config.num_layers, tuple(job.example_inputs[0].shape)
    (12, (8, 1024))

`build` also loads `hf:path/to/config.json` (a Hugging Face model, `autoplan.zoo.hf`) and
`path/to/file.py:factory`, where factory() returns
`(module, example_inputs)` or `(module, example_inputs, targets, loss_fn)`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoplan.zoo.gpt import GPT, GPTConfig
from autoplan.zoo.llama import Llama, LlamaConfig
from autoplan.zoo.mlp import MLPConfig, ResidualMLP

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def mean_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs, targets)


def output_mean(outputs, targets: torch.Tensor | None = None) -> torch.Tensor:
    """The loss used for timing when a model comes without one: the mean of its first output
    tensor (a Hugging Face ModelOutput's logits)."""
    from torch.utils._pytree import tree_leaves

    first = next(leaf for leaf in tree_leaves(outputs) if isinstance(leaf, torch.Tensor))
    return first.float().mean()


@dataclass
class Job:
    """A model with one global batch of inputs, its targets and its loss."""

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor | None
    loss_fn: LossFn


def _reference_configs() -> dict[str, GPTConfig]:
    """megatron-1.7b ... megatron-1t: one per row of Megatron-LM's Table 1
    (Narayanan et al., SC21; tests/data/megatron_sc21.json): params_b, heads, hidden, layers."""
    rows = (
        (1.7, 24, 2304, 24),
        (3.6, 32, 3072, 30),
        (7.5, 32, 4096, 36),
        (18.4, 48, 6144, 40),
        (39.1, 64, 8192, 48),
        (76.1, 80, 10240, 60),
        (145.6, 96, 12288, 80),
        (310.1, 128, 16384, 96),
        (529.6, 128, 20480, 105),
        (1008.0, 160, 25600, 128),
    )
    configs = {}
    for params_b, heads, hidden, layers in rows:
        label = "1t" if params_b >= 1000 else f"{params_b:g}b"
        configs[f"megatron-{label}"] = GPTConfig(
            num_layers=layers, num_heads=heads, hidden=hidden, vocab_size=51200, seq_len=2048
        )
    return configs


GPT_CONFIGS: dict[str, GPTConfig] = {
    "gpt-tiny": GPTConfig(num_layers=4, num_heads=4, hidden=64, vocab_size=128, seq_len=32),
    "gpt-small-demo": GPTConfig(num_layers=8, num_heads=8, hidden=256, vocab_size=2048, seq_len=128),
    "gpt2-small": GPTConfig(num_layers=12, num_heads=12, hidden=768),
    "gpt2-medium": GPTConfig(num_layers=24, num_heads=16, hidden=1024),
    "gpt2-large": GPTConfig(num_layers=36, num_heads=20, hidden=1280),
    "gpt2-xl": GPTConfig(num_layers=48, num_heads=25, hidden=1600),
    # GPT-3 175B as trained by Megatron-LM: 96 layers, 96 heads, h=12288, s=2048.
    "gpt3-175b": GPTConfig(num_layers=96, num_heads=96, hidden=12288, vocab_size=51200, seq_len=2048),
    **_reference_configs(),
}

LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    "llama-tiny": LlamaConfig(
        num_layers=4, num_heads=4, num_kv_heads=2, hidden=64, ffn_hidden=128, vocab_size=128, seq_len=32
    ),
    "llama2-7b": LlamaConfig(),
    "llama2-13b": LlamaConfig(num_layers=40, num_heads=40, num_kv_heads=40, hidden=5120, ffn_hidden=13824),
    "llama2-70b": LlamaConfig(num_layers=80, num_heads=64, num_kv_heads=8, hidden=8192, ffn_hidden=28672),
    "llama3-8b": LlamaConfig(
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        hidden=4096,
        ffn_hidden=14336,
        vocab_size=128256,
        seq_len=8192,
        rope_theta=500000.0,
    ),
    "llama3-70b": LlamaConfig(
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        hidden=8192,
        ffn_hidden=28672,
        vocab_size=128256,
        seq_len=8192,
        rope_theta=500000.0,
    ),
    "llama3-405b": LlamaConfig(
        num_layers=126,
        num_heads=128,
        num_kv_heads=8,
        hidden=16384,
        ffn_hidden=53248,
        vocab_size=128256,
        seq_len=8192,
        rope_theta=500000.0,
    ),
}

MLP_CONFIGS: dict[str, MLPConfig] = {"mlp-tiny": MLPConfig(num_layers=4, in_features=16, hidden=32, out_features=8)}

MODEL_NAMES: tuple[str, ...] = (*GPT_CONFIGS, *LLAMA_CONFIGS, *MLP_CONFIGS)


@contextmanager
def skip_init_on(device: torch.device):
    """Skip torch.nn.init on the meta device: it computes nothing there but costs ~1.5 s
    (meta decompositions of uniform_/normal_) for GPT-3 175B's 400 tensors."""
    if device.type != "meta":
        yield
        return
    names = ("uniform_", "normal_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def build(
    name: str,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str | torch.device = "meta",
    seed: int = 0,
    module_device: str | torch.device | None = None,
) -> Job:
    """Build a zoo model (or load `file.py:factory`) with one global batch of inputs.

    `batch_size` is the global batch size in sequences; `seq_len` overrides the model's
    context length. On a real device the weights are initialised from `seed`.
    `module_device` (default: `device`) builds the module elsewhere than the inputs:
    "meta" for a run that materialises only each rank's shard (`autoplan.backends.materialize`).
    A factory builds its module and inputs where it chooses.

    >>> job = build("gpt-tiny", batch_size=2, device="cpu", module_device="meta")
    >>> job.module.lm_head.weight.device.type, job.example_inputs[0].device.type
    ('meta', 'cpu')
    """
    if ":" in name and name.split(":", 1)[0].endswith(".py"):
        return load_factory(name)
    if name not in MODEL_NAMES and not name.startswith("hf:"):
        raise ValueError(_unknown_model(name))
    if batch_size < 1:
        raise ValueError(f"global batch size must be >= 1, got {batch_size}")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if name.startswith("hf:"):
        from autoplan.zoo.hf import build_hf

        return build_hf(
            name, batch_size=batch_size, seq_len=seq_len, device=device, seed=seed, module_device=module_device
        )
    device = torch.device(device)
    module_device = device if module_device is None else torch.device(module_device)
    if module_device.type != "meta":
        torch.manual_seed(seed)
    if name in MLP_CONFIGS:
        mlp_config = MLP_CONFIGS[name]
        with module_device, skip_init_on(module_device):
            mlp = ResidualMLP(mlp_config)
        inputs = torch.randn(batch_size, mlp_config.in_features, device=device)
        targets = torch.randn(batch_size, mlp_config.out_features, device=device)
        return Job(name, mlp, (inputs,), targets, mean_squared_error)
    config: GPTConfig | LlamaConfig
    if name in GPT_CONFIGS:
        config = GPT_CONFIGS[name]
        config = replace(config, seq_len=seq_len or config.seq_len)
        model_cls: type[nn.Module] = GPT
    else:
        config = LLAMA_CONFIGS[name]
        config = replace(config, seq_len=seq_len or config.seq_len)
        model_cls = Llama
    with module_device, skip_init_on(module_device):
        module = model_cls(config)
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed + 1)
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.seq_len + 1), device=device, generator=generator)
    return Job(name, module, (tokens[:, :-1].contiguous(),), tokens[:, 1:].contiguous(), language_model_loss)


def _user_frame(error: BaseException, path: Path) -> str:
    """file:line of the innermost frame of `error`'s traceback in the user's file (else the innermost)."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    inside = [frame for frame in frames if Path(frame.filename).resolve() == path.resolve()]
    frame = (inside or frames)[-1]
    return f"{frame.filename}:{frame.lineno}"


def _unknown_model(name: str) -> str:
    """Why `name` names no model, with the spelling that would: a file without its factory, a
    factory in a file that is not Python, a Hugging Face config without `hf:`."""
    path, _, factory = name.rpartition(":")
    if name.endswith(".py"):
        return f"model {name!r} names a file but no factory: give {name}:make_model (the function that builds it)"
    if name.endswith(".json"):
        return f"model {name!r} looks like a Hugging Face config: give hf:{name}"
    if path and factory and Path(path).exists():
        return f"model {name!r}: {path!r} is not a Python file (.py); a factory lives in path/file.py:factory"
    return f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}, hf:path/to/config.json or path/file.py:factory"


def load_factory(spec: str) -> Job:
    """Load `path/to/file.py:factory` (see the module docstring for what it returns)."""
    path_text, _, factory_name = spec.rpartition(":")
    path = Path(path_text)
    if not path.exists():
        raise ValueError(f"model file {path_text!r} does not exist")
    module_name = f"autoplan_user_{path.stem}"
    # None for a file not ending in .py: module_from_spec then raises AttributeError (as it always has)
    loader_spec = cast(importlib.machinery.ModuleSpec, importlib.util.spec_from_file_location(module_name, path))
    user_module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = user_module
    try:
        cast(importlib.abc.Loader, loader_spec.loader).exec_module(user_module)  # a file's spec has a loader
        factory = getattr(user_module, factory_name, None)
        if not callable(factory):
            raise ValueError(f"{path_text!r} has no function {factory_name!r}")
        result = factory()
    except ValueError:
        raise
    except Exception as error:  # the user's code failed: its type and where, on one line
        raise ValueError(f"{spec}: {type(error).__name__}: {error} (at {_user_frame(error, path)})") from error
    if not isinstance(result, tuple) or len(result) not in (2, 4):
        raise ValueError(
            f"{spec}: factory must return (module, example_inputs) or "
            f"(module, example_inputs, targets, loss_fn), got {type(result).__name__}"
        )
    module, inputs = result[0], result[1]
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    targets, loss_fn = (result[2], result[3]) if len(result) == 4 else (None, output_mean)
    return Job(spec, module, inputs, targets, loss_fn)
