"""The MILP is exact: on small instances the free optimum equals brute force over every
configuration and layer placement, evaluated by the same cost model. Pins and errors."""

from __future__ import annotations

import itertools

import pytest

from autoplan.costmodels.pipeline import estimate_step
from autoplan.planner.solver import solve
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints
from autoplan.schema.parallel import ParallelConfig
from autoplan.schema.plan import TPSite
from autoplan.schema.profile import LayerProfile, ModelProfile

OPTIONS = ("none", "selective", "full")
NUM_BLOCKS = 4


def tiny_cluster(memory_bytes: int = 2_000_000_000) -> ClusterSpec:
    """2 nodes x 2 devices, small and slow so that memory binds and links matter."""
    return ClusterSpec.model_validate(
        {
            "name": "tiny",
            "num_nodes": 2,
            "devices_per_node": 2,
            "device": {
                "name": "tiny",
                "memory_bytes": memory_bytes,
                "memory_bandwidth_gbps": 100.0,
                "peak_flops": {"float32": 1e12, "bfloat16": 4e12},
            },
            "intra_node": {"bandwidth_gbps": 50.0, "latency_us": 2.0},
            "inter_node": {"bandwidth_gbps": 5.0, "latency_us": 10.0},
        }
    )


def tiny_profile(global_batch: int = 8, heads: int = 4) -> ModelProfile:
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
            saved_bytes={"none": 4e8, "selective": 1.5e8, "full": 2e7},
            tp_saved_bytes={"none": 3e8, "selective": 1e8, "full": 0.0},
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


def brute_force(profile: ModelProfile, cluster: ClusterSpec, pins: dict | None = None) -> float:
    """min step time over every mesh, micro-batch, schedule, ZeRO, SP, block split and
    recompute choice (blocks between the embedding on the first and the head on the last
    rank), written from the rules, not from the solver."""
    pins = pins or {}
    world, cap = cluster.world_size, 0.9 * cluster.device.memory_bytes
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
                    config = ParallelConfig(
                        mesh=mesh, micro_batch_size=mbs, num_micro_batches=m, virtual_stages=v, **choice, **BF16
                    )
                    best = min(best, best_placement(profile, cluster, config, cap, pins.get("recompute")))
    return best


BF16 = {"param_dtype": "bfloat16", "grad_reduce_dtype": "bfloat16"}


def best_placement(profile, cluster, config, cap, block_option) -> float:
    best = float("inf")
    block_options = (block_option,) if block_option else OPTIONS
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
    assert result.best.estimate.step_time_s == pytest.approx(brute_force(profile, cluster), rel=2e-4)


def shared_core_cluster() -> ClusterSpec:
    """tiny_cluster as CPU ranks sharing cores: bubbles discounted, nothing overlapped,
    a fixed cost per collective."""
    data = tiny_cluster().model_dump()
    data["device"].update(
        shared_core_slowdown=2.5,
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


def test_activation_dtype_is_not_supported_yet():
    with pytest.raises(ValueError, match=r"activation_dtype \(quantized activation storage\) is not supported yet"):
        solve(tiny_profile(), tiny_cluster(), Constraints(activation_dtype="bfloat16"))


def test_infeasible_memory_names_the_smallest_need():
    with pytest.raises(ValueError, match=r"smallest plan needs [0-9.]+ GB per device > 0.09 GB") as error:
        solve(tiny_profile(), tiny_cluster(memory_bytes=100_000_000))
    assert "optimizer_states" in str(error.value)
