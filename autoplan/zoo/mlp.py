"""A deep residual MLP: the zoo's non-transformer model (tabular regression).

features (B, d_in) -> Linear -> [LayerNorm -> Linear(d, 4d) -> GeLU -> Linear(4d, d) + x] * L -> Linear(d, d_out)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True, kw_only=True)
class MLPConfig:
    num_layers: int = 8
    in_features: int = 64
    hidden: int = 256
    out_features: int = 16


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.input = nn.Linear(config.in_features, config.hidden)
        self.blocks = nn.ModuleList(ResidualBlock(config.hidden) for _ in range(config.num_layers))
        self.head = nn.Linear(config.hidden, config.out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.input(features)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
