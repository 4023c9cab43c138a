"""Activation storage (backends/activation_storage.py): what is stored narrower, that the
hooks keep names and leave on errors, and that measured memory falls as the cost model says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoplan.backends.activation_storage import ActivationStorage, apply_activation_storage
from autoplan.runtime.timing import AllocationTracker
from autoplan.zoo import build
from tests.distributed.equivalence import plan_for

MEMORY_RTOL = 0.15
"""Measured fall of peak memory against the predicted fall (issue 13)."""


def test_activations_are_stored_narrower_parameters_and_statistics_are_not():
    storage = ActivationStorage(torch.float8_e4m3fn)
    storage.min_numel = 16
    weight = nn.Parameter(torch.randn(4, 8))
    activation = torch.randn(4, 8) * 3
    assert storage.pack(weight) is weight
    assert isinstance(storage.pack(weight.t()), torch.Tensor)  # a view of a parameter stays as it is
    assert isinstance(storage.pack(torch.randn(4)), torch.Tensor)  # smaller than the layer input: a statistic
    assert isinstance(storage.pack(torch.arange(32)), torch.Tensor)  # integers stay
    packed = storage.pack(activation)
    assert packed[2][0].dtype == torch.float8_e4m3fn
    assert storage.pack(activation) is packed  # saved twice, stored once
    restored = storage.unpack(packed)
    assert restored.dtype == torch.float32
    torch.testing.assert_close(restored, activation, rtol=0.07, atol=0.0)  # 3 mantissa bits: <= 1/16 off


def test_bfloat16_storage_is_a_cast():
    storage = ActivationStorage(torch.bfloat16)
    activation = torch.randn(64)
    packed = storage.pack(activation)
    assert packed[2][0].dtype == torch.bfloat16 and packed[2][1] is None
    assert torch.equal(storage.unpack(packed), activation.to(torch.bfloat16).float())


def test_hooks_keep_names_and_leave_when_forward_raises():
    job = build("gpt-tiny", batch_size=2, device="cpu")
    names = [name for name, _ in job.module.named_parameters()]
    apply_activation_storage(job.module, {"blocks.0": "float8_e4m3fn"})
    assert [name for name, _ in job.module.named_parameters()] == names
    with pytest.raises(RuntimeError):
        job.module.blocks[0](torch.randn(2, 3, 5))  # wrong width
    x = torch.randn(64, requires_grad=True)  # larger than the failed call's input
    y = x * x  # outside the block: saved as is, the hooks were left
    assert y.grad_fn._saved_self is x


def _peak_and_forward_bytes(job_name: str, storage: dict[str, str]) -> tuple[int, int]:
    job = build(job_name, batch_size=8, device="cpu", seed=0)
    apply_activation_storage(job.module, storage)
    with AllocationTracker() as tracker:
        tracker.track(*job.module.parameters())
        loss = job.loss_fn(job.module(*job.example_inputs), job.targets)
        after_forward = tracker.current_bytes
        loss.backward()
    return tracker.peak_bytes, after_forward


@pytest.mark.parametrize(
    "job_name, dtype, rtol",
    [
        ("gpt-tiny", "float8_e4m3fn", MEMORY_RTOL),
        ("llama-tiny", "float8_e4m3fn", MEMORY_RTOL),
        ("llama-tiny", "bfloat16", MEMORY_RTOL),
        ("gpt-tiny", "bfloat16", 0.25),  # measured 20% more than predicted (docs/precision.md)
    ],
)
def test_measured_peak_memory_falls_as_predicted(job_name, dtype, rtol):
    exact, lossy = plan_for(job_name, 1), plan_for(job_name, 1, activation_dtype=dtype)
    assert set(lossy.activation_storage_of().values()) == {dtype}
    predicted = exact.predicted.peak_memory_bytes - lossy.predicted.peak_memory_bytes
    (exact_peak, _), (lossy_peak, _) = (
        _peak_and_forward_bytes(job_name, p.activation_storage_of()) for p in (exact, lossy)
    )
    measured = exact_peak - lossy_peak
    assert measured == pytest.approx(predicted, rel=rtol), (measured, predicted)
