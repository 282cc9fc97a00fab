"""LLM sequential recommender (E4SRec / SLMRec design): item ids in, catalogue scores out.

    item ids -> item table [N+1, d_item] -> linear -> LLM hidden size -> causal LM backbone
    hidden state at a position -> linear -> d_item -> dot with the item table -> scores over N items

Two modes:
- sequence: the input is the user's items only; with causal attention every position is a user
  representation that predicts the next item, so one forward trains (or scores) all positions.
- prefix: SLMRec's prompt, `instruction tokens + items + response tokens`; only the last
  position predicts the next item.

Sequences are right-padded: with causal attention no real position ever sees a pad, positions
need no correction and no attention row is fully masked.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.utils import ModelOutput

from recdistill.models.scoring import CatalogueStats, catalogue_cross_entropy, catalogue_stats
from recdistill.models.student_io import embed

CONFIG_FILE = "teacher_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TeacherConfig:
    num_items: int  # catalogue size N (ids 1..N, 0 = padding)
    backbone: dict  # a Hugging Face model config as a dict (`model_type` included)
    backbone_path: str | None = None  # local checkpoint for the backbone's initial weights
    item_dim: int = 64
    # Item table N(0, item_init_std) at the start; None: N(0, item_dim^-0.5).
    item_init_std: float | None = None
    # Dropout on the projected item embeddings: a backbone trained from scratch on a small log
    # (LLaMA has no hidden dropout) otherwise memorises it.
    input_dropout: float = 0.0
    # user_out_proj starts as the transpose of item_in_proj (orthonormal): see _tie_projections.
    tied_projection_init: bool = False
    # > 0: a fixed item feature table [N+1, F] (e.g. text-encoder embeddings of titles) is
    # projected to item_dim and added to the item table the model reads and scores with: the
    # pretrained knowledge an LLM teacher brings that an ID-only student lacks.
    item_feature_dim: int = 0
    mode: str = "sequence"  # "sequence" | "prefix"
    prompt_prefix_ids: list[int] = field(default_factory=list)  # prefix mode: instruction tokens
    prompt_suffix_ids: list[int] = field(
        default_factory=list
    )  # prefix mode: response prompt tokens
    freeze_item_embeddings: bool = False
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = False
    score_chunk_size: int = 8192

    def __post_init__(self):
        if self.mode not in ("sequence", "prefix"):
            raise ValueError(f"teacher mode must be 'sequence' or 'prefix', got {self.mode!r}")
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)

    def backbone_config(self):
        """The backbone's HF config object: families name their sizes differently in config.json
        (GPT-2: n_embd, n_layer), the config object answers hidden_size / num_hidden_layers."""
        return AutoConfig.for_model(**self.backbone)

    @property
    def hidden_size(self) -> int:
        return self.backbone_config().hidden_size

    @property
    def num_layers(self) -> int:
        return self.backbone_config().num_hidden_layers


@dataclass
class TeacherOutput(ModelOutput):
    """A ModelOutput (a dict) on purpose: DeepSpeed ZeRO-3 hooks the backward pass through the
    tensors it finds in a module's outputs, and it only looks inside tuples, lists and dicts."""

    user_reps: torch.Tensor | None = (
        None  # [B, P, d_item]: P = L in sequence mode, 1 in prefix mode
    )
    loss: torch.Tensor | None = None  # mean over users of the mean over their target positions
    hidden_states: dict[int, torch.Tensor] | None = (
        None  # layer -> [B, T, H], T = backbone positions
    )
    stats: CatalogueStats | None = None


def build_backbone(config: TeacherConfig, load_weights: bool) -> nn.Module:
    """The LLM without its LM head. Under an active HfDeepSpeedConfig (ZeRO-3), transformers
    constructs it partitioned (zero.Init) and loads the checkpoint shard by shard."""
    # In torch's default dtype, not the checkpoint's (transformers 5 follows config.json's
    # `dtype`: a bf16 checkpoint gave a bf16 backbone beside fp32 item layers). Under ZeRO-3,
    # zero.Init casts to the DeepSpeed config's dtype as it partitions, and the checkpoint is
    # read in its own dtype (fp32 would double every shard read of a bf16 checkpoint).
    from transformers.integrations import is_deepspeed_zero3_enabled

    dtype = "auto" if is_deepspeed_zero3_enabled() else torch.get_default_dtype()
    if load_weights and config.backbone_path:
        backbone = AutoModel.from_pretrained(
            config.backbone_path, local_files_only=True, dtype=dtype
        )
    else:
        backbone = AutoModel.from_config(config.backbone_config(), dtype=torch.get_default_dtype())
    backbone.get_input_embeddings().weight.requires_grad_(False)  # text embeddings stay as they are
    if config.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if config.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=list(config.lora.target_modules),
        )
        with outside_zero_init(backbone):
            backbone = get_peft_model(backbone, lora)
    return backbone


