"""The student plus everything distillation adds to it, as one module whose forward returns every
loss term: what Accelerate wraps (DDP) and checkpoints.

Terms (each switched on in the config, each logged on its own):
- next_item: full-catalogue CE or BCE with a sampled negative;
- dros: DLLM2Rec code's distributionally robust term (DROS) on the target;
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
    dros_catalogue_term,
    dros_loss,
    feature_alignment,
    item_propensity,
    next_item_bce,
    next_item_ce,
    ranking_distillation,
    ranking_weights,
    sample_negatives,
    softmax_ranking_distillation,
    student_logsumexp,
    topk_kl,
)
from recdistill.models.scoring import catalogue_stats

# Defaults follow the official code (istarryn/DLLM2Rec main.py, WujiangXu/SLMRec
# utils/train_utils.py and model.py); each deviation is a named option (docs/distill.md, "Faithful
# to the official code").
LOSS_DEFAULTS: dict = {
    "next_item": "ce",  # ce | bce (DLLM2Rec's code: BCE with one sampled negative)
    "chunk_size": 8192,  # catalogue chunk for CE and scoring
    # Sampled negatives (BCE and ranking distillation) are never these items of the row:
    # DLLM2Rec draws from items not in the history and not the target.
    "negatives": {"exclude": ["target", "history"]},  # subset of target, history, candidates
    "dros": {"enabled": False, "weight": 1.0, "beta": 1.0},  # DLLM2Rec's alpha and beta
    # Rows whose teacher knowledge the ranking, logit and alignment terms use: none (every row,
    # the code) | teacher_beats_student (only rows where the teacher gives the true next item a
    # higher log-probability than the student does now: a teacher that trails teaches less)
    "reliability": "none",
    "ranking": {
        "enabled": False,
        "weight": 0.8,  # lam
        "k": 10,  # candidate_topk
        "position_lambda": 1.0,
        "mix": [0.3, 0.5, 0.1],  # gamma_position, gamma_confidence, gamma_consistency
        "consistency": "raw",  # raw (the code: indicator + 1e-8) | normalized
        "negative_term": "official",  # official: -log sigmoid(1 - s) | corrected: -log(1 - sigmoid(s))
        "negatives": "shared",  # shared: the row's one negative for all K | per_candidate
        # bce (the code: sigmoid on each candidate plus the negative term) | softmax (the
        # candidates as weighted targets of the catalogue softmax, for CE students)
        "form": "bce",
    },
    # fuse: input (the code: the fused table feeds the sequence, scoring uses the student's own
    # table) | input_and_scoring (the fused table also scores)
    "embedding": {"enabled": False, "weight": 0.2, "fuse": "input"},
    "logits": {
        "enabled": False,
        "weight": 1.0,
        "k": None,
        "temperature": 1.0,
        "tail": "renormalize",
    },
    "alignment": {
        "enabled": False,
        "cos_weight": 1.0,  # distill_lambda
        "l2_weight": 0.1,
        "distance": "norm",  # norm (the code: ||s - t||_2) | mean_square
        "reduction": "sum",  # over aligned blocks and supervision heads: sum (the code) | mean
        "pairs": None,  # {student block (1-based): teacher layer}; None = evenly spaced over stored layers
        # SLMRec's multiple supervision: a bias-free head at every aligned block but the last
        "multi_supervision_weight": 0.0,  # cls_multiple_lambda (the code's default: off)
    },
}

NEGATIVE_EXCLUSIONS = ("target", "history", "candidates")


def _block_reduction(name: str):
    if name not in ("sum", "mean"):
        raise ValueError(f"loss.alignment.reduction {name!r}: use sum or mean")
    return torch.sum if name == "sum" else torch.mean


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
        target_counts: torch.Tensor | None = None,  # [N + 1] training-target counts (DROS)
    ):
        super().__init__()
        self.student, self.cfg = student, loss_cfg
        self.num_items = student.config.num_items
        unknown = set(loss_cfg["negatives"]["exclude"]) - set(NEGATIVE_EXCLUSIONS)
        if unknown:
            raise ValueError(
                f"loss.negatives.exclude {sorted(unknown)}: choose from {list(NEGATIVE_EXCLUSIONS)}"
            )
        if loss_cfg["dros"]["enabled"]:
            if target_counts is None:
                raise ValueError("loss.dros needs the training targets' item counts")
            self.register_buffer("propensity", item_propensity(target_counts), persistent=False)
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
                # SLMRec: one bias-free head per aligned block but the last (the output itself)
                supervised = [block for block in self.pairs if block < len(block_dims)]
                if not supervised:
                    raise ValueError(
                        "loss.alignment.multi_supervision_weight > 0 supervises the student's "
                        f"aligned intermediate blocks, and {student.architecture} has "
                        f"{len(block_dims)} block(s) with aligned blocks {sorted(self.pairs)}: "
                        "set it to 0"
                    )
                for block in supervised:
                    self.heads[str(block)] = nn.Linear(block_dims[block - 1], item_dim, bias=False)

    def item_table(self) -> torch.Tensor:
        """The table the student scores with."""
        table = self.student.item_table()
        if self.collaborative is not None and self.cfg["embedding"]["fuse"] == "input_and_scoring":
            return self.collaborative(table)
        return table

    def encode(self, item_ids: torch.Tensor, lengths: torch.Tensor):
        """The student's outputs and its scoring table. DLLM2Rec fuses the teacher's embeddings
        into the sequence the student reads; its students score with their own output layer."""
        if self.collaborative is None:
            return self.student(item_ids, lengths), self.student.item_table()
        fuse = self.cfg["embedding"]["fuse"]
        if fuse not in ("input", "input_and_scoring"):
            raise ValueError(f"loss.embedding.fuse {fuse!r}: use input or input_and_scoring")
        fused = self.collaborative(self.student.item_table())
        out = self.student(item_ids, lengths, item_table=fused)
        return out, fused if fuse == "input_and_scoring" else self.student.item_table()

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

    def _negatives(self, batch: dict, count: int) -> torch.Tensor:
        """[M, count] sampled negatives, none of the row's `loss.negatives.exclude` items."""
        exclude = self.cfg["negatives"]["exclude"]
        at, targets = batch["target_positions"], batch["targets"]
        parts = []
        if "target" in exclude:
            parts.append(targets[:, None])
        if "history" in exclude:  # the items read up to and including this position
            ids = batch["item_ids"]
            row, position = at // ids.shape[1], at % ids.shape[1]
            history = ids[row]  # [M, L]
            upto = torch.arange(ids.shape[1], device=ids.device)[None, :] <= position[:, None]
            parts.append(history * upto)
        if "candidates" in exclude:
            parts.append(batch["teacher_topk_ids"][:, : self.cfg["ranking"]["k"]].long())
        if not parts:
            return torch.randint(
                1, self.num_items + 1, (len(targets), count), device=targets.device
            )
        return sample_negatives(self.num_items, torch.cat(parts, dim=1), count)

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
        ranking = cfg["ranking"]
        if ranking["form"] not in ("bce", "softmax"):
            raise ValueError(f"loss.ranking.form {ranking['form']!r}: use bce or softmax")
        sigmoid_ranking = ranking["enabled"] and ranking["form"] == "bce"
        # One negative per row, shared by BCE and the ranking term as in DLLM2Rec's code.
        wants_row_negative = cfg["next_item"] == "bce" or (
            sigmoid_ranking and ranking["negatives"] == "shared"
        )
        row_negative = self._negatives(batch, 1) if wants_row_negative else None  # [M, 1]
        student_ce = None
        if cfg["next_item"] == "ce":
            student_ce = next_item_ce(reps, table, targets, cfg["chunk_size"])  # [M]
            terms["next_item"] = student_ce.mean()
        elif cfg["next_item"] == "bce":
            terms["next_item"] = next_item_bce(
                (reps * table[targets]).sum(-1), (reps * table[row_negative[:, 0]]).sum(-1)
            ).mean()
        else:
            raise ValueError(f"loss.next_item {cfg['next_item']!r}: use ce or bce")
        dros = cfg["dros"]
        if dros["enabled"]:
            catalogue = dros_catalogue_term(
                reps, table, self.propensity, dros["beta"], cfg["chunk_size"]
            )
            target_scores = (reps * table[targets]).sum(-1)
            terms["dros"] = (
                dros["weight"]
                * dros_loss(catalogue, target_scores, self.propensity[targets], dros["beta"]).mean()
            )

        reliable = self._reliable_rows(batch, reps, table, student_ce)  # [M] or None

        if ranking["enabled"]:
            k = ranking["k"]
            candidates = batch["teacher_topk_ids"][:, :k]  # [M, K]
            cand_scores = (reps[:, None, :] * table[candidates]).sum(-1)
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
                tuple(ranking["mix"]),
                ranking["position_lambda"],
                ranking["consistency"],
            )
            if sigmoid_ranking:
                per_row = ranking_distillation(
                    cand_scores,
                    self._ranking_negative_scores(batch, reps, table, row_negative),
                    weights,
                    ranking["negative_term"],
                )
            else:
                if student_ce is not None:  # CE = lse - target score: no second catalogue pass
                    lse = student_ce + (reps * table[targets]).sum(-1)
                else:
                    lse = student_logsumexp(reps, table, 1.0, cfg["chunk_size"])
                per_row = softmax_ranking_distillation(cand_scores, lse, weights)
            if dros["enabled"]:  # the code adds DROS for each candidate as a target, weighted
                per_candidate = dros_loss(
                    catalogue, cand_scores, self.propensity[candidates], dros["beta"]
                )
                per_row = per_row + dros["weight"] * (weights * per_candidate).sum(1)
            if reliable is not None:
                per_row = per_row * reliable
            terms["ranking"] = ranking["weight"] * per_row.mean()

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
            if reliable is not None:
                kl = kl * reliable
            terms["logits"] = logit_cfg["weight"] * kl.mean()

        if self.pairs:
            align = cfg["alignment"]
            rows = torch.arange(batch["item_ids"].shape[0], device=reps.device)[:, None]
            positions = batch["hidden_positions"]  # [B, P]
            stored = batch["hidden_mask"].float()  # [B, P]: short sequences store fewer positions
            mask = stored if reliable is None else stored * self._at_hidden(batch, reliable)
            reduce = _block_reduction(align["reduction"])
            cosines, distances = [], []
            for block, layer in self.pairs.items():
                student_states = self.aligners[str(block)](
                    out.block_states[block - 1][rows, positions]
                )
                cosine, distance = feature_alignment(
                    student_states, batch[f"hidden_{layer}"], align["distance"]
                )
                # Over the stored positions: a position the reliability rule leaves out counts 0
                cosines.append((cosine * mask).sum() / stored.sum())
                distances.append((distance * mask).sum() / stored.sum())
            terms["align_cos"] = align["cos_weight"] * reduce(torch.stack(cosines))
            terms["align_l2"] = align["l2_weight"] * reduce(torch.stack(distances))
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
                terms["multi_supervision"] = align["multi_supervision_weight"] * reduce(
                    torch.stack(head_losses)
                )
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    def _ranking_negative_scores(self, batch, reps, table, row_negative) -> torch.Tensor:
        """[M, 1] or [M, K] the student's scores of the ranking term's negatives."""
        ranking = self.cfg["ranking"]
        if ranking["negatives"] == "shared":
            negatives = row_negative  # [M, 1]
        elif ranking["negatives"] == "per_candidate":
            negatives = self._negatives(batch, ranking["k"])  # [M, K]
        else:
            raise ValueError(
                f"loss.ranking.negatives {ranking['negatives']!r}: use shared or per_candidate"
            )
        return (reps[:, None, :] * table[negatives]).sum(-1)

    @staticmethod
    def _at_hidden(batch: dict, reliable: torch.Tensor) -> torch.Tensor:
        """[B, P] the reliability of the target positions the hidden states were stored at (a
        stored position is a target position of the same row; one that is not counts 0)."""
        ids, positions = batch["item_ids"], batch["hidden_positions"]
        dense = torch.zeros(ids.numel(), device=reliable.device, dtype=reliable.dtype)
        dense[batch["target_positions"]] = reliable
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        return dense.view_as(ids)[rows, positions]

    def _reliable_rows(self, batch, reps, table, student_ce) -> torch.Tensor | None:
        """1.0 for rows whose teacher knowledge to use, 0.0 for the others (loss.reliability)."""
        rule = self.cfg["reliability"]
        if rule == "none":
            return None
        if rule != "teacher_beats_student":
            raise ValueError(f"loss.reliability {rule!r}: use none or teacher_beats_student")
        if student_ce is None:
            student_ce = next_item_ce(reps, table, batch["targets"], self.cfg["chunk_size"])
        return (batch["teacher_target_logprob"] > -student_ce.detach()).float()

    def temperature_index(self, temperature: float) -> int:
        stored = self.temperatures
        if temperature not in stored:
            raise ValueError(
                f"logit temperature {temperature} not stored in the shards (have {stored})"
            )
        return stored.index(temperature)
