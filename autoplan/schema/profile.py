"""What the profiler hands the cost model: per-layer numbers for ONE sequence.

Every per-sequence quantity scales linearly with the micro-batch size (a micro-batch
of b sequences costs b times as much); the cost model does that multiplication.
Bytes are counted at float32 (4 bytes per element); the cost model rescales to the
plan's dtypes.

Tensor-parallel split: `tp_*` fields give the part that a tensor-parallel degree t
divides by t (column/row-split matmuls, attention heads, vocab-split embedding and
head); the rest is replicated on every tp rank (norms, residual adds, dropout), unless
sequence parallelism splits it along the sequence (activations only).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from autoplan.schema.plan import TPSite


class LayerProfile(BaseModel):
    """One layer (a unit pipeline stages are cut between), per sequence."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Module path, e.g. "blocks.3"."""
    signature: str
    """Hash of op structure, shapes and dtypes; equal for repeated blocks."""
    param_count: int
    """Parameter elements owned by the layer (a tied parameter counts in the first layer using it)."""
    tp_param_count: int = 0
    """Of which split by tensor parallelism."""
    param_tensors: int = 0
    """Parameter tensors owned by the layer (the optimizer steps each one; 0 in profiles
    written before this field)."""
    fwd_flops: float
    """Forward FLOPs per sequence (torch.utils.flop_counter)."""
    bwd_flops: float
    """Backward FLOPs per sequence."""
    tp_flops_fraction: float = 0.0
    """Share of fwd and bwd FLOPs that tensor parallelism divides."""
    attention_fwd_flops: float = 0.0
    """Of fwd_flops, those of fused attention (F.scaled_dot_product_attention): its score and
    value products, counted whole as torch.utils.flop_counter counts them."""
    attention_bwd_flops: float = 0.0
    """Of bwd_flops, those of fused attention's backward."""
    attention_run_fraction: float = 1.0
    """Share of the attention FLOPs a fused kernel runs: under a causal mask it skips the tiles
    above the diagonal (`analysis.meta_layer.causal_tile_fraction`), about half at long
    sequences. Priced at `DeviceSpec.attention_efficiency` (costmodels/compute.py)."""
    elementwise_bytes: float = 0.0
    """Memory traffic of non-matmul ops (reads + writes), forward, per sequence."""
    forward_ops: int = 0
    """Aten ops one forward of the layer dispatches (views included), whatever the batch: each
    pays the host's per-op work (`DeviceSpec.op_overhead_us`). 0 in profiles written before it."""
    backward_ops: int = 0
    """Aten ops its backward dispatches, likewise."""
    saved_bytes: dict[str, float]
    """Recompute option ("none", "selective", "full") -> bytes kept for backward per sequence."""
    tp_saved_bytes: dict[str, float] = Field(default_factory=dict)
    """Of `saved_bytes`, the part that tensor parallelism divides by t; the remainder is
    divided by t only with sequence parallelism."""
    largest_node_saved_bytes: float = 0.0
    """Of `saved_bytes["none"]`, the most one backward node reads at once (the MLP's hidden for
    its activation's backward, attention's q, k, v and output for its kernel), per sequence:
    what a layer storing its activations narrower holds dequantized beside the stored copies
    while its backward runs. 0: not profiled (profiles written before it)."""
    half_saved_ratio: dict[str, float] = Field(default_factory=dict)
    """Recompute option -> bytes kept when the layer runs in bfloat16 over `saved_bytes` (0.5
    when every saved tensor follows the compute dtype; more for tensors the layer upcasts, a
    loss's float32 logits). Empty in profiles written before this field: 0.5 is assumed."""
    half_elementwise_ratio: float | None = None
    """`elementwise_bytes` in bfloat16 over the float32 count, likewise (None: 0.5)."""
    output_bytes: float
    """Bytes of the activation leaving the layer (crosses a stage boundary cut after it)."""
    tp_allreduce_bytes_fwd: float = 0.0
    """Bytes all-reduced over tp in forward (row-split outputs, vocab-split embedding);
    with sequence parallelism the same volume moves as reduce-scatter + all-gather."""
    tp_allreduce_bytes_bwd: float = 0.0
    """Bytes all-reduced over tp in backward (input grads of column-split matmuls)."""
    tp_sites: dict[str, TPSite] = Field(default_factory=dict)
    """Module path -> tensor-parallel style, for modules inside this layer."""
    tp_divisors: dict[str, int] = Field(default_factory=dict)
    """What tp must divide, by name: {"blocks.3.attn heads": 12, "blocks.3.mlp width": 3072}."""
    tp_divide_attrs: dict[str, int] = Field(default_factory=dict)
    """"module.path.attr" -> integer attribute the backend divides by tp (head counts)."""
    measured_fwd_s: float | None = None
    """Measured forward seconds per sequence on `measured_device`, when profiled."""
    measured_bwd_s: float | None = None
    measured_device: str | None = None
    """Device name or kind ("cpu", "cuda") the measured times apply to."""
    measured_by_mbs: dict[int, tuple[float, float]] = Field(default_factory=dict)
    """Micro-batch size b -> measured (forward, backward) seconds of a micro-batch of b
    sequences (`autoplan profile`); see `measured_micro_batch_s`."""
    measured_source: str | None = None
    """Where the measured times come from, e.g. "NVIDIA H100 80GB HBM3 (h100.json)"."""

    def saved_bytes_scale(self, recompute: str, dtype_bytes: int) -> float:
        """Factor from `saved_bytes[recompute]` (float32 count) to bytes in a compute dtype of
        `dtype_bytes` bytes: 1 for float32, `half_saved_ratio` (default 0.5) for 16-bit dtypes."""
        if dtype_bytes >= 4:
            return 1.0
        return self.half_saved_ratio.get(recompute, 0.5) * dtype_bytes / 2

    def elementwise_bytes_scale(self, dtype_bytes: int) -> float:
        """Factor from `elementwise_bytes` to bytes moved in a compute dtype of `dtype_bytes` bytes."""
        if dtype_bytes >= 4:
            return 1.0
        ratio = self.half_elementwise_ratio if self.half_elementwise_ratio is not None else 0.5
        return ratio * dtype_bytes / 2

    def measured_micro_batch_s(self, micro_batch_size: int) -> tuple[float, float]:
        """Measured (forward, backward) seconds of one micro-batch of `micro_batch_size` sequences.

        The entry of `measured_by_mbs` for that size; between two measured sizes the
        per-sequence time is interpolated linearly in b; beyond them the nearest size's
        per-sequence time is scaled by b. Without entries: `measured_fwd_s` * b (the backward
        twice the forward when it was not measured).

            >>> layer = LayerProfile(name="l", signature="s", param_count=0, fwd_flops=0, bwd_flops=0,
            ...                      saved_bytes={}, output_bytes=0, measured_fwd_s=1.0,
            ...                      measured_by_mbs={2: (2.0, 4.0), 4: (2.0, 4.0)})
            >>> layer.measured_micro_batch_s(3)    # per sequence: 1.0 at b=2, 0.5 at b=4 -> 0.75
            (2.25, 4.5)
            >>> layer.measured_micro_batch_s(8)    # 0.5 per sequence, as at b=4
            (4.0, 8.0)
        """
        b = micro_batch_size
        if not self.measured_by_mbs:
            assert self.measured_fwd_s is not None, f"layer {self.name!r} has no measured times"
            return self.measured_fwd_s * b, (self.measured_bwd_s or 2 * self.measured_fwd_s) * b
        if b in self.measured_by_mbs:
            return self.measured_by_mbs[b]
        sizes = sorted(self.measured_by_mbs)
        below, above = max((s for s in sizes if s < b), default=None), min((s for s in sizes if s > b), default=None)
        if below is None or above is None:
            nearest = below if above is None else above
            assert nearest is not None  # measured_by_mbs is not empty
            fwd, bwd = self.measured_by_mbs[nearest]
            return fwd / nearest * b, bwd / nearest * b
        weight = (b - below) / (above - below)
        (fwd_below, bwd_below), (fwd_above, bwd_above) = self.measured_by_mbs[below], self.measured_by_mbs[above]
        return (
            ((1 - weight) * fwd_below / below + weight * fwd_above / above) * b,
            ((1 - weight) * bwd_below / below + weight * bwd_above / above) * b,
        )