@contextlib.contextmanager
def outside_zero_init(module: nn.Module):
    """Build new layers beside a ZeRO-3 partitioned `module` as plain ones: peft creates the
    adapters and then moves them to the base layer's device and dtype, which under zero.Init
    replaces each partitioned adapter weight by its empty local shard (found on a LoRA teacher:
    every forward failed on a 0-element lora_A). deepspeed.initialize partitions them later;
    they take the partitioned weights' dtype (ZeRO-3 keeps one dtype for all trainable ones)."""
    partitioned = [param for param in module.parameters() if hasattr(param, "ds_id")]
    if not partitioned:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import (
        restore_init_context,
        shutdown_init_context,
    )

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()
    for param in module.parameters():
        if not hasattr(param, "ds_id"):
            param.data = param.data.to(partitioned[0].dtype)


def backbone_matmul_params(config: TeacherConfig) -> int:
    """Weights the backbone multiplies every position by: its 2-D parameters outside embedding
    tables (a lookup is no matmul). Built on the meta device: no memory, even for a 70B config."""
    with torch.device("meta"):
        backbone = AutoModel.from_config(config.backbone_config())
    return sum(
        param.numel()
        for module in backbone.modules()
        if not isinstance(module, nn.Embedding)
        for param in module.parameters(recurse=False)
        if param.dim() == 2
    )


def train_flops(config: TeacherConfig, item_lengths: Sequence[int], matmul_params: int) -> float:
    """Model FLOPs of one training pass over users with these history lengths: the matmuls of
    forward and backward (PaLM's MFU convention, its appendix B: 2 FLOPs a multiply-add, pads and
    recomputation not counted). A layer's backward costs 2x its forward when its weight trains
    (input and weight gradients), 1x when it is frozen (LoRA backbone, frozen item table)."""
    backbone = config.backbone_config()  # ~0.4 ms: nothing next to a training step
    heads = backbone.num_attention_heads
    head_dim = getattr(backbone, "head_dim", None) or backbone.hidden_size // heads
    hidden, layers = backbone.hidden_size, backbone.num_hidden_layers
    attention_width = heads * head_dim
    prompt = len(config.prompt_prefix_ids) + len(config.prompt_suffix_ids)
    table_trains = not config.freeze_item_embeddings
    backbone_trains = config.lora is None
    item_dim = config.item_dim
    total = 0.0
    for items in item_lengths:
        positions = items + prompt if config.mode == "prefix" else items
        predicted = 1 if config.mode == "prefix" else items
        in_proj = 2 * item_dim * hidden * items
        linears = 2 * matmul_params * positions
        attention = 2 * 2 * layers * attention_width * positions**2  # QK^T and AV, unmasked
        out_proj = 2 * hidden * item_dim * predicted
        scores = 2 * item_dim * (config.num_items + 1) * predicted  # the padding row is scored too
        total += (
            (2 + table_trains) * (in_proj + scores)
            + (2 + backbone_trains) * linears
            + 3 * (attention + out_proj)
        )
    return total


def import_backbone_modules(config: TeacherConfig) -> None:
    """Import what building the backbone imports lazily, before entering `deepspeed.zero.Init`:
    zero.Init patches tensor constructors, and torch._dynamo fails to import under that patch."""
    import torch._dynamo  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    MODEL_MAPPING[type(config.backbone_config())]


