"""GPT (GPT-2 / GPT-3 / Megatron-LM family) in one readable file, after nanoGPT.

Fused q|k|v projection, learned position embeddings, GeLU MLP of width 4h, pre-norm,
and the output head tied to the token embedding. Heads are recovered from the tensor
width (`view(B, T, -1, head_dim)`) so a tensor-parallel shard computes with its local
head count without patching attributes.

Parameters per block: 12 h^2 + 13 h (qkv 3h^2+3h, proj h^2+h, fc 4h^2+4h, fc2 4h^2+h,
two LayerNorms 4h); GPT-3 175B: 96 * 12 * 12288^2 = 173.9e9 + embeddings 0.65e9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    num_layers: int = 12
    num_heads: int = 12
    hidden: int = 768
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 (nanoGPT)
    seq_len: int = 1024
    dropout: float = 0.0
    tie_embeddings: bool = True

    @property
    def num_params(self) -> int:
        """12 L h^2 (1 + 13/(12h) + (V+s)/(12 L h)) — the Megatron-LM formula."""
        h, L = self.hidden, self.num_layers
        return 12 * L * h * h + 13 * L * h + (self.vocab_size + self.seq_len) * h + 2 * h


def init_weights(module: nn.Module) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases (skipped on the meta device,
    where it only costs time: ~0.7 s for GPT-3 175B)."""
    if getattr(module, "weight", None) is not None and module.weight.is_meta:
        return
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.hidden % config.num_heads == 0
        self.head_dim = config.hidden // config.num_heads
        self.c_attn = nn.Linear(config.hidden, 3 * config.hidden)  # q | k | v, fused
        self.c_proj = nn.Linear(config.hidden, config.hidden)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden, 4 * config.hidden)
        self.c_proj = nn.Linear(4 * config.hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """tokens (B, T) int64 -> logits (B, T, vocab)."""

    _init_weights = staticmethod(init_weights)
    """Per-module initialisation (Hugging Face's hook name): what a model started on meta runs
    (autoplan.backends.materialize)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden)
        self.pos_emb = nn.Embedding(config.seq_len, config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
