"""Train a model with autoplan on every rank of a torchrun job.

    torchrun --nproc-per-node 4 examples/train.py --model gpt-small-demo --steps 20
    torchrun --nproc-per-node 4 examples/train.py --plan plan.json            # a saved plan
    torchrun --nproc-per-node 4 examples/train.py --fix tp=2,dp=2             # pin part of it
    torchrun --nproc-per-node 4 examples/train.py --model examples/custom_model.py:factory

Every rank builds the same model from the same seed and passes the same global batch;
`autoplan.parallelize` plans on rank 0 (or takes the plan you give), shards the model
for this rank, and `train_step` runs forward and backward of the whole global batch with
the plan's schedule, returning the global mean loss on every rank. The optimizer sees
only this rank's shard of the parameters. CPU ranks use one thread each.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import autoplan
from autoplan.zoo import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-small-demo", help="zoo name or path/to/file.py:factory")
    parser.add_argument("--cluster", default=None, help="local:N (default: local:$WORLD_SIZE), PRESET:NODES or a file")
    parser.add_argument("--plan", default=None, help="a plan JSON from `autoplan plan -o` (default: plan now)")
    parser.add_argument("--fix", default=None, help="pins, e.g. dp=2,tp=2 (see `autoplan plan --fix`)")
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cluster = autoplan.ClusterSpec.parse(args.cluster or f"local:{world_size}")
    if cluster.device.kind == "cpu":
        torch.set_num_threads(1)  # local plans assume one core per rank
    device = "cpu" if cluster.device.kind == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    job = build(args.model, batch_size=args.global_batch_size, device=device, seed=0)  # same weights on every rank
    if args.plan:
        plan = autoplan.Plan.from_json(args.plan)
    else:
        plan = autoplan.Constraints.parse_fix(args.fix) if args.fix else None
    model = autoplan.parallelize(
        job.module, cluster, example_inputs=job.example_inputs, loss_fn=job.loss_fn, plan=plan, model_name=args.model
    )
    rank = torch.distributed.get_rank()
    if rank == 0:
        print(
            f"plan: mesh {model.plan.mesh}, micro-batch {model.plan.micro_batch_size}, "
            f"schedule {model.plan.schedule}, ZeRO {model.plan.zero_stage}; "
            f"predicted {model.plan.predicted.step_time_s:.4g} s/step",
            flush=True,
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        inputs, targets = next_batch(job, step)
        start = time.perf_counter()
        loss = model.train_step(inputs, targets)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step:3d}  loss {loss:.4f}  {time.perf_counter() - start:.3f} s", flush=True)
    torch.distributed.destroy_process_group()


def next_batch(job, step: int):
    """A fresh global batch per step, identical on every rank (seeded by the step).
    Language models get random tokens; other models reuse their example batch."""
    vocab_size = getattr(getattr(job.module, "config", None), "vocab_size", None)
    if vocab_size is None:
        return job.example_inputs, job.targets
    first = job.example_inputs[0]
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab_size, (first.shape[0], first.shape[1] + 1), generator=generator)
    tokens = tokens.to(first.device)
    return (tokens[:, :-1].contiguous(),), tokens[:, 1:].contiguous()


if __name__ == "__main__":
    main()