def gathered_for_init(params: list[nn.Parameter]):
    """Under ZeRO-3 (parameters already partitioned): gather them whole, let rank 0 set them and
    partition its values again; otherwise nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


class LLMRecTeacher(nn.Module):
    def __init__(
        self,
        config: TeacherConfig,
        load_backbone_weights: bool = True,
        item_features: torch.Tensor | None = None,  # [N+1, item_feature_dim]; saved with the model
    ):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config, load_backbone_weights)
        # The initial table is handed to the constructor: under DeepSpeed's zero.Init a module's
        # parameters are partitioned when its __init__ returns, so an nn.init call afterwards
        # would silently do nothing (the table kept nn.Embedding's N(0, 1), 8x too large at
        # item_dim 64, and the teacher learned several times slower).
        std = config.item_dim**-0.5 if config.item_init_std is None else config.item_init_std
        table = torch.randn(config.num_items + 1, config.item_dim) * std
        table[0] = 0.0  # padding
        self.item_embeddings = nn.Embedding(
            config.num_items + 1, config.item_dim, padding_idx=0, _weight=table
        )
        self.item_embeddings.weight.requires_grad_(not config.freeze_item_embeddings)
        if config.item_feature_dim:
            shape = (config.num_items + 1, config.item_feature_dim)
            features = torch.zeros(shape) if item_features is None else item_features.float()
            if tuple(features.shape) != shape:
                raise ValueError(f"item features of shape {tuple(features.shape)}, need {shape}")
            features[0] = 0.0  # padding
            self.register_buffer("item_features", features, persistent=True)
            self.item_feature_proj = nn.Linear(config.item_feature_dim, config.item_dim, bias=False)
        self.item_in_proj = nn.Linear(config.item_dim, config.hidden_size)
        self.user_out_proj = nn.Linear(config.hidden_size, config.item_dim)
        self.input_dropout = nn.Dropout(config.input_dropout)
        if config.tied_projection_init:
            self._tie_projections()
        self._register_item_table_for_zero3()

    def _tie_projections(self) -> None:
        # SASRec scores with the table it reads, so through the residual stream an item scores
        # the items like it from the first step. Two independent random projections hide that
        # prior until it is learned; W_out = W_in^T (orthonormal columns, zero biases) keeps it.
        projections = [self.item_in_proj, self.user_out_proj]
        params = [p for layer in projections for p in (layer.weight, layer.bias)]
        with gathered_for_init(params):
            # float32 whatever the run's dtype: zero.Init makes new tensors in bf16 under a bf16
            # config, and QR (orthogonal_) has no bf16 kernel.
            w_in = torch.empty(self.config.hidden_size, self.config.item_dim).float()
            nn.init.orthogonal_(w_in)
            with torch.no_grad():
                self.item_in_proj.weight.copy_(w_in)
                self.user_out_proj.weight.copy_(w_in.T)
                self.item_in_proj.bias.zero_()
                self.user_out_proj.bias.zero_()

    def _register_item_table_for_zero3(self) -> None:
        # The item table is also read outside nn.Embedding.forward (to score the catalogue).
        # ZeRO-3 only gathers a parameter for the forward of the module that owns it, unless it
        # is registered as an external parameter of the module that uses it.
        weight = self.item_embeddings.weight
        if hasattr(weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)

    # ---- inputs ------------------------------------------------------------------------------
    def _text_embeddings(self, token_ids: list[int], batch: int, device) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        return self.backbone.get_input_embeddings()(ids).unsqueeze(0).expand(batch, -1, -1)

    def _inputs(
        self, item_ids: torch.Tensor, lengths: torch.Tensor, item_table: torch.Tensor | None = None
    ):
        """inputs_embeds [B, T, H], attention mask [B, T], index of each item position [L]."""
        if item_table is None and self.config.item_feature_dim:
            item_table = self.item_table()
        item_embeds = self.input_dropout(
            self.item_in_proj(embed(item_ids, self.item_embeddings, item_table))
        )  # [B, L, H]
        batch, max_len = item_ids.shape
        positions = torch.arange(max_len, device=item_ids.device)
        mask = (positions[None, :] < lengths[:, None]).long()
        if self.config.mode == "sequence":
            return item_embeds, mask, positions
        prefix = self._text_embeddings(self.config.prompt_prefix_ids, batch, item_ids.device)
        suffix = self._text_embeddings(self.config.prompt_suffix_ids, batch, item_ids.device)
        n_prefix, n_suffix = prefix.shape[1], suffix.shape[1]
        # Right padding: each user's suffix goes right after their last item.
        total = n_prefix + max_len + n_suffix
        embeds = torch.zeros(
            batch, total, item_embeds.shape[-1], dtype=item_embeds.dtype, device=item_ids.device
        )
        embeds[:, :n_prefix] = prefix.to(item_embeds.dtype)
        embeds[:, n_prefix : n_prefix + max_len] = item_embeds * mask[..., None]
        suffix_at = (
            n_prefix + lengths[:, None] + torch.arange(n_suffix, device=item_ids.device)[None, :]
        )
        rows = torch.arange(batch, device=item_ids.device)[:, None].expand_as(suffix_at)
        embeds[rows, suffix_at] = suffix.to(item_embeds.dtype)
        full_mask = (
            torch.arange(total, device=item_ids.device)[None, :]
            < (n_prefix + lengths + n_suffix)[:, None]
        )
        return embeds, full_mask.long(), positions + n_prefix

    def last_positions(self, lengths: torch.Tensor) -> torch.Tensor:
        """Index of the last real token of each row in the backbone's input."""
        if self.config.mode == "sequence":
            return lengths - 1
        return len(self.config.prompt_prefix_ids) + lengths + len(self.config.prompt_suffix_ids) - 1

    def item_table(self) -> torch.Tensor:
        """[N+1, d_item]: the ID table, plus the projected item features when there are any
        (the padding row's features are zero and the projection has no bias: row 0 stays 0)."""
        if not self.config.item_feature_dim:
            return self.item_embeddings.weight
        # The buffer stays where it was built: DeepSpeed's ZeRO-3 moves parameters to the device,
        # not a buffer registered under zero.Init (a GPU teacher failed on this, the CPU never).
        features = self.item_features.to(self.item_feature_proj.weight.device)
        return self.item_embeddings.weight + self.item_feature_proj(features)

    def last_reps(self, user_reps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, d_item]: the representation after each user's whole input (from forward's user_reps)."""
        if self.config.mode == "prefix":
            return user_reps[:, 0]
        return user_reps[torch.arange(user_reps.shape[0], device=user_reps.device), lengths - 1]

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        item_ids: torch.Tensor,  # [B, L] right-padded with 0
        lengths: torch.Tensor,  # [B]
        targets: torch.Tensor | None = None,  # [B, L] (sequence, 0 = no target) or [B] (prefix)
        hidden_layers: tuple[
            int, ...
        ] = (),  # hidden_states indices: 0 = embeddings, i = after block i
        topk: int = 0,
        temperatures: tuple[float, ...] = (),  # with score: log-sum-exp at these temperatures
        score: str | None = None,  # None | "last" | "all" (real positions): catalogue statistics
        exclude: torch.Tensor
        | None = None,  # [B, X] ids left out of top-K and ranks (e.g. history)
        rank_targets: bool = True,  # with score: also the targets' ranks
        item_table: torch.Tensor | None = None,  # input embeddings from this table (LLaMA student)
    ) -> TeacherOutput:
        embeds, mask, item_positions = self._inputs(item_ids, lengths, item_table)
        out = self.backbone(
            inputs_embeds=embeds, attention_mask=mask, output_hidden_states=bool(hidden_layers)
        )
        hidden = out.last_hidden_state  # [B, T, H]
        rows = torch.arange(item_ids.shape[0], device=item_ids.device)
        last = self.last_positions(lengths)
        if self.config.mode == "sequence":
            user_reps = self.user_out_proj(hidden[:, item_positions])  # [B, L, d_item]
        else:
            user_reps = self.user_out_proj(hidden[rows, last]).unsqueeze(1)  # [B, 1, d_item]
        result = TeacherOutput(user_reps=user_reps)
        if hidden_layers:
            result.hidden_states = {layer: out.hidden_states[layer] for layer in hidden_layers}
        table = self.item_table()
        if targets is not None and score is None:
            result.loss = self._loss(user_reps, targets, table)
        if score is not None:
            if score == "last":
                reps = self.last_reps(user_reps, lengths)
                flat_targets = targets  # [B] or None
            else:  # every real position, row-major: user 0's positions, then user 1's, ...
                positions = torch.arange(user_reps.shape[1], device=lengths.device)
                valid = positions[None, :] < lengths[:, None]  # prefix mode: P = 1, always valid
                reps = user_reps[valid]

                flat_targets = (
                    targets[valid] if targets is not None and targets.dim() == 2 else targets
                )
            result.stats = catalogue_stats(
                reps,
                table,
                k=topk,
                targets=flat_targets,
                temperatures=temperatures,
                chunk_size=self.config.score_chunk_size,
                exclude=exclude,
                rank_targets=rank_targets,
            )
        return result

    def _loss(
        self, user_reps: torch.Tensor, targets: torch.Tensor, table: torch.Tensor
    ) -> torch.Tensor:
        if targets.dim() == 1:  # prefix mode: one target per user
            return catalogue_cross_entropy(
                user_reps[:, 0], table, targets, self.config.score_chunk_size
            ).mean()
        valid = targets > 0  # [B, L]
        per_position = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        per_position[valid] = catalogue_cross_entropy(
            user_reps[valid], table, targets[valid], self.config.score_chunk_size
        )
        # Each user weighs the same whatever their length: so a global batch split across ranks
        # (equal users per rank) averages to the same loss as one process.
        per_user = per_position.sum(1) / valid.sum(1).clamp(min=1)
        return per_user.mean()

    # ---- files -------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, state_dict: dict | None = None) -> None:
        """Config + safetensors; `state_dict` lets a DeepSpeed job pass its consolidated weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_teacher_files(
            directory, self.config, state_dict if state_dict is not None else self.state_dict()
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path, merge_lora: bool = True) -> LLMRecTeacher:
        """Load without DeepSpeed: the backbone is rebuilt from the stored config (no download)."""
        directory = Path(directory)
        config = load_teacher_config(directory)
        model = cls(config, load_backbone_weights=False)
        state = load_file(str(directory / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{directory / WEIGHTS_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if merge_lora and config.lora is not None:
            model.backbone = model.backbone.merge_and_unload()
        return model.eval()


def save_teacher_files(directory: Path, config: TeacherConfig, state_dict: dict) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")


def load_teacher_config(directory: Path) -> TeacherConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a teacher checkpoint (no {CONFIG_FILE})")
    return TeacherConfig(**json.loads(path.read_text()))
