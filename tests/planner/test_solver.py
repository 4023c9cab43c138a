"""The MILP is exact: on small instances the free optimum equals brute force over every
configuration and layer placement, evaluated by the same cost model. Pins and errors."""

from __future__ import annotations

import itertools

import pytest

from autoplan.costmodels.pipeline import estimate_step
from autoplan.costmodels.uncertainty import memory_margin, usable_memory_bytes
from autoplan.planner.solver import solve
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints
from autoplan.schema.parallel import ParallelConfig
from autoplan.schema.plan import TPSite
from autoplan.schema.profile import LayerProfile, ModelProfile

OPTIONS = ("none", "selective", "full")
NUM_BLOCKS = 4


def tiny_cluster(
    memory_bytes: int = 2_000_000_000, memory_bandwidth_gbps: float = 100.0, bfloat16_flops: float = 4e12
) -> ClusterSpec:
    """2 nodes x 2 devices, small and slow so that memory binds and links matter. The device holds
    `memory_bytes` x (1 + the cuda memory margin): the planner fits a plan's upper bound, so its
    predicted peak may reach 0.9 x `memory_bytes`, whatever the residuals of the day."""
    return ClusterSpec.model_validate(
        {
            "name": "tiny",
            "num_nodes": 2,
            "devices_per_node": 2,
            "device": {
                "name": "tiny",
                "memory_bytes": round(memory_bytes * (1 + memory_margin("cuda"))),
                "memory_bandwidth_gbps": memory_bandwidth_gbps,
                "peak_flops": {"float32": 1e12, "bfloat16": bfloat16_flops},
            },
            "intra_node": {"bandwidth_gbps": 50.0, "latency_us": 2.0},
            "inter_node": {"bandwidth_gbps": 5.0, "latency_us": 10.0},
        }
    )


def tiny_profile(global_batch: int = 8, heads: int = 4, selective_bytes: float = 1.5e8) -> ModelProfile:
    blocks = [
        LayerProfile(
            name=f"blocks.{i}",
            signature="block",
            param_count=50_000_000,
            tp_param_count=48_000_000,
            param_tensors=12,
            fwd_flops=1e11,
            bwd_flops=2e11,
            tp_flops_fraction=0.95,
            elementwise_bytes=2e8,
            saved_bytes={"none": 4e8, "selective": selective_bytes, "full": 2e7},
            tp_saved_bytes={"none": 3e8, "selective": selective_bytes * 2 / 3, "full": 0.0},
            output_bytes=1e7,
            tp_allreduce_bytes_fwd=2e7,
            tp_allreduce_bytes_bwd=2e7,
            tp_divisors={f"blocks.{i}.attn heads": heads},
            # the trace marks where sequence parallelism enters the blocks: without it, SP is not offered
            tp_sites={"blocks.0": TPSite(style="sequence_parallel_entry")} if i == 0 else {},
        )
        for i in range(NUM_BLOCKS)
    ]
    embed_params = dict(param_count=20_000_000, tp_param_count=20_000_000, param_tensors=1)
    embed = LayerProfile(
        name="embed",
        signature="embed",
        **embed_params,
        fwd_flops=0.0,
        bwd_flops=0.0,
        saved_bytes={o: 1e7 for o in OPTIONS},
        output_bytes=1e7,
        tp_allreduce_bytes_fwd=1e7,
    )
    head = LayerProfile(
        name="head",
        signature="head",
        param_count=1000,
        fwd_flops=5e10,
        bwd_flops=1e11,
        tp_flops_fraction=1.0,
        elementwise_bytes=1e8,
        saved_bytes={"none": 2e8, "selective": 2e8, "full": 1e7},
        tp_saved_bytes={"none": 1.5e8, "selective": 1.5e8, "full": 0.0},
        output_bytes=5e7,
        tp_allreduce_bytes_bwd=1e7,
    )
    layers = [embed, *blocks, head]
    return ModelProfile(
        model_name="tiny",
        layers=layers,
        global_batch_size=global_batch,
        seq_len=16,
        input_bytes=128,
        fingerprint="tiny",
        num_params=sum(layer.param_count for layer in layers),
        model_flops_per_sequence=sum(layer.fwd_flops + layer.bwd_flops for layer in layers),
    )


def compositions(total: int, parts: int, minimum: int):
    if parts == 1:
        if total >= minimum:
            yield (total,)
        return
    for first in range(minimum, total - minimum * (parts - 1) + 1):
        for rest in compositions(total - first, parts - 1, minimum):
            yield (first, *rest)


