"""A model autoplan has never seen, loaded with `--model examples/custom_model.py:factory`.

    autoplan plan  --model examples/custom_model.py:factory --cluster local:4
    autoplan bench --model examples/custom_model.py:factory --cluster local:4 --steps 3

A byte-level transformer written the way people write their own: separate q/k/v
projections, rotary-free learned positions, a SwiGLU feed-forward, RMSNorm, untied
output head. `factory()` returns (module, example_inputs, targets, loss_fn): one global
batch of 8 sequences of 64 bytes (8 * 64 = 512 tokens per step). The loss is a mean over
the batch, as `autoplan.parallelize` requires.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 256  # bytes
SEQ_LEN = 64
HIDDEN = 128
NUM_HEADS = 4  # head_dim 32
NUM_LAYERS = 4
FFN_HIDDEN = 352  # ~ 8/3 * 128, rounded to a multiple of 32 (SwiGLU keeps the 4h MLP's parameter count)
GLOBAL_BATCH = 8


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.head_dim = HIDDEN // NUM_HEADS
        self.q = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.out = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: a tensor-parallel shard computes with its local head count
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, FFN_HIDDEN, bias=False)
        self.up = nn.Linear(HIDDEN, FFN_HIDDEN, bias=False)
        self.down = nn.Linear(FFN_HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm = nn.RMSNorm(HIDDEN)
        self.attn = Attention()
        self.ffn_norm = nn.RMSNorm(HIDDEN)
        self.ffn = SwiGLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class ByteTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Embedding(SEQ_LEN, HIDDEN)
        self.blocks = nn.ModuleList(Block() for _ in range(NUM_LAYERS))
        self.norm = nn.RMSNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def next_byte_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over every position of every sequence."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1))


def factory():
    """(module, example_inputs, targets, loss_fn): the model on CPU and one global batch."""
    torch.manual_seed(0)
    model = ByteTransformer()
    text = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1))
    return model, (text[:, :-1].contiguous(),), text[:, 1:].contiguous(), next_byte_loss


if __name__ == "__main__":
    module, inputs, targets, loss_fn = factory()
    print(f"{sum(p.numel() for p in module.parameters()):,} parameters; loss {loss_fn(module(*inputs), targets):.3f}")
