"""A random-weight LLaMA checkpoint with its tokenizer, in the layout of a downloaded one.

    python bench/make_checkpoint.py --shape tinyllama --output runs/tinyllama-1.1b
    python bench/make_checkpoint.py --shape tiny --output /tmp/tiny-llama --text "words to know"

`LlamaForCausalLM` of the shape, random weights in bf16 (the dtype 7B checkpoints ship in),
written by `save_pretrained` as safetensors in 1 GB shards, and a tokenizer written by its
`save_pretrained`: word level over the words of --text and numbered filler words up to the
vocabulary size, a BOS token first, as a LLaMA tokenizer gives a prompt. Nothing is downloaded.
The folder is staged and renamed, and an existing one is never overwritten.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# TinyLlama-1.1B's architecture (config.json of TinyLlama/TinyLlama-1.1B-intermediate-*).
SHAPES = {
    "tinyllama": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
    },
}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer(text: str, vocab_size: int):
    """Word level over `text`'s words and filler words, BOS added in front of every input."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in dict.fromkeys(text.split()) if w not in SPECIAL_TOKENS]
    if len(words) + len(SPECIAL_TOKENS) > vocab_size:
        raise SystemExit(f"--text has {len(words)} distinct words: more than the vocabulary holds")
    fillers = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS) - len(words))]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words, *fillers])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def make_checkpoint(shape: dict, output: Path, text: str = "", seed: int = 0) -> int:
    """Write the checkpoint; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    staging = output.with_name(output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(staging, max_shard_size="1GB")
    build_tokenizer(text, shape["vocab_size"]).save_pretrained(staging)
    parameters = sum(p.numel() for p in model.parameters())
    staging.rename(output)
    return parameters


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="tinyllama", help="(default tinyllama)"
    )
    parser.add_argument("--output", type=Path, required=True, help="checkpoint folder to create")
    parser.add_argument("--text", default="", help="words the tokenizer knows besides fillers")
    parser.add_argument("--seed", type=int, default=0, help="weights' random seed (default 0)")
    args = parser.parse_args(argv)
    if args.output.exists():
        raise SystemExit(f"{args.output} exists: not overwritten")
    parameters = make_checkpoint(SHAPES[args.shape], args.output, args.text, args.seed)
    print(f"{args.output}: LLaMA, {parameters:,} parameters, bf16, with its tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