def brute_force(
    profile: ModelProfile,
    cluster: ClusterSpec,
    pins: dict | None = None,
    block_options: tuple = OPTIONS,
    dtypes: tuple[dict, ...] | None = None,
) -> float:
    """min step time over every mesh, micro-batch, schedule, ZeRO, SP, block split and
    choice per block among `block_options` (blocks between the embedding on the first and
    the head on the last rank), written from the rules, not from the solver."""
    pins = pins or {}
    world, cap = cluster.world_size, usable_memory_bytes(0.9 * cluster.device.memory_bytes, cluster.device.kind)
    best = float("inf")
    for tp in (1, 2):
        for pp in (1, 2, 4):
            if world % (tp * pp) or pp > NUM_BLOCKS:
                continue
            dp = world // (tp * pp)
            mesh = {"dp": dp, "tp": tp, "pp": pp}
            if any(pins.get(axis, value) != value for axis, value in mesh.items()):
                continue
            for mbs in (1, 2, 4, 8):
                if profile.global_batch_size % (dp * mbs) or pins.get("micro_batch_size", mbs) != mbs:
                    continue
                m = profile.global_batch_size // (dp * mbs)
                schedules = (
                    [("1f1b", 1)]
                    if pp == 1
                    else [("gpipe", 1), ("1f1b", 1)]
                    + [("interleaved_1f1b", v) for v in (2, 4) if NUM_BLOCKS >= pp * v and m % pp == 0]
                )
                for (schedule, v), zero, sp in itertools.product(
                    schedules, (0, 1, 3) if dp > 1 else (0,), (False, True) if tp > 1 else (False,)
                ):
                    choice = {"schedule": schedule, "zero_stage": zero, "sequence_parallel": sp}
                    if any(pins.get(name, value) != value for name, value in choice.items()):
                        continue
                    options = (pins["recompute"],) if "recompute" in pins else block_options
                    for dtype in dtypes or (BF16,):
                        config = ParallelConfig(
                            mesh=mesh, micro_batch_size=mbs, num_micro_batches=m, virtual_stages=v, **choice, **dtype
                        )
                        best = min(best, best_placement(profile, cluster, config, cap, options))
    return best


BF16 = {"param_dtype": "bfloat16", "grad_reduce_dtype": "bfloat16"}
FP32 = {"param_dtype": "float32", "grad_reduce_dtype": "float32"}


def best_placement(profile, cluster, config, cap, block_options) -> float:
    best = float("inf")
    for counts in compositions(NUM_BLOCKS, config.pp, config.virtual_stages):
        per_rank = [list(itertools.combinations_with_replacement(block_options, c)) for c in counts]
        for choice in itertools.product(*per_rank):
            for first, last in itertools.product(OPTIONS, OPTIONS):
                blocks = iter(range(1, NUM_BLOCKS + 1))
                ranks = [[(next(blocks), option) for option in options] for options in choice]
                ranks[0].insert(0, (0, first))
                ranks[-1].append((NUM_BLOCKS + 1, last))
                estimate = estimate_step(profile, cluster, config, ranks)
                if estimate.peak_memory_bytes <= cap:
                    best = min(best, estimate.step_time_s)
    return best


def test_free_optimum_equals_brute_force():
    profile, cluster = tiny_profile(), tiny_cluster()
    result = solve(profile, cluster)
    assert result.best.estimate.peak_memory_bytes <= 0.9 * cluster.device.memory_bytes
    # on a GPU the parameters compute in bfloat16 or float32: both are searched
    brute = brute_force(profile, cluster, dtypes=(BF16, FP32))
    assert result.best.estimate.step_time_s == pytest.approx(brute, rel=2e-4)


def shared_core_cluster() -> ClusterSpec:
    """tiny_cluster as CPU ranks sharing cores: bubbles discounted, nothing overlapped,
    a fixed cost per collective."""
    data = tiny_cluster().model_dump()
    data["device"].update(
        shared_core_slowdown=2.5,
        ranks_per_core=2.0,
        overlaps_communication=False,
        adam_bytes_per_param=100.0,
        tp_dispatch_overhead_us=2000.0,
        dtensor_param_step_us=700.0,
    )
    for link in ("intra_node", "inter_node"):
        data[link].update(collective_overhead_us=3000.0, p2p_overhead_us=1500.0)
    return ClusterSpec.model_validate(data)


