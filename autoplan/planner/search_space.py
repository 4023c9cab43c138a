"""The search space of the outer loop: which meshes, micro-batch sizes and pipeline schedules a
model and a cluster allow, and which of the model's layers are the repeated body.

Meshes dp * pp * tp = world size with tp a divisor of devices_per_node (placed inside a
node) dividing every `tp_divisors` value, pp <= repeated blocks; micro-batch sizes b with
global_batch % (dp * b) == 0; schedules torch.distributed.pipelining can run with m
micro-batches. A pinned field leaves one value, and a pinned value that cannot run is
refused loudly here (a ValueError naming it) rather than quietly planned around.

The longest run of layers with one `signature` that a stage may be cut anywhere inside is
the repeated body (N blocks): the MILP (`autoplan.planner.solver`) counts blocks per rank
instead of placing each layer, so it does not grow with depth.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.errors import AutoplanError
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints
from autoplan.schema.profile import ModelProfile

VIRTUAL_STAGE_OPTIONS = (2, 4)
MAX_MICRO_BATCH_SIZE = 64


@dataclass(frozen=True)
class LayerSplit:
    """prefix (pinned to rank 0) + N identical blocks + suffix (pinned to the last rank).
    Pipeline stages are cut only between blocks; `cut_blocker` says why they cannot be
    (None: any two neighbouring blocks may be cut apart)."""

    prefix: tuple[int, ...]
    blocks: tuple[int, ...]
    suffix: tuple[int, ...]
    cut_blocker: str | None = None

    @property
    def num_cuttable_blocks(self) -> int:
        """The most pipeline stages the blocks can be cut into."""
        return len(self.blocks) if self.cut_blocker is None else 1


def split_layers(profile: ModelProfile) -> LayerSplit:
    """The repeated body: the longest run of equal signatures that a stage may be cut
    anywhere inside (`ModelProfile.stage_start_blockers`), the first such run on ties; when
    no two equal neighbours may be cut apart, the longest run, uncuttable."""
    layers, blockers = profile.layers, profile.stage_start_blockers
    runs: list[list[int]] = []  # (start, length) of runs of equal signatures
    cuttable: list[list[int]] = []  # (start, length) of runs also cuttable inside
    for index, layer in enumerate(layers):
        if runs and layer.signature == layers[index - 1].signature:
            runs[-1][1] += 1
            if layer.name in blockers:
                cuttable.append([index, 1])
            else:
                cuttable[-1][1] += 1
        else:
            runs.append([index, 1])
            cuttable.append([index, 1])
    start, length = max(cuttable, key=lambda run: (run[1], -run[0]))
    blocker = None
    if length == 1:
        start, length = max(runs, key=lambda run: (run[1], -run[0]))
        blocker = next(
            (blockers[layers[i].name] for i in range(start + 1, start + length) if layers[i].name in blockers), None
        )
    return LayerSplit(
        tuple(range(start)), tuple(range(start, start + length)), tuple(range(start + length, len(layers))), blocker
    )


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


def can_sequence_parallel(profile: ModelProfile) -> bool:
    """Whether the trace found a region sequence parallelism can run (an entry site)."""
    return any(site.style == "sequence_parallel_entry" for layer in profile.layers for site in layer.tp_sites.values())


def check_tp(profile: ModelProfile, tp: int) -> str | None:
    """Why `tp` cannot split the model, or None."""
    if tp > 1 and not any(layer.tp_param_count for layer in profile.layers):
        return (
            f"tp={tp}: tensor parallelism finds nothing to split in this model (no Linear pairs, heads or vocabulary)"
        )
    for layer in profile.layers:
        for name, value in layer.tp_divisors.items():
            if value % tp:
                return f"tp={tp} does not divide {name}={value}"
    return None


def enumerate_meshes(
    profile: ModelProfile,
    cluster: ClusterSpec,
    constraints: Constraints,
    num_blocks: int,
    cut_blocker: str | None = None,
) -> list[tuple[int, int, int]]:
    """(dp, pp, tp) candidates honouring the pins; pinned values are validated loudly."""
    world = cluster.world_size
    pins = {axis: getattr(constraints, axis) for axis in ("dp", "pp", "tp")}
    if pins["dp"] == 1 and constraints.zero_stage:
        raise AutoplanError(
            f"zero_stage={constraints.zero_stage} shards model states over dp, but dp=1: nothing to shard; "
            f"pin zero_stage=0, or dp > 1"
        )
    if pins["tp"] and check_tp(profile, pins["tp"]):
        raise AutoplanError(check_tp(profile, pins["tp"]))
    if all(pins.values()) and pins["dp"] * pins["tp"] * pins["pp"] != world:
        raise AutoplanError(
            f"dp({pins['dp']}) * tp({pins['tp']}) * pp({pins['pp']}) = "
            f"{pins['dp'] * pins['tp'] * pins['pp']} != world_size({world})"
        )
    for axis, value in pins.items():
        if value and world % value:
            raise AutoplanError(f"{axis}={value} does not divide world_size({world})")
    if pins["tp"]:
        tps = [pins["tp"]]
    else:
        tps = [t for t in _divisors(cluster.devices_per_node) if world % t == 0 and not check_tp(profile, t)]
    meshes = []
    for tp in tps:
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            if (pins["pp"] or pp) != pp or (pins["dp"] or dp) != dp:
                continue
            if pp > num_blocks and not pins["pp"]:
                continue
            meshes.append((dp, pp, tp))
    if not meshes:
        raise AutoplanError(
            f"no mesh dp * pp * tp = world_size({world}) satisfies the pins { {k: v for k, v in pins.items() if v} }"
        )
    if constraints.zero_stage and all(dp == 1 for dp, _, _ in meshes):
        dp, pp, tp = meshes[0]
        raise AutoplanError(
            f"zero_stage={constraints.zero_stage} shards model states over dp, but the pins leave dp = "
            f"world_size({world}) / (pp({pp}) * tp({tp})) = 1: nothing to shard; "
            "pin zero_stage=0, or a smaller pp or tp"
        )
    for _dp, pp, _tp in meshes:
        if pp > num_blocks:
            raise AutoplanError(
                f"pp={pp} exceeds the {num_blocks} repeated blocks the model can be cut into"
                + (f": {cut_blocker}" if cut_blocker else "")
            )
    return meshes


def micro_batch_sizes(global_batch: int, dp: int, pinned: int | None) -> list[int]:
    """b such that global_batch % (dp * b) == 0.

    >>> micro_batch_sizes(64, 4, None)
    [1, 2, 4, 8, 16]
    """
    if pinned:
        if global_batch % (dp * pinned):
            raise AutoplanError(
                f"global batch {global_batch} is not divisible by dp({dp}) * micro_batch_size({pinned}) = {dp * pinned}"
            )
        return [pinned]
    if global_batch % dp:
        return []
    return [b for b in _divisors(global_batch // dp) if b <= MAX_MICRO_BATCH_SIZE]


def schedule_options(
    pp: int, num_micro_batches: int, num_blocks: int, constraints: Constraints
) -> list[tuple[str, int]]:
    """(schedule, virtual stages) choices: 1F1B needs m >= pp and interleaving m % pp == 0
    (torch.distributed.pipelining, as Megatron-LM) and at least v blocks per rank."""
    options: list[tuple[str, int]]
    if pp == 1:
        options = [(constraints.schedule or "1f1b", 1)]
    else:
        virtual = [constraints.virtual_stages] if constraints.virtual_stages else list(VIRTUAL_STAGE_OPTIONS)
        # torch's Schedule1F1B needs at least one micro-batch per pipeline rank.
        options = (
            [("gpipe", 1)]
            + ([("1f1b", 1)] if num_micro_batches >= pp else [])
            + [
                ("interleaved_1f1b", v)
                for v in virtual
                if v > 1 and num_blocks >= pp * v and num_micro_batches % pp == 0
            ]
        )
        if constraints.schedule:
            options = [o for o in options if o[0] == constraints.schedule]
        if constraints.virtual_stages and constraints.schedule != "interleaved_1f1b":
            options = [o for o in options if o[1] == constraints.virtual_stages]
    return options
