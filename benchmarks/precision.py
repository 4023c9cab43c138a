"""Precision as a planner choice (issue 13): the best plan without lossy options, the best with
them (`Constraints(allow_lossy=True)`), which layers chose what, and the predicted speed-up.

    python benchmarks/precision.py                 # both cases (the local one runs 2 ranks, ~1 min)
    python benchmarks/precision.py --no-local      # the preset case only (planning, seconds)

Preset case: Llama-3-70B on 32 H100s (dgx-h100:4) at seq 8192, memory-bound (70B parameters
hold 18 bytes each of model states, 39 GB a GPU fully sharded: on 16 H100s no plan fits),
where float8 matmuls and float8 activation storage are available. Local case:
gpt-tiny on local:2 with dp=2: the exact plan, the planner's lossy choice (bfloat16 gradient
reduction through DDP's compress hook; on CPU ranks selective recompute costs less than the
casts, so it stores nothing narrower) and float8 activation storage pinned, each run through
`autoplan.runtime.launch`, measured step time and peak memory beside the predicted ones.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from autoplan import ClusterSpec, Constraints, Plan, plan
from autoplan.runtime.launch import launch
from autoplan.zoo import build

PRESET = ("llama3-70b", "dgx-h100", 4, 8192, 32)
"""model, preset, nodes, seq_len, global batch."""
LOCAL = ("gpt-tiny", 2, 8)
"""model, ranks, global batch."""
STEPS = 10


def make_plan(model: str, cluster: ClusterSpec, seq_len: int | None, batch: int, constraints: Constraints) -> Plan:
    job = build(model, batch_size=batch, seq_len=seq_len, device="meta")
    return plan(job.module, cluster, job.example_inputs, job.loss_fn, constraints=constraints, model_name=model)


def describe(label: str, chosen: Plan) -> list[str]:
    """The plan's configuration and per-run precision choices, one line each."""
    lines = [
        f"{label}: mesh {chosen.mesh} mbs {chosen.micro_batch_size} {chosen.schedule} v{chosen.virtual_stages} "
        f"ZeRO-{chosen.zero_stage} params {chosen.param_dtype} grads {chosen.grad_reduce_dtype}: "
        f"predicted step {chosen.predicted.step_time_s:.4g} s, peak {chosen.predicted.peak_memory_bytes / 1e9:.2f} GB"
    ]
    runs: list[tuple[tuple[str, str, str], list[str]]] = []  # consecutive layers with equal choices
    for layer in chosen.layers:
        key = (
            layer.recompute,
            layer.activation_dtype or chosen.activation_dtype,
            layer.matmul_dtype or chosen.param_dtype,
        )
        if runs and runs[-1][0] == key:
            runs[-1][1].append(layer.name)
        else:
            runs.append((key, [layer.name]))
    for (recompute, stored, matmul), names in runs:
        shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
        lines.append(f"    {shown}: recompute {recompute}, activations stored in {stored}, matmuls in {matmul}")
    return lines


def preset_case() -> None:
    model, preset, nodes, seq_len, batch = PRESET
    cluster = ClusterSpec.preset(preset, num_nodes=nodes)
    exact = make_plan(model, cluster, seq_len, batch, Constraints())
    lossy = make_plan(model, cluster, seq_len, batch, Constraints(allow_lossy=True))
    print(f"== {model} on {preset}:{nodes} ({cluster.world_size} GPUs), seq {seq_len}, global batch {batch}")
    print("\n".join(describe("best exact plan", exact) + describe("best with allow_lossy", lossy)))
    print(f"predicted speed-up: {exact.predicted.step_time_s / lossy.predicted.step_time_s:.3f}x")


def local_case() -> None:
    model, ranks, batch = LOCAL
    cluster = ClusterSpec.local(world_size=ranks)
    print(f"\n== {model} on local:{ranks} (dp={ranks}), global batch {batch}: measured beside predicted")
    cases = [
        ("best exact plan", Constraints(dp=ranks)),
        ("best with allow_lossy", Constraints(dp=ranks, allow_lossy=True)),
        ("float8 activation storage pinned", Constraints(dp=ranks, activation_dtype="float8_e4m3fn")),
    ]
    with tempfile.TemporaryDirectory() as folder:
        for index, (label, constraints) in enumerate(cases):
            chosen = make_plan(model, cluster, None, batch, constraints)
            path = Path(folder) / f"plan{index}.json"
            chosen.to_json(path)
            measured = launch(path, model, nproc=ranks, steps=STEPS)
            print("\n".join(describe(label, chosen)))
            print(
                f"    measured step {measured['median_step_s']:.4g} s (predicted {chosen.predicted.step_time_s:.4g}), "
                f"peak {max(measured['peak_memory_bytes']) / 1e6:.2f} MB "
                f"(predicted {chosen.predicted.peak_memory_bytes / 1e6:.2f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-local", action="store_true", help="skip the local case (which runs ranks)")
    args = parser.parse_args()
    preset_case()
    if not args.no_local:
        local_case()


if __name__ == "__main__":
    main()