def test_shared_cores_optimum_equals_brute_force():
    profile, cluster = tiny_profile(), shared_core_cluster()
    result = solve(profile, cluster)
    assert result.best.estimate.step_time_s == pytest.approx(brute_force(profile, cluster), rel=2e-4)
    # the terms are live: the same plan costs more with them than on tiny_cluster
    plain = estimate_step(profile, tiny_cluster(), result.best.config, result.best.rank_layers)
    assert result.best.estimate.step_time_s != pytest.approx(plain.step_time_s, rel=1e-3)


def test_tighter_memory_forces_recompute_and_stays_exact():
    profile, cluster = tiny_profile(), tiny_cluster(memory_bytes=1_500_000_000)
    result = solve(profile, cluster)
    options = {option for rank in result.best.rank_layers for _, option in rank}
    assert options != {"none"}
    assert result.best.estimate.step_time_s == pytest.approx(brute_force(profile, cluster), rel=2e-4)


def test_pins_are_honoured_and_exact_under_the_pins():
    profile, cluster = tiny_profile(), tiny_cluster()
    pins = {"dp": 1, "tp": 2, "pp": 2, "micro_batch_size": 2, "schedule": "1f1b", "recompute": "selective"}
    result = solve(profile, cluster, Constraints(**pins))
    config = result.best.config
    assert (config.dp, config.tp, config.pp, config.micro_batch_size, config.schedule) == (1, 2, 2, 2, "1f1b")
    block_options = {option for rank in result.best.rank_layers for index, option in rank if 1 <= index <= NUM_BLOCKS}
    assert block_options == {"selective"}
    assert result.best.estimate.step_time_s == pytest.approx(brute_force(profile, cluster, pins), rel=2e-4)


def test_fully_pinned_config_is_evaluated():
    profile, cluster = tiny_profile(), tiny_cluster(memory_bytes=8_000_000_000)
    pins = dict(
        dp=2, tp=1, pp=2, micro_batch_size=1, schedule="gpipe", zero_stage=0, recompute="full", sequence_parallel=False
    )
    config = solve(profile, cluster, Constraints(**pins)).best.config
    chosen = (config.schedule, config.zero_stage, config.sequence_parallel, config.num_micro_batches)
    assert chosen == ("gpipe", 0, False, 4)


def test_runners_up_say_why_they_lost():
    result = solve(tiny_profile(), tiny_cluster())
    assert result.runners_up
    assert all(r.why for r in result.runners_up)
    slower = [r for r in result.runners_up if r.step_time_s is not None]
    assert all(r.step_time_s >= result.best.estimate.step_time_s for r in slower)


def test_tp_must_divide_heads():
    with pytest.raises(ValueError, match=r"tp=3 does not divide blocks.0.attn heads=32"):
        solve(tiny_profile(heads=32), tiny_cluster(), Constraints(tp=3))


def test_global_batch_must_divide():
    with pytest.raises(ValueError, match=r"global batch 10 is not divisible by dp\(4\) \* micro_batch_size\(3\) = 12"):
        solve(tiny_profile(global_batch=10), tiny_cluster(), Constraints(dp=4, micro_batch_size=3))


def test_mesh_must_match_world_size():
    with pytest.raises(ValueError, match=r"dp\(2\) \* tp\(3\) \* pp\(1\) = 6 != world_size\(4\)"):
        solve(tiny_profile(heads=6), tiny_cluster(), Constraints(dp=2, tp=3, pp=1))


FLOAT8_STORED = "none@float8_e4m3fn"


def test_lossy_storage_optimum_equals_brute_force_and_beats_exact():
    """With allow_lossy a block may store its activations in float8 instead of recomputing:
    where memory binds, selective recompute keeps most of the bytes, recomputing is slow and
    the casts are cheap (fast memory), the MILP takes it and still equals brute force over
    every per-block choice (the exact options and float8 storage)."""
    profile = tiny_profile(selective_bytes=3.9e8)
    cluster = tiny_cluster(memory_bytes=2_500_000_000, memory_bandwidth_gbps=2000.0, bfloat16_flops=1e12)
    result = solve(profile, cluster, Constraints(allow_lossy=True))
    exact = solve(profile, cluster).best.estimate.step_time_s
    chosen = {option for rank in result.best.rank_layers for _, option in rank}
    assert FLOAT8_STORED in chosen
    assert result.best.config.grad_reduce_dtype == "bfloat16"  # the parameters' dtype: nothing to narrow
    assert result.best.estimate.step_time_s < exact
    brute = brute_force(profile, cluster, block_options=(*OPTIONS, FLOAT8_STORED))
    assert result.best.estimate.step_time_s == pytest.approx(brute, rel=2e-4)


