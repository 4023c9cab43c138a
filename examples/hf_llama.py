"""Train a Hugging Face Llama with autoplan: no example inputs, no pins, the model unchanged.

    torchrun --nproc-per-node 2 examples/hf_llama.py        # 2 CPU processes over gloo
    torchrun --nproc-per-node 4 examples/hf_llama.py --steps 5

`parallelize(model, cluster)` plans at the first `train_step`, from that batch (rank 0
plans, every rank receives the plan), and `loss_fn` gets the model's own `ModelOutput`.
The model here is small and randomly initialised (no download); any `from_config` or
`from_pretrained` model goes the same way.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import autoplan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    tokens = torch.randint(0, config.vocab_size, (8, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_fn(out, y):
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    pm = autoplan.parallelize(model, autoplan.ClusterSpec.local(world_size=world_size), loss_fn=loss_fn)
    for step in range(args.steps):
        loss = pm.train_step(inputs, targets)
        if step == 0:
            optimizer = torch.optim.AdamW(pm.parameters(), lr=1e-3)  # the planned (sharded) parameters
        optimizer.step()
        optimizer.zero_grad()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"step {step}: loss {loss:.4f}  plan {pm.plan.mesh} schedule {pm.plan.schedule}", flush=True)


if __name__ == "__main__":
    main()
