"""Offline CLIP BPE tokenizers with a small word vocabulary (tiny and toy models).

The vocabulary has CLIP's 256 byte symbols (alone and with `</w>`), the special tokens, and
each given word as one token, reached through a chain of merges; unknown words fall back
to byte tokens, exactly as in CLIP's own tokenizer.
"""

from __future__ import annotations

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
    merges: list[str] = []
    for word in sorted({w for phrase in words for w in phrase.lower().split()}):
        pieces = [symbols[b] for b in word.encode("utf-8")]
        pieces[-1] += "</w>"
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            current += piece
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}),
        encoding="utf-8",
    )
    return CLIPTokenizer.from_pretrained(folder)