def test_float32_lossy_options_equal_brute_force():
    """Under float32 parameters the blocks may store bfloat16 or float8, and gradients are
    reduced in bfloat16 (which dominates float32 reduction: the solver does not search it)."""
    profile = tiny_profile(selective_bytes=3.5e8)
    cluster = tiny_cluster(memory_bytes=2_500_000_000, memory_bandwidth_gbps=2000.0)
    pins = {"dp": 2, "tp": 1, "pp": 2}
    result = solve(profile, cluster, Constraints(allow_lossy=True, param_dtype="float32", **pins))
    config = result.best.config
    assert (config.param_dtype, config.grad_reduce_dtype) == ("float32", "bfloat16")
    options = (*OPTIONS, "none@bfloat16", FLOAT8_STORED)
    dtypes = ({"param_dtype": "float32", "grad_reduce_dtype": "bfloat16"},)
    brute = brute_force(profile, cluster, pins, options, dtypes)
    assert result.best.estimate.step_time_s == pytest.approx(brute, rel=2e-4)


def test_pinned_activation_storage_is_every_block():
    profile, cluster = tiny_profile(), tiny_cluster()
    result = solve(profile, cluster, Constraints(activation_dtype="float8_e4m3fn"))
    block_options = {option for rank in result.best.rank_layers for index, option in rank if 1 <= index <= NUM_BLOCKS}
    assert block_options == {FLOAT8_STORED}
    pins = {"recompute": FLOAT8_STORED}
    assert result.best.estimate.step_time_s == pytest.approx(brute_force(profile, cluster, pins), rel=2e-4)


@pytest.mark.parametrize(
    "pins, message",
    [
        (
            {"activation_dtype": "float32"},
            r"activation_dtype=float32 cannot store activations computed in "
            r"param_dtype=bfloat16",
        ),
        ({"activation_dtype": "fp8", "recompute": "full"}, r"it needs recompute='none', not recompute='full'"),
        (
            {"matmul_dtype": "float8_e4m3fn"},
            r"needs float8 tensor cores .* device tiny \(cuda\) multiplies in "
            r"bfloat16, float32",
        ),
        ({"matmul_dtype": "float16"}, r"matmul_dtype=float16: matmuls run in param_dtype=bfloat16 or in float8"),
    ],
)
def test_precision_pins_the_backend_cannot_run_are_refused(pins, message):
    with pytest.raises(ValueError, match=message):
        solve(tiny_profile(), tiny_cluster(), Constraints(**pins))


def test_infeasible_memory_names_the_smallest_need():
    cluster = tiny_cluster(memory_bytes=100_000_000)
    cap_gb = 0.9 * cluster.device.memory_bytes / 1e9
    with pytest.raises(ValueError, match=rf"smallest plan needs [0-9.]+ GB per device > {cap_gb:.2f} GB") as error:
        solve(tiny_profile(), cluster)
    assert "optimizer_states" in str(error.value)


def test_float8_matmuls_equal_brute_force_where_the_device_has_them():
    """On a device with float8 tensor cores the blocks' Linears multiply in float8 when that is
    faster (it changes no memory, so it dominates); the optimum equals brute force over the
    float8 variants of every block option and beats brute force over the exact ones."""
    data = tiny_cluster(memory_bytes=2_500_000_000, memory_bandwidth_gbps=2000.0).model_dump()
    data["device"]["peak_flops"]["float8_e4m3fn"] = 8e12
    profile, cluster = tiny_profile(selective_bytes=3.5e8), ClusterSpec.model_validate(data)
    result = solve(profile, cluster, Constraints(allow_lossy=True))
    blocks = {option for rank in result.best.rank_layers for index, option in rank if 1 <= index <= NUM_BLOCKS}
    assert all(option.endswith("/float8_e4m3fn") for option in blocks)
    ends = {option for rank in result.best.rank_layers for index, option in rank if index in (0, NUM_BLOCKS + 1)}
    assert not any("float8" in option for option in ends)
    options = (*OPTIONS, FLOAT8_STORED)
    brute = brute_force(profile, cluster, block_options=tuple(f"{o}/float8_e4m3fn" for o in options))
    assert result.best.estimate.step_time_s == pytest.approx(brute, rel=2e-4)
    assert brute < brute_force(profile, cluster, block_options=options)
