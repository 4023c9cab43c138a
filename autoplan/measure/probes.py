"""The probes calibration runs on each spawned rank (`autoplan.measure.calibrate`, whose
docstring says what each measures and how it becomes a cost-model constant): matmul and
elementwise rates, an AdamW step, collectives, and on CPU ranks the shared-core slowdown,
the overhead of collectives and pipeline sends under load, and DTensor's host time.

Every function here runs inside an initialised process group (`torch.distributed`), on
every rank at once unless it says otherwise; a probe that compares two ways of doing one
step takes the median of several alternations, because a shared machine's scheduler makes
single timings scatter by tens of percent. The probe sizes below are chosen so that their
working sets overflow the caches as a model's do, or (the dispatch probe) so that host
work dominates.
"""

from __future__ import annotations

import statistics
import time

import torch

ELEMENTWISE_NUMEL: dict[str, int] = {"cpu": 4 * 1024 * 1024, "cuda": 64 * 1024 * 1024}
"""Elements per float32 operand of the elementwise timing: 16 MiB on CPU; 256 MiB on a GPU,
well beyond its L2 cache."""
MIN_TIME_S = 0.05
"""Time each matmul / elementwise measurement runs for (repeating the op)."""
MAX_SINGLE_OP_S = 0.1
"""A dtype's size ladder stops after a single matmul takes this long (slow CPU bf16)."""
COLLECTIVE_REPEATS = 9
"""Timed repetitions per collective and size (after one warm-up); the median is kept."""
SHARING_MLP = (256, 512, 2)
"""The shared-core probe: tokens, width, blocks of (Linear(w, 4w), GELU, Linear(4w, w)), forward +
backward: 4 M parameters, ~0.1 s per step alone, so the cores' caches are shared as a model's are."""
SHARING_ROUNDS = 4
"""Steps per timing of the shared-core probe: ~0.35 s alone, ~0.9 s with 4 ranks on 2 cores. Timed
as the median of ~3 single steps instead, the slowest of 4 ranks scattered from 2.2 to 3.1
between calibrations (one step all busy is a few scheduler slices)."""
SHARING_REPEATS = 10
"""Alone / all-busy alternations of the shared-core probe (the trimmed mean of their ratios is
kept: a shared machine's scheduler makes single timings scatter by +-30%)."""
LOADED_MLP = (64, 256, 1)
"""The collective-overhead probe's compute between two all-reduces (~4 ms alone, ~9 ms with 4
ranks on 2 cores). The wait it measures hardly depends on it (4 ranks, 2 cores: 9.0 ms per
all-reduce and 3.1 ms per send with this, 10.7 and 3.5 ms with 256 tokens), but a round's noise
grows with it: the alternations' differences scattered 1.3 / 0.9 ms (sd) here, 3.6 / 3.7 ms
with 256 tokens, in 2.4x the time."""
LOADED_ROUNDS = 20
"""MLP step + small all-reduce (or ring exchange) rounds of the loaded-overhead probes (CPU)."""
LOADED_REPEATS = 16
"""With / without alternations of the loaded-overhead probes (`_mean_extra_s`: the trimmed mean
of the neighbours' differences is kept)."""
DISPATCH_MLP = (16, 64)
"""The DTensor-dispatch probe: tokens, width of a colwise Linear(w, 4w) + rowwise Linear(4w, w)
pair, small enough that its matmuls take microseconds and the host work is what is timed."""
DISPATCH_PARAMS = (32, 4096)
"""The DTensor optimizer probe: parameter tensors x elements, sharded over the probe's pairs."""
DISPATCH_ROUNDS = 20
"""Forward + backward steps per timing of the DTensor-dispatch probe."""
DISPATCH_REPEATS = 10
"""DTensor / by-hand alternations of the dispatch probe (`_mean_extra_s`)."""
BLOCK_PROBE = (2, 128, 8, (256, 512))
"""The layer probe (CPU): sequences, tokens each, heads and the widths of a GPT transformer block
(`autoplan.zoo.gpt.Block`: attention and a 4h MLP) whose forward + backward is timed on rank 0
alone; the matmul rate written is the one that makes the roofline reproduce these times."""
HOST_PROBE = (1, 8, 2, (32,))
"""The host probe (CPU): the same block so small (one sequence of 8 tokens, width 32) that its
arithmetic is ~3% of its time. It dispatches the same ops as the layer probe, and its time over
their count is the host's work per op (`DeviceSpec.op_overhead_us`)."""
HOST_REPEATS = 15
"""Cold runs of the host probe; the least is kept."""
BLOCK_REPEATS = 5
"""Timings of each block probe (each the median of several steps); the least is kept (`_Timer.alone`)."""
ADAM_PARAMS = (32, 1 << 18)
"""The Adam probe's parameters, tensors x elements: 8 M, so its states (4 x 32 MiB) overflow the
caches as a model's do."""


