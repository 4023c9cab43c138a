"""Run a function on several real gloo ranks (separate processes) and collect results.

    results = run_ranks(my_fn, world_size=4, args=(config,))   # my_fn(rank, world_size, *args)

`my_fn` must be importable (module level). The process group is initialised from the
environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, as torchrun sets them) unless
`init_process_group=False`, in which case `my_fn` does it (e.g. through parallelize).
A rank that raises fails the call with its traceback; a hang fails after `timeout_s`.
Spawning costs ~3 s per call on CI: group several configurations into one call.
"""

from __future__ import annotations

import io
import os
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

from autoplan.runtime.launch import free_port, loopback_rank_env


def _rank_main(rank, world_size, port, fn, args, init, queue):
    os.environ.update(loopback_rank_env(rank, world_size, port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init:
            dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        # Send bytes, not tensors: a tensor put on a multiprocessing queue is shared through a
        # file this process deletes when it exits, possibly before the parent reads it.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Transport failures of the loopback rendezvous itself (a port taken between free_port() and
# the store's bind, a peer socket reset while gloo pairs connect): not the code under test.
TRANSPORT_ERRORS = ("DistNetworkError", "Broken pipe", "Connection reset by peer", "Address already in use")


def run_ranks(fn, world_size: int, args: tuple = (), timeout_s: float = 240.0, init_process_group: bool = True) -> list:
    """fn(rank, world_size, *args) on `world_size` processes; returns results by rank.
    A run whose only failure is a transport error of the rendezvous is retried once."""
    results, errors = _run_once(fn, world_size, args, timeout_s, init_process_group)
    if errors and all(any(marker in text for marker in TRANSPORT_ERRORS) for text in errors.values()):
        results, errors = _run_once(fn, world_size, args, timeout_s, init_process_group)
    if errors:
        raise AssertionError("\n".join(f"rank {rank}:\n{text}" for rank, text in sorted(errors.items())))
    return [results[rank] for rank in range(world_size)]


def _run_once(fn, world_size: int, args: tuple, timeout_s: float, init_process_group: bool) -> tuple[dict, dict]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, fn, args, init_process_group, queue))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout_s)
            if status == "ok":
                import torch

                value = torch.load(io.BytesIO(value), weights_only=False)
            (results if status == "ok" else errors)[rank] = value
            if errors:
                break
    except Exception as error:  # queue.Empty: a rank hung
        errors[-1] = f"timed out after {timeout_s:.0f}s waiting for ranks: {error!r}"
    finally:
        for process in processes:
            process.join(timeout=5 if not errors else 1)
            if process.is_alive():
                process.kill()
    return results, errors
