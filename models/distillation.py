"""The student plus everything distillation adds to it, as one module whose forward returns every
loss term: what Accelerate wraps (DDP) and checkpoints.

Terms (each switched on in the config, each logged on its own):
- next_item: full-catalogue CE or BCE with a sampled negative;
- ranking: DLLM2Rec importance-aware ranking distillation over the teacher's top-K;
- logits: KL over the teacher's top-K (renormalised, or with an exact tail bucket);
- align_cos, align_l2: SLMRec feature alignment of student blocks with teacher layers;
- multi_supervision: SLMRec's extra next-item heads on intermediate student blocks.
DLLM2Rec's collaborative embedding distillation is not a term: it changes the item table the
student reads and scores with (also at evaluation time).
"""

from __future__ import annotations

import torch
from torch import nn

from recdistill.models.losses import (
    CollaborativeEmbedding,
    feature_alignment,
    next_item_bce,
    next_item_ce,
    ranking_distillation,
    ranking_weights,
    student_logsumexp,
    topk_kl,
)
from recdistill.models.scoring import catalogue_stats

LOSS_DEFAULTS: dict = {
    "next_item": "ce",  # ce | bce
    "chunk_size": 8192,  # catalogue chunk for CE and scoring
    "ranking": {
        "enabled": False,
        "weight": 0.7,
        "k": 10,
        "position_lambda": 1.0,
        "mix": [0.3, 0.5, 0.1],
    },
    "embedding": {"enabled": False, "weight": 0.3},
    "logits": {
        "enabled": False,
        "weight": 1.0,
        "k": None,
        "temperature": 1.0,
        "tail": "renormalize",
    },
    "alignment": {
        "enabled": False,
        "cos_weight": 1.0,
        "l2_weight": 0.1,
        "pairs": None,  # {student block (1-based): teacher layer}; None = evenly spaced over stored layers
        "multi_supervision_weight": 0.0,
    },
}


def default_pairs(student_blocks: int, teacher_layers: int, stored: list[int]) -> dict[int, int]:
    """Student block j <-> teacher layer j * teacher_layers / student_blocks (SLMRec: 8 -> 4 gives
    2, 4, 6, 8), keeping the pairs whose teacher layer was stored."""
    pairs = {}
    for block in range(1, student_blocks + 1):
        layer = round(block * teacher_layers / student_blocks)
        if layer in stored:
            pairs[block] = layer
    return pairs


