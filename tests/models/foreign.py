"""Models we did not write the planner around, as `file.py:factory` functions (`autoplan.zoo.load_factory`).

Each factory seeds itself, so every rank and the single-process reference build the same
weights, and returns (module, example_inputs, targets, loss_fn) for one global batch of 8.

    >>> from autoplan.zoo import build
    >>> job = build("tests/models/foreign.py:transformer_seq2seq")
    >>> type(job.module.transformer).__name__, len(job.example_inputs)
    ('Transformer', 2)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH, SEQ, VOCAB, HIDDEN = 8, 16, 64, 32


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def _tokens(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class Seq2Seq(nn.Module):
    """`torch.nn.Transformer` between token embeddings and an output head: two inputs."""

    def __init__(self):
        super().__init__()
        self.src_emb = nn.Embedding(VOCAB, HIDDEN)
        self.tgt_emb = nn.Embedding(VOCAB, HIDDEN)
        self.transformer = nn.Transformer(
            d_model=HIDDEN,
            nhead=4,
            num_encoder_layers=2,
            num_decoder_layers=2,
            dim_feedforward=64,
            dropout=0.0,
            batch_first=True,
        )
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.src_emb(src), self.tgt_emb(tgt)))


def transformer_seq2seq():
    torch.manual_seed(0)
    src, targets = _tokens(1)
    return Seq2Seq(), (src, targets), targets, cross_entropy


class RMSNorm(nn.Module):
    """Written by hand, as many repositories do (not nn.RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    """q, k, v, the output projection and a GELU MLP held directly by the block, beside its norms."""

    def __init__(self, norm: type[nn.Module]):
        super().__init__()
        self.norm_1, self.norm_2 = norm(HIDDEN), norm(HIDDEN)
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.up, self.down = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.norm_1(x)
        q, k, v = (proj(h).view(B, T, 4, C // 4).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attention.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.norm_2(x))))


class HandWrittenGPT(nn.Module):
    """Token and learned position embeddings summed in the root's own forward (a root parameter)."""

    def __init__(self, norm: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Parameter(torch.randn(1, SEQ, HIDDEN) * 0.02)
        self.blocks = nn.ModuleList(Block(norm) for _ in range(4))
        self.norm = norm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def gpt_layernorm():
    torch.manual_seed(0)
    tokens, targets = _tokens(2)
    return HandWrittenGPT(nn.LayerNorm), (tokens,), targets, cross_entropy


def gpt_rmsnorm():
    torch.manual_seed(0)
    tokens, targets = _tokens(3)
    return HandWrittenGPT(RMSNorm), (tokens,), targets, cross_entropy


def _norm(channels: int) -> nn.Module:
    # GroupNorm, not BatchNorm: batch statistics over each data-parallel rank's share differ
    # from the global batch's (SyncBatchNorm would be needed), so one-process equivalence
    # could not hold exactly.
    return nn.GroupNorm(4, channels)


class ResidualConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn_1 = _norm(channels)
        self.conv_2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn_2 = _norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn_2(self.conv_2(F.relu(self.bn_1(self.conv_1(x))))))


class ResNet(nn.Module):
    """A ResNet-style CNN: a stem, repeated residual blocks, pooling and a classifier."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), _norm(channels), nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualConv(channels) for _ in range(4)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(images))).flatten(1))


def resnet():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(BATCH, 3, 16, 16, generator=generator)
    targets = torch.randint(0, 10, (BATCH,), generator=generator)
    return ResNet(), (images,), targets, F.cross_entropy
