"""A word-level tokenizer for navigation instructions, saved and loaded as JSON.

BabyAI missions come from a small fixed grammar, so the vocabulary is that grammar's words (fixed
order, so every site and the backbone agree on ids without exchanging data), optionally extended
with words seen in demonstrations or R2R templates. Ids 0..4 are the special tokens.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PAD, CLS, SEP, MASK, UNK = "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"
SPECIALS = (PAD, CLS, SEP, MASK, UNK)
PAD_ID, CLS_ID, SEP_ID, MASK_ID, UNK_ID = range(5)

# Every word minigrid's BabyAI verifier can produce (minigrid/envs/babyai/core/verifier.py:
# surface() of GoTo/Pickup/Open/PutNext, the sequencing words, ObjDesc's colours, types, locations)
BABYAI_WORDS = (
    "go", "to", "pick", "up", "open", "put", "next", "then", "after", "you", "and", ",",
    "the", "a", "object", "box", "ball", "key", "door",
    "red", "green", "blue", "purple", "yellow", "grey",
    "in", "front", "of", "behind", "on", "your", "left", "right",
)

FORMAT = "ktfed-vln-tokenizer/1"
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class TokenizerError(ValueError):
    pass


def split_words(text: str) -> list[str]:
    """Lower-case words, punctuation as separate tokens ("ball, then" -> ball , then)."""
    return _WORD.findall(text.lower())


class Tokenizer:
    def __init__(self, words: Iterable[str] = BABYAI_WORDS):
        vocab = list(SPECIALS)
        for w in words:
            if w not in vocab:
                vocab.append(w)
        self.vocab: list[str] = vocab
        self.ids: dict[str, int] = {w: i for i, w in enumerate(vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def from_texts(cls, texts: Iterable[str], base: Iterable[str] = BABYAI_WORDS) -> Tokenizer:
        """The base words first (stable ids), then new words in order of first appearance."""
        words = list(base)
        seen = set(words)
        for text in texts:
            for w in split_words(text):
                if w not in seen:
                    seen.add(w)
                    words.append(w)
        return cls(words)

    def encode(self, text: str, max_len: int) -> list[int]:
        """[CLS] words [SEP] then [PAD] up to max_len; too long an instruction is refused rather
        than cut, since a cut instruction is a different instruction."""
        ids = [CLS_ID, *(self.ids.get(w, UNK_ID) for w in split_words(text)), SEP_ID]
        if len(ids) > max_len:
            raise TokenizerError(f"instruction has {len(ids)} tokens with [CLS] and [SEP], more than "
                                 f"max_len={max_len}: {text!r}")
        return ids + [PAD_ID] * (max_len - len(ids))

    def encode_batch(self, texts: Iterable[str], max_len: int) -> np.ndarray:
        return np.asarray([self.encode(t, max_len) for t in texts], dtype=np.int64).reshape(-1, max_len)

    def decode(self, ids: Iterable[int]) -> str:
        words = [self.vocab[i] if 0 <= i < len(self.vocab) else UNK for i in ids]
        return " ".join(w for w in words if w not in (PAD, CLS, SEP))

    # -- files ---------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "vocab": self.vocab})

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise TokenizerError(f"tokenizer: not valid JSON ({err})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise TokenizerError(f"tokenizer: expected an object with format {FORMAT!r}")
        vocab = doc.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(w, str) and w for w in vocab):
            raise TokenizerError("tokenizer.vocab: must be a list of non-empty strings")
        if tuple(vocab[:len(SPECIALS)]) != SPECIALS:
            raise TokenizerError(f"tokenizer.vocab: must start with {list(SPECIALS)}")
        if len(set(vocab)) != len(vocab):
            raise TokenizerError("tokenizer.vocab: duplicate words")
        return cls(vocab[len(SPECIALS):])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        try:
            return cls.from_json(Path(path).read_text())
        except FileNotFoundError:
            raise TokenizerError(f"{path}: tokenizer file not found") from None
