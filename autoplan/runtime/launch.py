"""Run a plan on this machine through torch's own launcher (`torch.distributed.run`).

    >>> result = launch("plan.json", "gpt-small-demo", nproc=4, steps=5)   # doctest: +SKIP
    >>> result["median_step_s"], result["peak_memory_bytes"]                # doctest: +SKIP
    (0.44, [130_000_000, 128_000_000, 131_000_000, 127_000_000])

Multi-node: pass the launcher's own flags, e.g. `launcher_args=["--nnodes", "2",
"--node-rank", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "host0:29400"]`;
they go to `torch.distributed.run` unchanged. The result (see autoplan/runtime/worker.py) is
written by global rank 0, so only the node holding it returns one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from autoplan.runtime.worker import ERROR_PREFIX
from autoplan.schema.plan import Plan

DEFAULT_TIMEOUT_S = 600.0
STDERR_TAIL_LINES = 15


def launch(
    plan_path: str | os.PathLike,
    model: str | None = None,
    nproc: int | None = None,
    steps: int = 5,
    out_path: str | os.PathLike | None = None,
    launcher_args: Sequence[str] = (),
    *,
    warmup: int = 1,
    seq_len: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
) -> dict:
    """Launch `nproc` ranks of `autoplan.runtime.worker` on the plan; return the parsed result JSON.

    `model` defaults to the plan's model_name (a zoo name or `file.py:factory`), `nproc`
    to the plan's world size (divided by `--nnodes` when given). A missing or corrupt plan
    raises ValueError before anything starts; a failed or timed-out job raises
    RuntimeError with the ranks' one-line errors (or the tail of the launcher's stderr).
    With `checkpoint_dir` the ranks resume from and save into it (`autoplan.runtime.resume`),
    and a world size other than the plan's is re-planned for on the ranks instead of refused.

    >>> launch("plan.json", nproc=2, steps=3)["median_step_s"]   # doctest: +SKIP
    0.12
    """
    plan = Plan.from_json(plan_path)
    model = model or plan.model_name
    launcher_args = [str(arg) for arg in launcher_args]
    num_nodes = _num_nodes(launcher_args) or 1
    nproc = nproc or plan.world_size // num_nodes
    _check_launch(plan, nproc, num_nodes, steps, resharding=checkpoint_dir is not None)
    with tempfile.TemporaryDirectory(prefix="autoplan-launch-") as scratch:
        out = Path(out_path) if out_path is not None else Path(scratch) / "result.json"
        out = out.resolve()
        if out.exists():
            out.unlink()  # a stale result must not pass for this run's
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            *_default_rendezvous(launcher_args, elastic=checkpoint_dir is not None),
            *launcher_args,
            "-m",
            "autoplan.runtime.worker",
            "--model",
            model,
            "--plan",
            str(Path(plan_path).resolve()),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--out",
            str(out),
            *(["--seq-len", str(seq_len)] if seq_len else []),
            *(
                ["--checkpoint-dir", str(Path(checkpoint_dir).resolve()), "--checkpoint-every", str(checkpoint_every)]
                if checkpoint_dir is not None
                else []
            ),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if plan.cluster.device.kind == "cpu":
            env["OMP_NUM_THREADS"] = "1"  # local plans assume one thread per rank
        returncode, stderr = _run(command, env, timeout_s)
        if returncode != 0:
            raise RuntimeError(f"{model} on {nproc} process(es) {_describe_failure(returncode, stderr)}")
        if not out.exists():
            if num_nodes > 1:
                return {}  # rank 0 lives on another node
            raise RuntimeError(f"the job exited cleanly but wrote no result to {out}")
        return json.loads(out.read_text())


def _check_launch(plan: Plan, nproc: int, num_nodes: int, steps: int, resharding: bool) -> None:
    """Refuse, before anything starts, a job of no processes or steps, or of another world size
    than the plan's unless it reshards a checkpoint into a new plan."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if nproc * num_nodes != plan.world_size and not resharding:
        raise ValueError(
            f"nproc({nproc}) * nnodes({num_nodes}) = {nproc * num_nodes} != the plan's world size "
            f"dp({plan.mesh['dp']}) * pp({plan.mesh['pp']}) * tp({plan.mesh['tp']}) = {plan.world_size}; "
            f"launch {plan.world_size} processes, or give a checkpoint folder to re-plan for {nproc * num_nodes}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _num_nodes(launcher_args: list[str]) -> int | None:
    """`--nnodes N` (or `--nnodes=N`) from the launcher flags; an elastic range MIN:MAX counts MAX."""
    for index, arg in enumerate(launcher_args):
        if arg.startswith("--nnodes"):
            value = arg.partition("=")[2] or (launcher_args[index + 1] if index + 1 < len(launcher_args) else "")
            try:
                return int(value.split(":")[-1])
            except ValueError:
                raise ValueError(f"--nnodes {value!r} is not a number of nodes") from None
    return None


def free_port() -> int:
    """A TCP port nobody listens on now, for a local rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank `rank` of a one-machine job rendezvousing on `port`
    (one intra-op thread: the ranks share the cores)."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    }


def _default_rendezvous(launcher_args: list[str], elastic: bool = False) -> list[str]:
    """A free local port unless the user gave rendezvous flags (so two local jobs never collide).
    `elastic` (a job that may restart): torch's c10d rendezvous, whose agent hosts the store and
    makes a fresh one for every restart; under the static one a restarted rank could meet the
    previous attempt's store and peers (seen: gloo "connection refused" after a restart)."""
    if any(arg.startswith(("--rdzv", "--master", "--standalone")) for arg in launcher_args):
        return []
    if elastic:
        return ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    return ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]


def _run(command: list[str], env: dict, timeout_s: float) -> tuple[int | None, str]:
    """Run the launcher in its own process group; on timeout stop the whole group."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout_s)
        return process.returncode, stderr
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=10)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        _, stderr = process.communicate()
        return None, (stderr or "") + f"\ntimed out after {timeout_s:.0f} s"


def _describe_failure(returncode: int | None, stderr: str) -> str:
    """The ranks' own one-line errors when they printed them, else the launcher's last lines."""
    ranks_of: dict[str, list[str]] = {}  # message -> ranks that printed it ("rank R: message")
    pattern = re.escape(ERROR_PREFIX) + r" rank (\S+): (.*?)\s*(?=" + re.escape(ERROR_PREFIX) + r"|\n|$)"
    for rank, message in re.findall(pattern, stderr):  # lookahead: lines of two ranks may interleave
        ranks_of.setdefault(message, []).append(rank)
    status = "timed out" if returncode is None else f"failed (exit code {returncode})"
    if ranks_of:
        return f"{status}: " + "; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {','.join(sorted(ranks))}: {message}"
            for message, ranks in ranks_of.items()
        )
    if "SIGKILL" in stderr:  # the kernel's OOM killer leaves no Python error behind
        return f"{status}: a rank was killed by SIGKILL (out of host memory?)"
    return f"{status}; last lines of stderr:\n" + "\n".join(stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
