"""A code tokenizer trained on the run's own refinement corpus.

Byte-level BPE keeps every character of a source (indentation and newlines matter in
Python), and numbers are split into single digits first, so that "1024 -> 1331" is an
edit of a few digit tokens the LM can learn, not a jump between two unrelated tokens.
The ids of the special tokens follow T5: pad 0 (also the decoder start), eos 1, unk 2.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<pad>", "</s>", "<unk>"]
PAD, EOS, UNK = 0, 1, 2


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
    )
    # Sorted input: the learned merges must not depend on the order texts arrived in.
    tok.train_from_iterator(sorted(texts), trainer=trainer)
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids + [EOS]


def decode(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode([i for i in ids if i > EOS], skip_special_tokens=True)


def save(tok: Tokenizer, path: Path) -> None:
    tok.save(str(path))


def load(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))
