"""Datasheet figures for the cluster presets, each with its source.

Every constant `autoplan calibrate` can replace is listed in `CALIBRATED_CONSTANTS`
with where its default comes from; `docs/cost_model.md` prints them beside the values
measured on this machine.
"""

from __future__ import annotations

import os

GB = 1e9
GiB = 1024**3

# NVIDIA A100 Tensor Core GPU datasheet (2021, SXM4): FP32 19.5 TFLOP/s, TF32 156,
# BF16/FP16 312 (dense); HBM2e 80 GB at 2,039 GB/s (40 GB: HBM2 at 1,555 GB/s).
# NVLink 3: 600 GB/s total per GPU = 300 GB/s one direction.
# DGX A100 user guide: 8x ConnectX-6 200 Gb/s HDR per node = 25 GB/s per GPU one direction.
_A100_PEAKS = {"float32": 19.5e12, "bfloat16": 312e12, "float16": 312e12}
_NVLINK3 = {"bandwidth_gbps": 300.0, "latency_us": 3.0}
_HDR_IB = {"bandwidth_gbps": 25.0, "latency_us": 5.0, "tree_all_reduce": True}
# NVIDIA H100 datasheet (SXM5): FP32 67 TFLOP/s, BF16/FP16 989.5 dense, FP8 1,979 dense
# (3,958 with sparsity); HBM3 80 GB at 3,350 GB/s. NVLink 4: 900 GB/s total = 450 GB/s one
# direction. DGX H100: 8x ConnectX-7 400 Gb/s NDR per node = 50 GB/s per GPU one direction.
_H100_PEAKS = {"float32": 67e12, "bfloat16": 989.5e12, "float16": 989.5e12, "float8_e4m3fn": 1979e12}
_NVLINK4 = {"bandwidth_gbps": 450.0, "latency_us": 3.0}
_NDR_IB = {"bandwidth_gbps": 50.0, "latency_us": 5.0, "tree_all_reduce": True}
# Latencies: NCCL tests on DGX systems show ~3 us NVLink and ~5 us IB small-message latency.
# Framework overhead: CUDA context (~0.5-1 GiB) + cuBLAS workspace + allocator
# fragmentation, estimated at 2 GiB for every GPU; not yet measured (no GPU lent so far:
# benchmarks/gpu_validation.py checks it, docs/validation.md).
_CUDA_OVERHEAD_BYTES = 2 * GiB
# Fused attention (FlashAttention-2, what F.scaled_dot_product_attention runs for training) on the
# FLOPs it runs: "50-73% of the theoretical maximum FLOPs/s on A100" (Dao, FlashAttention-2,
# 2023, abstract; 0.6 within that range) and "only 35% utilization on the H100" (Shah et al.,
# FlashAttention-3, 2024, abstract), against the dense BF16 peak.
_A100_ATTENTION_EFFICIENCY = 0.6
_H100_ATTENTION_EFFICIENCY = 0.35
# The CUDA caching allocator's reserve beyond allocated tensors (max_memory_reserved over
# max_memory_allocated, less 1): 8%, the one constant fitted to torchtitan's four published
# 8B FSDP peaks (max_reserved; benchmarks/torchtitan_h100.py), eager and compiled rows alike.
_CUDA_ALLOCATOR_RESERVE = 0.08


def _dgx(
    name: str, memory_gb: float, bandwidth: float, peaks: dict, attention: float, intra: dict, inter: dict
) -> dict:
    return {
        "devices_per_node": 8,
        "device": {
            "name": name,
            "kind": "cuda",
            "memory_bytes": int(memory_gb * GB),
            "memory_bandwidth_gbps": bandwidth,
            "peak_flops": dict(peaks),
            "attention_efficiency": attention,
            "framework_overhead_bytes": _CUDA_OVERHEAD_BYTES,
            "allocator_reserve_fraction": _CUDA_ALLOCATOR_RESERVE,
        },
        "intra_node": dict(intra),
        "inter_node": dict(inter),
    }


PRESETS: dict[str, dict] = {
    "dgx-a100-40gb": _dgx("A100-SXM4-40GB", 40, 1555.0, _A100_PEAKS, _A100_ATTENTION_EFFICIENCY, _NVLINK3, _HDR_IB),
    "dgx-a100-80gb": _dgx("A100-SXM4-80GB", 80, 2039.0, _A100_PEAKS, _A100_ATTENTION_EFFICIENCY, _NVLINK3, _HDR_IB),
    "dgx-h100": _dgx("H100-SXM5-80GB", 80, 3350.0, _H100_PEAKS, _H100_ATTENTION_EFFICIENCY, _NVLINK4, _NDR_IB),
    # NVIDIA H200 datasheet: 141 GB HBM3e at 4,800 GB/s; compute as H100 SXM.
    "dgx-h200": _dgx("H200-SXM-141GB", 141, 4800.0, _H100_PEAKS, _H100_ATTENTION_EFFICIENCY, _NVLINK4, _NDR_IB),
}

