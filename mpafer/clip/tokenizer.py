"""CLIP's byte-level BPE tokenizer (same cleaning, split and merges as OpenAI's); the vocabulary
file beside it is data from OpenAI's CLIP release (MIT licence), read on first use."""
import functools
import gzip
import html
import os
import re
from typing import List, Sequence, Union

import ftfy
import regex
import torch

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges -> a 49,408-token vocabulary


@functools.lru_cache()
def bytes_to_unicode() -> dict:
    """Each byte -> a printable character (itself if printable, else 256 and up), so BPE never
    sees control bytes; this order fixes the first 256 token ids."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


class SimpleTokenizer:
    """Byte-level BPE over OpenAI's merges; `encode` and `decode` are inverses up to cleaning."""

    # Special tokens, English contractions, letter runs, single digits, punctuation runs.
    SPLIT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                          r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                          regex.IGNORECASE)

    def __init__(self, vocab_path: str = VOCAB_PATH):
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            merges = f.read().split("\n")[1: NUM_MERGES + 1]  # first line is a version header
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        self.cache = {SOT: SOT, EOT: EOT}

    @property
    def sot_token(self) -> int:
        return self.encoder[SOT]

    @property
    def eot_token(self) -> int:
        return self.encoder[EOT]

    def bpe(self, token: str) -> str:
        """Merge the characters of one word (last one marked `</w>`) by merge rank."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> List[int]:
        # ftfy repair, HTML entities decoded (twice, as OpenAI does), whitespace collapsed.
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        ids = []
        for piece in self.SPLIT.findall(re.sub(r"\s+", " ", text).strip().lower()):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache()
def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer, built (vocabulary read) on first use."""
    return SimpleTokenizer()


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77,
             truncate: bool = False) -> torch.LongTensor:
    """Texts -> `[n, context_length]` token ids: SOT, BPE ids, EOT, zero padding. Longer text is
    an error naming it, unless `truncate=True` (the last kept token becomes EOT, as OpenAI's)."""
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot_token] + tok.encode(text) + [tok.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"text is {len(ids)} tokens long (with SOT/EOT), more than the "
                                   f"context length {context_length}: {text!r}")
            ids = ids[:context_length]
            ids[-1] = tok.eot_token
        result[i, : len(ids)] = torch.tensor(ids)
    return result
