"""GRU4Rec (Hidasi et al. 2016) after DLLM2Rec's students: item embeddings -> GRU.

The GRU's output at position t is the user representation after items[: t + 1]. Where this
differs from DLLM2Rec's code, and why: dropout on the input embeddings (the code has none; the
small logs here overfit without it), every position trains at once (the code: one target per
sample, the GRU's last state), and scores are dot products with the item table (tied; the code:
an untied `s_fc` output layer); the table starts N(0, d^-0.5) with a zero padding row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recdistill.models.student_io import StudentOutput, embed, save_student


@dataclass
class GRU4RecConfig:
    num_items: int
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.1
    max_len: int = 50


class GRU4Rec(nn.Module):
    architecture = "gru4rec"

    def __init__(self, config: GRU4RecConfig):
        super().__init__()
        self.config = config
        self.item_embeddings = nn.Embedding(config.num_items + 1, config.hidden_size, padding_idx=0)
        self.dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.hidden_size, config.hidden_size, num_layers=config.num_layers, batch_first=True
        )
        nn.init.normal_(self.item_embeddings.weight, std=config.hidden_size**-0.5)
        with torch.no_grad():
            self.item_embeddings.weight[0].zero_()  # normal_ overwrote the padding row

    def item_table(self) -> torch.Tensor:
        return self.item_embeddings.weight

    def forward(
        self, item_ids: torch.Tensor, lengths: torch.Tensor, item_table: torch.Tensor | None = None
    ) -> StudentOutput:
        x = self.dropout(embed(item_ids, self.item_embeddings, item_table))
        out, _ = self.gru(x)  # right padding: real positions never see the pads after them
        return StudentOutput(user_reps=out, block_states=[out])

    def save_pretrained(self, directory) -> None:
        save_student(self, directory)