class DistillationObjective(nn.Module):
    def __init__(
        self,
        student: nn.Module,
        loss_cfg: dict,
        manifest: dict | None,
        teacher_table: torch.Tensor | None = None,
        block_dims: list[int] | None = None,
    ):
        super().__init__()
        self.student, self.cfg = student, loss_cfg
        self.num_items = student.config.num_items
        self.temperatures = list(manifest["temperatures"]) if manifest else [1.0]
        item_dim = student.item_table().shape[1]
        self.collaborative = None
        if loss_cfg["embedding"]["enabled"]:
            self.collaborative = CollaborativeEmbedding(
                teacher_table, item_dim, loss_cfg["embedding"]["weight"]
            )
        self.pairs: dict[int, int] = {}
        self.aligners = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        align = loss_cfg["alignment"]
        if align["enabled"]:
            pairs = align["pairs"] or default_pairs(
                len(block_dims), manifest["teacher_layers"], manifest["hidden_layers"]
            )
            self.pairs = {int(block): int(layer) for block, layer in pairs.items()}
            missing = [
                layer for layer in self.pairs.values() if layer not in manifest["hidden_layers"]
            ]
            if missing or not self.pairs:
                raise ValueError(
                    f"alignment needs teacher layers {missing or 'to align'}; shards hold {manifest['hidden_layers']}"
                )
            for block in self.pairs:
                width = block_dims[block - 1]
                # A learned projection, also at equal widths unless the student shares the
                # teacher's architecture (a SASRec block's space is not the LLM's).
                shared = width == manifest["hidden_size"] and student.architecture == "llama"
                self.aligners[str(block)] = (
                    nn.Identity() if shared else nn.Linear(width, manifest["hidden_size"])
                )

            if align["multi_supervision_weight"] > 0:
                if len(block_dims) < 2:
                    raise ValueError(
                        "loss.alignment.multi_supervision_weight > 0 supervises the student's "
                        f"intermediate blocks, and {student.architecture} has {len(block_dims)} "
                        "block: set it to 0"
                    )
                for block in range(
                    1, len(block_dims)
                ):  # every block but the last, which is the output
                    self.heads[str(block)] = nn.Linear(block_dims[block - 1], item_dim)

    def item_table(self) -> torch.Tensor:
        table = self.student.item_table()
        return self.collaborative(table) if self.collaborative is not None else table

    def encode(self, item_ids: torch.Tensor, lengths: torch.Tensor):
        table = self.item_table()
        out = self.student(
            item_ids, lengths, item_table=table if self.collaborative is not None else None
        )
        return out, table

    @torch.no_grad()
    def rank_targets(
        self, item_ids, lengths, targets, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full-ranking rank of each row's target after its history (evaluation); `exclude`
        ([B, S] item ids, 0 = none) are ranked out."""
        out, table = self.encode(item_ids, lengths)
        reps = out.user_reps[torch.arange(item_ids.shape[0], device=item_ids.device), lengths - 1]
        stats = catalogue_stats(
            reps,
            table,
            targets=targets,
            chunk_size=self.cfg["chunk_size"],
            exclude=exclude,
        )
        return stats.target_ranks

    def _negatives(self, shape, device) -> torch.Tensor:
        return torch.randint(1, self.num_items + 1, shape, device=device)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every switched-on term for one batch (trainer/data/shard_stream.py's `to_batch`).

        The teacher's outputs come flat over the M positions that have a target;
        `target_positions` [M] says where each sits in the [B * L] student positions, so no
        boolean mask (and no host sync) is needed to pick them.
        """
        cfg = self.cfg
        out, table = self.encode(batch["item_ids"], batch["lengths"])
        at = batch["target_positions"]  # [M]
        reps, targets = out.user_reps.flatten(0, 1)[at], batch["targets"]  # [M, d], [M]
        terms: dict[str, torch.Tensor] = {}
        if cfg["next_item"] == "ce":
            terms["next_item"] = next_item_ce(reps, table, targets, cfg["chunk_size"]).mean()
        elif cfg["next_item"] == "bce":
            negatives = self._negatives(targets.shape, targets.device)
            terms["next_item"] = next_item_bce(
                (reps * table[targets]).sum(-1), (reps * table[negatives]).sum(-1)
            ).mean()
        else:
            raise ValueError(f"loss.next_item {cfg['next_item']!r}: use ce or bce")

        if cfg["ranking"]["enabled"]:
            k = cfg["ranking"]["k"]
            candidates = batch["teacher_topk_ids"][:, :k]  # [M, K]
            cand_scores = (reps[:, None, :] * table[candidates]).sum(-1)
            negatives = self._negatives(candidates.shape, candidates.device)
            neg_scores = (reps[:, None, :] * table[negatives]).sum(-1)
            own_top = catalogue_stats(
                reps.detach(), table.detach(), k=k, chunk_size=cfg["chunk_size"]
            ).topk_ids
            in_own_top = (candidates[:, :, None] == own_top[:, None, :]).any(-1)
            # -log p of each candidate under the teacher's full-catalogue softmax
            confidence = (
                batch["teacher_logsumexp"][:, :1] - batch["teacher_topk_scores"][:, :k].float()
            )
            weights = ranking_weights(
                confidence,
                in_own_top,
                tuple(cfg["ranking"]["mix"]),
                cfg["ranking"]["position_lambda"],
            )
            terms["ranking"] = (
                cfg["ranking"]["weight"]
                * ranking_distillation(cand_scores, neg_scores, weights).mean()
            )

        if cfg["logits"]["enabled"]:
            logit_cfg = cfg["logits"]
            k = logit_cfg["k"] or batch["teacher_topk_ids"].shape[-1]
            candidates = batch["teacher_topk_ids"][:, :k]
            cand_scores = (reps[:, None, :] * table[candidates]).sum(-1)
            temperature = float(logit_cfg["temperature"])
            teacher_lse = student_lse = None
            if logit_cfg["tail"] == "bucket":
                teacher_lse = batch["teacher_logsumexp"][:, self.temperature_index(temperature)]
                student_lse = student_logsumexp(reps, table, temperature, cfg["chunk_size"])
            kl = topk_kl(
                cand_scores,
                batch["teacher_topk_scores"][:, :k],
                temperature,
                logit_cfg["tail"],
                teacher_lse,
                student_lse,
            )
            terms["logits"] = logit_cfg["weight"] * kl.mean()

        if self.pairs:
            align = cfg["alignment"]
            rows = torch.arange(batch["item_ids"].shape[0], device=reps.device)[:, None]
            positions = batch["hidden_positions"]  # [B, P]
            mask = batch["hidden_mask"].float()  # [B, P]: short sequences store fewer positions
            cosines, squares = [], []
            for block, layer in self.pairs.items():
                student_states = self.aligners[str(block)](
                    out.block_states[block - 1][rows, positions]
                )
                cosine, squared = feature_alignment(student_states, batch[f"hidden_{layer}"])
                cosines.append((cosine * mask).sum() / mask.sum())
                squares.append((squared * mask).sum() / mask.sum())
            terms["align_cos"] = align["cos_weight"] * torch.stack(cosines).mean()
            terms["align_l2"] = align["l2_weight"] * torch.stack(squares).mean()
            if self.heads:
                head_losses = [
                    next_item_ce(
                        head(out.block_states[int(block) - 1].flatten(0, 1)[at]),
                        table,
                        targets,
                        cfg["chunk_size"],
                    ).mean()
                    for block, head in self.heads.items()
                ]
                terms["multi_supervision"] = (
                    align["multi_supervision_weight"] * torch.stack(head_losses).mean()
                )
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    def temperature_index(self, temperature: float) -> int:
        stored = self.temperatures
        if temperature not in stored:
            raise ValueError(
                f"logit temperature {temperature} not stored in the shards (have {stored})"
            )
        return stored.index(temperature)
