"""Activation storage (backends/activation_storage.py): what is stored narrower, that the
hooks keep names and leave on errors, and that measured memory falls as the cost model says."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from autoplan.backends.activation_storage import ActivationStorage, apply_activation_storage
from autoplan.runtime.timing import AllocationTracker
from autoplan.schema.profile import LayerProfile
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
    assert storage.pack(activation)[2] is packed[2]  # saved twice, stored once
    restored = storage.unpack(packed)
    assert restored.dtype == torch.float32
    torch.testing.assert_close(restored, activation, rtol=0.07, atol=0.0)  # 3 mantissa bits: <= 1/16 off


def test_bfloat16_storage_is_a_cast():
    storage = ActivationStorage(torch.bfloat16)
    activation = torch.randn(64)
    packed = storage.pack(activation)
    assert packed[2][0].dtype == torch.bfloat16 and packed[2][1] is None
    assert torch.equal(storage.unpack(packed), activation.to(torch.bfloat16).float())


def test_views_of_one_storage_share_one_copy_partial_views_keep_their_own():
    storage = ActivationStorage(torch.bfloat16)
    hidden = torch.randn(2, 4, 8)
    flat = storage.pack(hidden.view(-1, 8))  # a Linear's input
    again = storage.pack(hidden.view(-1, 8))  # the next Linear's: another view object
    transposed = storage.pack(hidden.transpose(0, 1))  # the same elements in another order
    assert again[2] is flat[2] and transposed[2] is flat[2]
    assert flat[2][0].shape == (64,)  # the storage, flat: 64 elements stored once
    for view in (hidden.view(-1, 8), hidden.transpose(0, 1)):
        restored = storage.unpack(storage.pack(view))
        assert restored.shape == view.shape and restored.stride() == view.stride()
        assert torch.equal(restored, view.to(torch.bfloat16).float())
    fused = torch.randn(2, 4, 24)
    q, k, v = fused.chunk(3, dim=-1)  # chunks of a fused q|k|v: each stored on its own
    packed = [storage.pack(t) for t in (q, k, v)]
    assert len({id(p[2]) for p in packed}) == 3
    assert [p[2][0].numel() for p in packed] == [64, 64, 64]
    assert all(torch.equal(storage.unpack(p), t.to(torch.bfloat16).float()) for p, t in zip(packed, (q, k, v)))


def test_the_original_is_freed_when_the_forward_drops_it():
    storage = ActivationStorage(torch.float8_e4m3fn)
    activation = torch.randn(16, 8)
    expected = storage.unpack(storage.pack(activation))
    packed = storage.pack(activation.view(-1))
    alive = weakref.ref(activation)
    del activation
    assert alive() is None  # not kept by the stored copy's entry
    assert storage.packed == {}  # the entry left with its storage: the key is not reused
    torch.testing.assert_close(storage.unpack(packed), expected.view(-1), rtol=0.0, atol=0.0)


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
        ("gpt-tiny", "bfloat16", MEMORY_RTOL),
    ],
)
@pytest.mark.xfail(
    "largest_node_saved_bytes" not in LayerProfile.model_fields,
    reason="the cost model still charges a whole layer's dequantized copies in backward, where the "
    "backend dequantizes one node's at a time (docs/precision.md, 'Memory')",
    strict=True,
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
