"""Caser (Tang & Wang 2018) after DLLM2Rec's students: convolutions over the last `window` items.

What follows DLLM2Rec's code: horizontal filters of heights 2, 3, 4 (16 each, ReLU, max-pooled
over time), one vertical filter over the window, padding positions masked to zero, dropout.
Where this differs, and why:
- every position t gets its own window of the items ending at t (left-padded), so Caser trains
  on all positions of a sequence at once (the code: one window per sample, the last items);
- the features go through a linear layer to the embedding size and a ReLU, and the user
  representation is scored by dot product with the item table (tied; the code: an untied
  `s_fc` output layer over the catalogue, and a ReLU on the vertical filter instead);
- the item table starts N(0, d^-0.5) with its padding row zero (the code: N(0, 0.01)).

The filters are `nn.Conv2d` weights (the reference's parameters and files), but the forward pass
does not run a convolution per window: neighbouring windows overlap in all but one item, so each
filter row is applied once per sequence position (one matmul), the rows are summed along the
diagonals, and each window takes a sliding max. Same function (tests compare it with the
per-window convolution); the horizontal filters do ~W times less work than convolving B x L
windows, and no B x L x W x d copy of the embeddings is made.
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
        with torch.no_grad():
            self.item_embeddings.weight[0].zero_()  # normal_ overwrote the padding row

    def item_table(self) -> torch.Tensor:
        return self.item_embeddings.weight

    def forward(
        self, item_ids: torch.Tensor, lengths: torch.Tensor, item_table: torch.Tensor | None = None
    ) -> StudentOutput:
        window = self.config.window
        padded = F.pad(item_ids, (window - 1, 0))  # left padding: the window ending at each t
        # Padding positions (left of short windows, right of the sequence) are zero, as the
        # code's mask: a table whose row 0 has been trained or fused must not leak into them.
        x = embed(padded, self.item_embeddings, item_table) * (padded > 0)[..., None]
        pooled = [self._horizontal_max(conv, x) for conv in self.horizontal]
        vertical_weight = self.vertical.weight.view(-1, window)  # [filters, W]
        vertical = torch.einsum("bldw,fw->blfd", x.unfold(1, window, 1), vertical_weight)
        vertical = vertical + self.vertical.bias[:, None]  # [B, L, filters, d]
        features = torch.cat([*pooled, vertical.flatten(2)], dim=2)
        user_reps = F.relu(self.out(self.dropout(features)))  # [B, L, d]
        return StudentOutput(user_reps=user_reps, block_states=[user_reps])

    def _horizontal_max(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """conv over every window of W items ending at each position, ReLU, max over the window:
        [B, L + W - 1, d] -> [B, L, filters]."""
        filters, _, height, d = conv.weight.shape
        rows = x @ conv.weight.view(filters * height, d).T  # [B, P, filters * height]
        rows = rows.view(*x.shape[:2], filters, height)
        span = x.shape[1] - height + 1  # placements of the filter along the padded sequence
        responses = conv.bias + sum(rows[:, k : k + span, :, k] for k in range(height))
        # window ending at t: placements t .. t + W - height
        per_window = responses.unfold(1, self.config.window - height + 1, 1)  # [B, L, filters, n]
        return F.relu(per_window.max(dim=3).values)

    def save_pretrained(self, directory) -> None:
        save_student(self, directory)
