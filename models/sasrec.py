"""SASRec (Kang & McAuley 2018): causal self-attention over the item sequence.

Right-padded input; position t attends to items 0..t, so one forward gives a user representation
at every position. Scores are dot products with the (tied) item table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recdistill.models.student_io import StudentOutput, embed, save_student


@dataclass
class SASRecConfig:
    num_items: int
    hidden_size: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.1
    max_len: int = 50
    # Every embedding and linear weight N(0, init_std), biases 0, as Klenitskiy & Vasilev's
    # SASRec: on all of ML-1M it learns several times faster than the earlier init (README,
    # Benchmarks). None: that earlier init, item table N(0, hidden^-0.5), torch's defaults elsewhere.
    init_std: float | None = 0.02


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=1e-8)
        self.attention = nn.MultiheadAttention(
            config.hidden_size, config.num_heads, dropout=config.dropout, batch_first=True
        )
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.Dropout(config.dropout),
        )

    def forward(
        self, x: torch.Tensor, causal_mask: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        query = self.attn_norm(x)
        attended, _ = self.attention(query, x, x, attn_mask=causal_mask, need_weights=False)
        # As in the reference implementation: residuals from the normed query and the normed input.
        x = query + attended
        x = self.ffn_norm(x)
        x = x + self.ffn(x)

        return x * keep


class SASRec(nn.Module):
    architecture = "sasrec"

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.item_embeddings = nn.Embedding(config.num_items + 1, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_len, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=1e-8)
        if config.init_std is None:
            nn.init.normal_(self.item_embeddings.weight, std=config.hidden_size**-0.5)
        else:
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def item_table(self) -> torch.Tensor:
        return self.item_embeddings.weight

    def forward(
        self, item_ids: torch.Tensor, lengths: torch.Tensor, item_table: torch.Tensor | None = None
    ) -> StudentOutput:
        batch, length = item_ids.shape
        if length > self.config.max_len:
            raise ValueError(f"sequence of {length} items > max_len {self.config.max_len}")
        positions = torch.arange(length, device=item_ids.device)
        keep = (item_ids > 0).unsqueeze(-1).float()  # [B, L, 1]
        x = embed(item_ids, self.item_embeddings, item_table) * self.config.hidden_size**0.5
        x = self.dropout(x + self.position_embeddings(positions)[None]) * keep
        causal_mask = torch.triu(
            torch.ones(length, length, dtype=torch.bool, device=item_ids.device), diagonal=1
        )
        block_states = []
        for block in self.blocks:
            x = block(x, causal_mask, keep)
            block_states.append(x)
        return StudentOutput(user_reps=self.final_norm(x), block_states=block_states)

    def save_pretrained(self, directory) -> None:
        save_student(self, directory)
