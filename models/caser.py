"""Caser (Tang & Wang 2018) as in DLLM2Rec's code: convolutions over the last `window` items.

Horizontal filters of heights 2, 3, 4 (16 each, max-pooled over time) and vertical filters over
the window, then a linear layer to the embedding size. Every position t gets the window of
items ending at t (left-padded), so Caser also trains on all positions at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from recdistill.models.student_io import StudentOutput, embed, save_student


@dataclass
class CaserConfig:
    num_items: int
    hidden_size: int = 64
    window: int = 10
    horizontal_heights: list[int] = field(default_factory=lambda: [2, 3, 4])
    horizontal_filters: int = 16
    vertical_filters: int = 1
    dropout: float = 0.1
    max_len: int = 50


class Caser(nn.Module):
    architecture = "caser"

    def __init__(self, config: CaserConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.item_embeddings = nn.Embedding(config.num_items + 1, d, padding_idx=0)
        self.horizontal = nn.ModuleList(
            nn.Conv2d(1, config.horizontal_filters, (height, d))
            for height in config.horizontal_heights
        )
        self.vertical = nn.Conv2d(1, config.vertical_filters, (config.window, 1))
        self.dropout = nn.Dropout(config.dropout)
        features = (
            config.horizontal_filters * len(config.horizontal_heights) + config.vertical_filters * d
        )
        self.out = nn.Linear(features, d)
        nn.init.normal_(self.item_embeddings.weight, std=d**-0.5)

    def item_table(self) -> torch.Tensor:
        return self.item_embeddings.weight

    def forward(
        self, item_ids: torch.Tensor, lengths: torch.Tensor, item_table: torch.Tensor | None = None
    ) -> StudentOutput:
        batch, length = item_ids.shape
        window = self.config.window
        padded = F.pad(item_ids, (window - 1, 0))  # left padding: the window ending at each t
        windows = padded.unfold(1, window, 1)  # [B, L, W]
        x = embed(windows.reshape(-1, window), self.item_embeddings, item_table).unsqueeze(
            1
        )  # [B*L, 1, W, d]
        pooled = []
        for conv in self.horizontal:
            h = F.relu(conv(x).squeeze(3))  # [B*L, filters, W - height + 1]
            pooled.append(h.max(dim=2).values)
        vertical = self.vertical(x).reshape(x.shape[0], -1)  # [B*L, filters * d]
        z = F.relu(self.out(self.dropout(torch.cat([*pooled, vertical], dim=1))))
        user_reps = z.reshape(batch, length, -1)
        return StudentOutput(user_reps=user_reps, block_states=[user_reps])

    def save_pretrained(self, directory) -> None:
        save_student(self, directory)
