"""What autoplan's runner costs over the same configuration written by hand.

    python benchmarks/overhead.py                      # dp=2 x tp=2 of gpt-small-demo on local:4
    python benchmarks/overhead.py --rounds 5 --steps 8

Every rank builds two copies of the model from one seed: one parallelised by hand with
torch's own APIs (`init_device_mesh`, `parallelize_module` with Colwise/Rowwise styles,
the fused q|k|v rows permuted so each tp rank holds its own heads, vocab-split embedding
and output head re-tied, `replicate` over dp per block and at the root), the other by
`autoplan.parallelize` with the same configuration pinned (dp=2, tp=2, pp=1, ZeRO 0, no
recompute, no sequence parallelism, one micro-batch per dp rank). Both train with AdamW
through `autoplan.runtime.timing.measure_training`, in rounds that alternate which goes first, so
load drifting on the machine hits both alike. Prints the median step-time ratio
autoplan / hand (target <= 1.03) and both peak memories.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

MODEL = "gpt-small-demo"
GLOBAL_BATCH = 8
DP, TP = 2, 2


def hand_parallelize(module, mesh):
    """dp x tp by hand, mirroring what a Megatron-style torch user writes."""
    import torch
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    hidden = module.config.hidden
    for block in module.blocks:
        # c_attn packs [q | k | v]; reorder its rows so tp rank i's contiguous shard is [q_i | k_i | v_i]
        local = hidden // TP
        order = [part * hidden + rank * local + j for rank in range(TP) for part in range(3) for j in range(local)]
        with torch.no_grad():
            block.attn.c_attn.weight.copy_(block.attn.c_attn.weight[order])
            block.attn.c_attn.bias.copy_(block.attn.c_attn.bias[order])
        parallelize_module(
            block,
            tp_mesh,
            {
                "attn.c_attn": ColwiseParallel(),
                "attn.c_proj": RowwiseParallel(),
                "mlp.c_fc": ColwiseParallel(),
                "mlp.c_proj": RowwiseParallel(),
            },
        )
    parallelize_module(
        module,
        tp_mesh,
        {
            "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate()),
        },
    )
    module.lm_head.weight = module.tok_emb.weight  # both vocab-row shards: keep them one parameter
    for block in module.blocks:
        replicate(block, mesh=dp_mesh)
    replicate(module, mesh=dp_mesh)
    return module


class HandModel:
    """The training step a user writes: this dp rank's half of the batch, forward, backward."""

    def __init__(self, module, loss_fn, mesh):
        self.module, self.loss_fn, self.mesh = module, loss_fn, mesh

    def train_step(self, *inputs, targets=None):
        import torch.distributed as dist

        dp_rank = self.mesh["dp"].get_local_rank()
        local = [x.chunk(DP)[dp_rank] for x in inputs]
        loss = self.loss_fn(self.module(*local), targets.chunk(DP)[dp_rank])
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=self.mesh["dp"].get_group())
        return mean.item() / DP

    def parameters(self):
        return self.module.parameters()


def rank_main(rounds: int, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import autoplan
    from autoplan.runtime.timing import measure_training
    from autoplan.zoo import build

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    hand_job = build(MODEL, batch_size=GLOBAL_BATCH, device="cpu", seed=0)
    hand = HandModel(hand_parallelize(hand_job.module, mesh), hand_job.loss_fn, mesh)
    job = build(MODEL, batch_size=GLOBAL_BATCH, device="cpu", seed=0)
    pins = autoplan.Constraints(
        dp=DP, tp=TP, pp=1, zero_stage=0, recompute="none", sequence_parallel=False, micro_batch_size=GLOBAL_BATCH // DP
    )
    ours = autoplan.parallelize(
        job.module,
        autoplan.ClusterSpec.local(world_size=DP * TP),
        example_inputs=job.example_inputs,
        loss_fn=job.loss_fn,
        plan=pins,
        model_name=MODEL,
    )
    styles = {path: site.style for path, site in ours.plan.tp_styles.items()}
    batches = [(job.example_inputs, job.targets)]
    medians = {"hand": [], "autoplan": []}
    peaks = {}
    for round_index in range(rounds):
        order = (("hand", hand), ("autoplan", ours))
        for name, model in order if round_index % 2 == 0 else order[::-1]:  # neither always goes first
            measurement = measure_training(model, batches, steps=steps, warmup=1)
            medians[name].append(measurement.median_step_s)
            peaks[name] = measurement.peak_memory_bytes
    if dist.get_rank() == 0:
        hand_s, ours_s = statistics.median(medians["hand"]), statistics.median(medians["autoplan"])
        print(
            f"{MODEL}, dp={DP} x tp={TP} on local:{DP * TP}, global batch {GLOBAL_BATCH}, "
            f"{rounds} rounds x {steps} steps"
        )
        print(
            f"autoplan's tp styles: {sorted(set(styles.values()))} on {len(styles)} modules "
            f"(hand: colwise/rowwise per block, vocab_embedding, vocab_output)"
        )
        print(f"hand-written median step  {hand_s * 1e3:8.1f} ms   peak memory rank 0 {peaks['hand'] / 1e6:.1f} MB")
        print(f"autoplan     median step  {ours_s * 1e3:8.1f} ms   peak memory rank 0 {peaks['autoplan'] / 1e6:.1f} MB")
        print(
            f"ratio autoplan / hand     {ours_s / hand_s:.3f}   (target <= 1.03); per round: "
            + ", ".join(f"{a / h:.2f}" for a, h in zip(medians["autoplan"], medians["hand"]))
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args.rounds, args.steps)
        return
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(DP * TP),
        "--standalone",
        __file__,
        "--rank",
        "--rounds",
        str(args.rounds),
        "--steps",
        str(args.steps),
    ]
    sys.exit(subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode)


if __name__ == "__main__":
    main()
