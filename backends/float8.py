"""Float8 matmuls: the plan's layers with `matmul_dtype` float8_e4m3fn get their `nn.Linear`s
swapped for torchao's `Float8Linear` (float8 training with tensorwise dynamic scaling, as
torchtitan's `--model.converters float8`): inputs and weights are cast to float8_e4m3fn and
output gradients to float8_e5m2 with per-tensor scales, the matmuls run on float8 tensor
cores, and the weights stay in their own dtype (names and shapes unchanged).

torchao is an optional extra (`pip install 'autoplan[float8]'`). The planner offers float8
only on devices whose `peak_flops` list it (the H100/H200 presets); this backend runs it only
on CUDA devices of compute capability 8.9 or newer and says so otherwise.

    >>> apply_float8_matmuls(model, ["layers.0", "layers.1"])    # doctest: +SKIP

Applied first, before tensor parallelism (torchtitan's order): the tensor-parallel styles
then split Float8Linear weights as they split any Linear's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

FLOAT8_MIN_CAPABILITY = (8, 9)
"""CUDA compute capability with float8 tensor cores (Ada sm89, Hopper sm90 and later)."""


def float8_linear_paths(module: nn.Module, layers: list[str]) -> list[str]:
    """The `nn.Linear` modules under `layers` that become Float8Linear.

    >>> float8_linear_paths(nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)), ["0"])
    ['0.0']
    """
    inside = tuple(layer + "." for layer in layers)
    return [name for name, child in module.named_modules() if isinstance(child, nn.Linear) and name.startswith(inside)]


def float8_unavailable() -> str | None:
    """Why float8 matmuls cannot run here (None: they can)."""
    if not torch.cuda.is_available():
        return "float8 matmuls run on CUDA devices of compute capability >= 8.9; this process has no CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability < FLOAT8_MIN_CAPABILITY:
        return (
            f"float8 matmuls need compute capability >= 8.9 (H100, H200, L40); "
            f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}"
        )
    return None


def swap_to_float8(module: nn.Module, layers: list[str]) -> list[str]:
    """Swap the Linears under `layers` for torchao Float8Linear in place (any device: the swap
    itself runs on CPU); returns their paths. ImportError names the extra to install."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise ImportError("float8 matmuls need torchao: pip install 'autoplan[float8]'") from error
    paths = set(float8_linear_paths(module, layers))
    convert_to_float8_training(module, config=Float8LinearConfig(), module_filter_fn=lambda child, fqn: fqn in paths)
    return sorted(paths)


def apply_float8_matmuls(module: nn.Module, layers: list[str]) -> list[str]:
    """Run the Linears of `layers` in float8 (module docstring); RuntimeError where the
    device has no float8 tensor cores."""
    problem = float8_unavailable()
    if problem:
        raise RuntimeError(problem)
    return swap_to_float8(module, layers)