class ModelProfile(BaseModel):
    """The whole model: layers in execution order and what ties them."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    layers: list[LayerProfile]
    global_batch_size: int
    """Sequences in the example global batch."""
    seq_len: int
    """Tokens per sequence (1 for non-sequence models)."""
    input_bytes: float
    """Bytes of one sequence of model input."""
    tied_parameters: list[list[str]] = Field(default_factory=list)
    """Groups of parameter names sharing one tensor."""
    fingerprint: str
    """Hash of the traced graph, shapes and parameter names."""
    num_params: int
    model_flops_per_sequence: float
    """Forward + backward FLOPs of the model for one sequence, without recompute."""
    sequence_parallel_blocker: str | None = None
    """Why sequence parallelism cannot run on this model (None: it can, or tp splits nothing)."""
    stage_start_blockers: dict[str, str] = Field(default_factory=dict)
    """Layer -> why a pipeline stage cannot begin at it (`autoplan.analysis.stage_cuts`)."""


def selective_save_ops() -> frozenset:
    """The ops whose outputs selective recomputation keeps (Korthikanti et al. 2022):
    the matmuls. Everything else in a block — norms, activations, dropout, softmax and
    the attention core — is recomputed in backward. The backend's checkpoint policy and
    the profiler's byte count both use this one set."""
    import torch

    aten = torch.ops.aten
    return frozenset(
        {
            aten.mm.default,
            aten.addmm.default,
            aten.bmm.default,
            aten.baddbmm.default,
            aten.linear.default,
            aten._scaled_mm.default,
        }
    )