class _Timer:
    """Seconds of one call of `fn`: perf_counter on CPU, CUDA events on a GPU."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def once(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    def repeated(self, fn) -> float:
        """Median seconds per call, repeating `fn` for about MIN_TIME_S after one warm-up call."""
        first = self.once(fn)
        times = [first] if first >= MIN_TIME_S else []
        while sum(times) < MIN_TIME_S or len(times) < 3 and sum(times) < 10 * MIN_TIME_S:
            times.append(self.once(fn))
        return statistics.median(times)

    def alone(self, fn, repeats: int = 3) -> float:
        """The least of `repeats` `repeated` timings of `fn`, for a rank timing alone: the
        machine's own speed, which another process can only lower. This 2-core VM's speed moves
        by up to 40% for seconds at a time with its host's load; two calibrations a minute apart
        kept the median of each probe's timings and predicted 23% apart, the least 3-8%. (A
        profile's layer times keep their median instead: they predict a run's typical speed.)"""
        return min(self.repeated(fn) for _ in range(repeats))


def _time_matmuls(
    timer: _Timer, dtype: torch.dtype, sizes: tuple[int, ...], active: bool = True
) -> list[tuple[int, float]]:
    """(n, FLOP/s) per size; the active ranks time the same size at once, all stop growing together
    (an inactive rank waits in the barriers and reports 0)."""
    import torch.distributed as dist

    points = []
    for n in sizes:
        a = torch.randn(n, n, device=timer.device).to(dtype)
        b = torch.randn(n, n, device=timer.device).to(dtype)
        dist.barrier()
        seconds = timer.alone(lambda a=a, b=b: torch.mm(a, b)) if active else 0.0
        points.append((n, 2 * n**3 / seconds if active else 0.0))
        slowest = torch.tensor([seconds], device=timer.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if slowest.item() > MAX_SINGLE_OP_S:
            break
    return points


def probe_block(width: int, probe: tuple = BLOCK_PROBE):
    """The transformer block of `probe` (BLOCK_PROBE or HOST_PROBE) at `width`, and its config."""
    from autoplan.zoo.gpt import Block, GPTConfig

    _, tokens, heads, _ = probe
    config = GPTConfig(num_layers=1, num_heads=heads, hidden=width, vocab_size=64, seq_len=tokens)
    return Block(config), config


def _block_step(timer: _Timer, width: int, probe: tuple = BLOCK_PROBE):
    """A call running one forward + backward of `probe`'s block at `width` on the timer's device."""
    sequences, tokens, _, _ = probe
    block, _ = probe_block(width, probe)
    block = block.to(timer.device)
    x = torch.randn(sequences, tokens, width, device=timer.device, requires_grad=True)

    def step() -> None:
        block(x).sum().backward()

    return step


def _time_blocks(timer: _Timer, active: bool = True) -> list[tuple[int, float]]:
    """(width, seconds of one forward + backward) of the layer probe at each width of BLOCK_PROBE:
    the least of BLOCK_REPEATS timings (an inactive rank waits in the barriers and reports 0)."""
    import torch.distributed as dist

    points = []
    for width in BLOCK_PROBE[3]:
        step = _block_step(timer, width)
        dist.barrier()
        points.append((width, timer.alone(step, BLOCK_REPEATS) if active else 0.0))
    return points


def _time_host_block(timer: _Timer, active: bool = True) -> float:
    """Seconds of one forward + backward of the host probe (HOST_PROBE), each run from cold
    caches as a profile times a layer (`analysis.measured_layer.FLUSH_BYTES`: inside a model step
    the other layers' traffic has evicted the host's dispatch state as well as the weights): the
    least of HOST_REPEATS runs (an inactive rank waits in the barrier and reports 0). Timed warm
    instead, it gave about half the cost per op on this 2-core VM."""
    import torch.distributed as dist

    from autoplan.analysis.measured_layer import _flush_caches

    step = _block_step(timer, HOST_PROBE[3][0], HOST_PROBE)
    step()  # warm-up: the first call builds what later calls reuse
    dist.barrier()
    if not active:
        return 0.0
    runs = []
    for _ in range(HOST_REPEATS):
        _flush_caches(timer.device)
        runs.append(timer.once(step))
    return min(runs)


def _time_elementwise(timer: _Timer) -> float:
    a, b, c = (torch.randn(ELEMENTWISE_NUMEL[timer.device.type], device=timer.device) for _ in range(3))
    seconds = timer.alone(lambda: torch.add(a, b, out=c))
    return 3 * a.numel() * a.element_size() / seconds / 1e9


def _time_adam(timer: _Timer) -> float:
    """Seconds per parameter of one AdamW step, after a warm-up step that creates the states: the
    first step allocates and first touches them, ~3x a later step's time, and `repeated` keeps a
    first call as long as this one (measured here: the warm-up alone made 565 bytes/parameter of a
    steady step's ~75)."""
    count, numel = ADAM_PARAMS
    params = [torch.nn.Parameter(torch.randn(numel, device=timer.device)) for _ in range(count)]
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    optimizer.step()
    return timer.alone(optimizer.step) / (count * numel)


def _probe_mlp(tokens: int, width: int, blocks: int):
    """A forward + backward step of `blocks` x (Linear(w, 4w), GELU, Linear(4w, w)) on `tokens` rows."""
    layers = [
        m
        for _ in range(blocks)
        for m in (torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))
    ]
    mlp, x = torch.nn.Sequential(*layers), torch.randn(tokens, width)

    def step() -> None:
        mlp(x).sum().backward()

    step()
    return step


