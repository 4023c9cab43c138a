"""Llama 2 / Llama 3 in one readable file.

RMSNorm, rotary position embeddings, SwiGLU MLP, separate q/k/v projections with
grouped-query attention (num_kv_heads <= num_heads), untied output head. Head counts
are recovered from tensor widths (`view(B, T, -1, head_dim)`), so a tensor-parallel
shard runs with local heads: with tp=8, Llama-3-70B's 64 q / 8 kv heads become 8 / 1.

Parameters per block: h (2 h + 2 kv_heads * head_dim) for attention + 3 h f for the
MLP + 2h norms; Llama-2-7B: 32 * (4 * 4096^2 + 3 * 4096 * 11008) = 6.48e9 + 0.26e9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoplan.zoo.gpt import init_weights


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    hidden: int = 4096
    ffn_hidden: int = 11008
    vocab_size: int = 32000
    seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


def apply_rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs of channels of x (B, T, heads, head_dim) by position-dependent angles."""
    _, T, _, head_dim = x.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos()[None, :, None, :].to(x.dtype), angles.sin()[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        assert config.hidden % config.num_heads == 0 and config.num_heads % config.num_kv_heads == 0
        self.head_dim = config.hidden // config.num_heads
        self.rope_theta = config.rope_theta
        self.wq = nn.Linear(config.hidden, config.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden, config.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.hidden, config.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.num_heads * self.head_dim, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rotary(self.wq(x).view(B, T, -1, self.head_dim), self.rope_theta)
        k = apply_rotary(self.wk(x).view(B, T, -1, self.head_dim), self.rope_theta)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        repeats = q.shape[2] // k.shape[2]  # grouped-query attention
        k, v = (t.repeat_interleave(repeats, dim=2) for t in (k, v))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden, config.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(config.hidden, config.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(config.ffn_hidden, config.hidden, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """tokens (B, T) int64 -> logits (B, T, vocab)."""

    _init_weights = staticmethod(init_weights)  # GPT's per-module initialisation (see autoplan.zoo.gpt.GPT)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden, eps=config.norm_eps)
        self.output = nn.Linear(config.hidden, config.vocab_size, bias=False)
        self.apply(init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))