# `local`: CPU processes on this machine over gloo. No datasheet applies; these are
# conservative figures for one core of a current x86 server (AVX2 FMA at ~2.5 GHz:
# 2 FMA units x 8 float32 lanes x 2 FLOP = 32 FLOP/cycle ~ 80 GFLOP/s peak; BF16 has no
# native matmul on most CPUs, so it runs at about float32 speed). Loopback gloo moves
# roughly 1-2 GB/s with ~50 us latency. `autoplan calibrate` measures all of these.
LOCAL_PEAK_FLOPS = {"float32": 80e9, "bfloat16": 40e9, "float16": 20e9}
LOCAL_MEMORY_BANDWIDTH_GBPS = 10.0
# A CPU core's float32 GEMM rate is flat from n=128 (2 * 128^3 = 4e6 FLOPs per call,
# `autoplan calibrate` on this machine), so a layer's matmuls reach half speed far below
# a GPU's 2e9: 1e6 FLOPs.
LOCAL_HALF_EFFICIENCY_FLOPS = 1e6
LOCAL_LINK = {"bandwidth_gbps": 1.0, "latency_us": 50.0}
# torch.optim.AdamW's multi-tensor (foreach) path on a CPU makes about a dozen passes
# over parameter-sized tensors; measured here as ~100 bytes moved per parameter.
LOCAL_ADAM_BYTES_PER_PARAM = 100.0
# DTensor's host work per tensor-parallel site (a split Linear's forward + backward):
# `autoplan calibrate` measured 2.2-3.0 ms with 4 ranks on this 2-core machine (all busy,
# shared-core slowdown ~2.5), i.e. ~1 ms for a rank with a core of its own.
LOCAL_TP_DISPATCH_US = 1000.0
# An AdamW step over DTensor parameters: 0.6-0.7 ms more per tensor than over plain ones,
# measured the same way (4 ranks, 2 cores): ~0.25 ms for a rank with a core of its own.
LOCAL_DTENSOR_STEP_US = 250.0
# A Python process with torch and gloo imported holds ~300 MB resident before any model.
LOCAL_OVERHEAD_BYTES = 300 * 1024**2

CALIBRATED_CONSTANTS = {
    "device.peak_flops.float32": "GPU datasheets (A100 19.5 TFLOP/s FP32, ...); local: one core, "
    "AVX2 FMA, 32 FLOP/cycle x 2.5 GHz, times cores / ranks",
    "device.peak_flops.bfloat16": "GPU datasheets (dense tensor core); local: half the float32 guess",
    "device.matmul_efficiency": "0.7: large-GEMM share of peak reported by Megatron-LM (SC21)",
    "device.memory_bandwidth_gbps": "HBM datasheets (A100-80GB 2,039 GB/s, ...); local: 10 GB/s a core",
    "device.memory_efficiency": "0.8: STREAM-like share of datasheet HBM bandwidth",
    "device.adam_bytes_per_param": "28: a fused Adam kernel's reads and writes; local: ~100 (multi-tensor passes)",
    "device.shared_core_slowdown": "1 on GPUs; local: ranks / cores",
    "device.op_overhead_us": "0 in every preset (GPUs: host work runs ahead of the kernels); measured on CPU "
    "ranks by the host probe (a GPT block of width 32, from cold caches)",
    "device.tp_dispatch_overhead_us": "0 on GPUs (host work runs ahead of the kernels); local: 1 ms a core, "
    "times ranks / cores",
    "device.dtensor_param_step_us": "0 on GPUs (host work runs ahead of the kernels); local: 0.25 ms a core, "
    "times ranks / cores",
    "intra_node.bandwidth_gbps": "NVLink datasheet (GPU) / loopback gloo guess (local)",
    "intra_node.latency_us": "NCCL tests small-message latency (GPU) / loopback guess (local)",
    "intra_node.collective_overhead_us": "0: NCCL calls are asynchronous; measured on CPU ranks",
    "intra_node.p2p_overhead_us": "0: NCCL sends are asynchronous; measured on CPU ranks",
    "inter_node.bandwidth_gbps": "InfiniBand HCA rate per GPU (DGX user guides); local: = intra_node",
}
"""Every cost-model constant `autoplan calibrate` replaces (a ClusterSpec field path) and the
source of its preset value; `python benchmarks/constants.py` prints them beside the values
measured on this machine."""


def local_cluster_fields(world_size: int) -> dict:
    """The `local` preset: `world_size` CPU processes sharing this machine's memory."""
    try:
        total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total_bytes = 16 * GiB
    # Each rank runs one thread; with more ranks than cores they share the cores.
    core_share = min(1.0, (os.cpu_count() or 1) / max(world_size, 1))
    return {
        "devices_per_node": world_size,
        "device": {
            "name": "cpu",
            "kind": "cpu",
            "memory_bytes": int(total_bytes // max(world_size, 1)),
            "memory_bandwidth_gbps": LOCAL_MEMORY_BANDWIDTH_GBPS * core_share,
            "peak_flops": {dtype: flops * core_share for dtype, flops in LOCAL_PEAK_FLOPS.items()},
            "matmul_half_efficiency_flops": LOCAL_HALF_EFFICIENCY_FLOPS,
            "framework_overhead_bytes": 0,
            "adam_bytes_per_param": LOCAL_ADAM_BYTES_PER_PARAM,
            "shared_core_slowdown": 1.0 / core_share,
            "ranks_per_core": 1.0 / core_share,
            "tp_dispatch_overhead_us": LOCAL_TP_DISPATCH_US / core_share,
            "dtensor_param_step_us": LOCAL_DTENSOR_STEP_US / core_share,
            "overlaps_communication": False,
        },
        "intra_node": dict(LOCAL_LINK),
        "inter_node": dict(LOCAL_LINK),
    }