def _slowest(seconds: float) -> float:
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def _time_sharing(timer: _Timer, rank: int) -> tuple[float, float, float, float]:
    """(seconds of one probe-MLP step on rank 0 alone (the least over SHARING_REPEATS
    alternations), on every rank at once (the slowest rank; the alone time times the trimmed
    mean of each alternation's busy / alone ratio: neighbours share the machine's speed of the
    moment), extra seconds per round of a 1 KiB all-reduce issued between smaller steps,
    seconds of one of those rounds without the all-reduce). Each timing runs SHARING_ROUNDS
    steps: many scheduler slices, so it is the cores' share and not where the slices fell."""
    import torch.distributed as dist

    step = _probe_mlp(*SHARING_MLP)
    pairs = []
    for _ in range(SHARING_REPEATS):
        dist.barrier()
        alone = 0.0
        if rank == 0:  # the others wait in the barrier
            start = time.perf_counter()
            for _ in range(SHARING_ROUNDS):
                step()
            alone = (time.perf_counter() - start) / SHARING_ROUNDS
        pairs.append((_slowest(alone), _per_round_s(step, SHARING_ROUNDS)))
    alone = min(pair[0] for pair in pairs)
    busy = alone * trimmed_mean([b / a for a, b in pairs])

    small_step, small = _probe_mlp(*LOADED_MLP), torch.zeros(256)

    def synced() -> None:
        small_step()
        dist.all_reduce(small)

    extra, base = _mean_extra_s(synced, small_step, LOADED_ROUNDS, LOADED_REPEATS, with_base=True)
    return alone, busy, extra, base


def _time_loaded_p2p(rank: int, nproc: int) -> float:
    """Extra seconds per round of a ring exchange (receive posted ahead, as a pipeline
    schedule does; a 1 KiB activation to the next rank) between probe-MLP steps, every rank
    busy: a pipeline send's wait for its peer to be scheduled."""
    import torch.distributed as dist

    step, buffer, inbox = _probe_mlp(*LOADED_MLP), torch.zeros(256), torch.zeros(256)

    def exchanged() -> None:
        pending = dist.batch_isend_irecv([dist.P2POp(dist.irecv, inbox, (rank - 1) % nproc)])
        step()
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, buffer, (rank + 1) % nproc)]) + pending:
            work.wait()

    return _mean_extra_s(exchanged, step, LOADED_ROUNDS, LOADED_REPEATS)


