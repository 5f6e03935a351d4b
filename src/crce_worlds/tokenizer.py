"""Offline CLIP BPE tokenizers with a small word vocabulary (tiny and toy models).

The vocabulary has CLIP's 256 byte symbols (alone and with `</w>`), the special tokens, and
each given word as one token, reached through a chain of merges; unknown words fall back
to byte tokens, exactly as in CLIP's own tokenizer.
"""

from __future__ import annotations

import itertools
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer


@lru_cache(maxsize=1)
def byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for byte in range(256):  # indexed by byte value
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def build_tokenizer(words: list[str], folder: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json + merges.txt for `words` to `folder` and load a CLIPTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in vocabulary_words(words):
        letters = [symbols[b] for b in word.encode("utf-8")]
        letters[-1] += "</w>"
        # BPE applies merges by rank across words: a plain prefix chain per word breaks when
        # another word's merge outranks it ("p l" of "plus" splits "purple"). Appending the
        # merge of whatever pair is left, at the lowest rank, never changes a finished word.
        while len(pieces := bpe(letters, merges)) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}),
        encoding="utf-8",
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    split = [w for w in vocabulary_words(words) if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise ValueError(f"words that are not one token: {split[:5]}")
    return tokenizer


def vocabulary_words(words: list[str]) -> list[str]:
    return sorted({w for phrase in words for w in phrase.lower().split()})


def bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    rank = {pair: i for i, pair in enumerate(merges)}
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [
            (rank.get(pair, len(rank)), i) for i, pair in enumerate(itertools.pairwise(pieces))
        ]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces
