"""Every foreign model traces on meta and its profile conserves the model: every parameter
counted once, and the layers' FLOPs equal torch.utils.flop_counter's over the whole forward
and backward within 1%. A plan that silently drops part of a model (OPT's decoder once
did) fails here."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from autoplan.analysis.meta_layer import _FusedAttention
from autoplan.analysis.profile import profile_model
from autoplan.analysis.trace import as_exported
from autoplan.zoo import build
from tests.models.catalog import ALL_MODELS, short_name

pytest.importorskip("transformers")


def whole_model_flops(module: torch.nn.Module, inputs: tuple) -> float:
    """Forward + backward FLOPs of the model run at once on meta (one sequence), attention
    counted as the fused kernel the profile assumes."""
    state = {
        name: t.detach().requires_grad_(t.is_floating_point() and name in dict(module.named_parameters()))
        for name, t in {**dict(module.named_parameters()), **dict(module.named_buffers())}.items()
    }
    with FlopCounterMode(display=False) as counter, _FusedAttention(), as_exported():
        output = torch.func.functional_call(module, state, inputs, tie_weights=True)
        leaves = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.autograd.backward(leaves, [torch.ones_like(t) for t in leaves])
    return float(counter.get_total_flops())


@pytest.mark.parametrize("model", ALL_MODELS, ids=short_name)
def test_profile_conserves_parameters_and_flops(model):
    job = build(model, batch_size=2, device="meta")
    profile = profile_model(job.module, job.example_inputs, model_name=model)
    assert sum(layer.param_count for layer in profile.layers) == sum(p.numel() for p in job.module.parameters())
    one_sequence = tuple(x[:1] if isinstance(x, torch.Tensor) else x for x in job.example_inputs)
    meta_module = build(model, batch_size=1, device="meta").module.to("meta")  # factories build on CPU
    expected = whole_model_flops(meta_module, tuple(x.to("meta") for x in one_sequence))
    counted = sum(layer.fwd_flops + layer.bwd_flops for layer in profile.layers)
    assert counted == pytest.approx(expected, rel=0.01)


class GlueMatmul(torch.nn.Module):
    """Its root multiplies by a weight of its own between layers: no layer owns that work."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(64, 64)
        self.proj = torch.nn.Parameter(torch.randn(64, 64))

    def forward(self, x):
        return self.inner(x @ self.proj @ self.proj)


def test_flops_outside_every_layer_are_refused_with_the_module_named():
    with pytest.raises(ValueError, match=r"run outside every layer .*<root>"):
        profile_model(GlueMatmul(), (torch.randn(4, 8, 64),))