def _per_round_s(fn, rounds: int) -> float:
    """Seconds per call of `fn`, `rounds` calls on every rank at once, the slowest rank's."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return _slowest(time.perf_counter() - start) / rounds


def _mean_extra_s(with_fn, without_fn, rounds: int, repeats: int, with_base: bool = False):
    """How much longer a round of `with_fn` takes than one of `without_fn`, >= 0, every rank
    running them at once: `repeats` alternations (after one warm-up of each), each giving the
    difference of two neighbouring timings, and the trimmed mean of those differences
    (`trimmed_mean`). The machine's speed drifts by tens of percent over a minute: neighbours
    see the same speed, so a difference of neighbours cancels it, where the difference of each
    side's least timing over the whole probe compared two moments (it scattered by a factor of
    two between calibrations on a shared 2-core VM; measured here, disjoint windows of 10
    alternations of the all-reduce probe: 9.0-12.5 ms that way, 9.7-10.6 ms this way). With
    `with_base` also the least seconds of a round of `without_fn`."""
    _per_round_s(with_fn, rounds), _per_round_s(without_fn, rounds)
    pairs = [(_per_round_s(with_fn, rounds), _per_round_s(without_fn, rounds)) for _ in range(repeats)]
    base = min(b for _, b in pairs)
    extra = max(trimmed_mean([a - b for a, b in pairs]), 0.0)
    return (extra, base) if with_base else extra


def trimmed_mean(values: list[float], share: float = 0.2) -> float:
    """The mean of `values` without the lowest and highest `share` / 2 of them each (one each
    side of 10): one alternation that another process slowed cannot move it far.

    >>> trimmed_mean([1.0, 2.0, 3.0, 4.0, 100.0, -50.0, 2.5, 3.5, 1.5, 2.0])   # 19.5 / 8 without -50 and 100
    2.4375
    """
    ordered = sorted(values)
    cut = int(len(ordered) * share / 2)
    kept = ordered[cut : len(ordered) - cut] if len(ordered) > 2 * cut else ordered
    return sum(kept) / len(kept)


def _time_tp_dispatch(nproc: int, rank: int) -> tuple[float, float]:
    """Host seconds DTensor adds per tensor-parallel site and step, and per parameter tensor of
    an AdamW step (`autoplan.measure.calibrate`'s docstring), each >= 0."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tokens, width = DISPATCH_MLP
    tp = 2 if nproc % 2 == 0 else nproc
    mesh = init_device_mesh("cpu", (nproc // tp, tp), mesh_dim_names=("dp", "tp"))["tp"]
    split = torch.nn.ModuleDict({"fc": torch.nn.Linear(width, 4 * width), "proj": torch.nn.Linear(4 * width, width)})
    parallelize_module(split, mesh, {"fc": ColwiseParallel(), "proj": RowwiseParallel()})
    fc, proj = torch.nn.Linear(width, 4 * width // tp), torch.nn.Linear(4 * width // tp, width)
    group = mesh.get_group()
    x = torch.randn(tokens, width, requires_grad=True)

    def tensor_parallel() -> None:  # all-reduces: proj's output forward, x's gradient backward
        split["proj"](torch.nn.functional.gelu(split["fc"](x))).sum().backward()

    def by_hand() -> None:
        y = proj(torch.nn.functional.gelu(fc(x)))
        dist.all_reduce(y.detach(), group=group)
        y.sum().backward()
        dist.all_reduce(x.grad, group=group)

    extra = _mean_extra_s(tensor_parallel, by_hand, DISPATCH_ROUNDS, DISPATCH_REPEATS)

    count, numel = DISPATCH_PARAMS
    plain = [torch.nn.Parameter(torch.randn(numel // tp)) for _ in range(count)]
    sharded = [torch.nn.Parameter(distribute_tensor(torch.randn(numel), mesh, [Shard(0)])) for _ in range(count)]
    for param in plain + sharded:
        param.grad = torch.randn_like(param)
    step_extra = _mean_extra_s(
        torch.optim.AdamW(sharded, lr=1e-4).step,
        torch.optim.AdamW(plain, lr=1e-4).step,
        DISPATCH_ROUNDS,
        DISPATCH_REPEATS,
    )  # the warm-up creates the states
    return extra / 2, step_extra / count


def _time_collective(timer: _Timer, name: str, size: int, nproc: int, rank: int) -> tuple[int, float]:
    """(bytes S moved, median over COLLECTIVE_REPEATS of the slowest rank's seconds) for about `size` bytes."""
    import torch.distributed as dist

    numel = max(size // 4 // nproc, 1) * nproc  # float32, divisible by nproc
    full = torch.ones(numel, device=timer.device)
    part = torch.ones(numel // nproc, device=timer.device)
    # torch >= 2.10 names these *_single and deprecates the *_tensor spellings.
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    peer = rank ^ 1  # pairs (0,1), (2,3)...; an odd world leaves the last rank out

    def send_recv() -> None:
        if peer >= nproc:
            return
        if rank % 2 == 0:
            dist.send(full, peer)
        else:
            dist.recv(full, peer)

    run = {
        "all_reduce": lambda: dist.all_reduce(full),
        "all_gather": lambda: all_gather(full, part),
        "reduce_scatter": lambda: reduce_scatter(part, full),
        "send_recv": send_recv,
    }[name]
    times = []
    for repeat in range(COLLECTIVE_REPEATS + 1):
        dist.barrier()
        seconds = timer.once(run)
        if repeat:  # the first call warms up the connection
            times.append(seconds)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return full.numel() * full.element_size(), statistics.median(slowest.tolist())
