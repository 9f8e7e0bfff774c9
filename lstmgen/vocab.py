"""Char- and word-level vocabularies, built from training text and saved with every artifact.

Torch-free: training, export, the server and offline sampling all decode through this, and encode
through lstmgen/text.py (`encode`, which `Vocab.encode` calls): one tokenization and one policy for
unknown symbols. Word level follows PTB as pytorch/examples reads it: whitespace tokens plus `<eos>`
per line.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

from lstmgen.errors import UserError

Level = Literal["char", "word"]
EOS = "<eos>"  # word level: end of line (PTB), decoded as "\n"
UNK = "<unk>"  # word level: unknown word, when the corpus has it
# End of text: generation stops when the model samples it. Char level uses ASCII ETX, so a
# corpus of many documents joined by "\x03" teaches the model where a document ends.
EOT_CHAR, EOT_WORD = "\x03", "<eot>"


class UnknownTokensError(UserError, ValueError):
    """The text holds characters/words the vocabulary cannot encode (nor <unk> stand for)."""

    def __init__(self, unknown: Sequence[str], level: str | None = None):
        self.unknown = list(dict.fromkeys(unknown))  # unique, in order of appearance
        self.level = level
        super().__init__(self.describe())

    def describe(self, vocabulary: str = "the vocabulary") -> str:
        """"2 word(s) not in <vocabulary>, which has no <unk> to map them to: 'dog', 'ran'"."""
        noun = {"char": "character(s)", "word": "word(s)"}.get(self.level or "", "symbol(s)")
        why = ", which has no <unk> to map them to" if self.level == "word" else ""
        shown = ", ".join(repr(u) for u in self.unknown[:10])
        more = f" and {len(self.unknown) - 10} more" if len(self.unknown) > 10 else ""
        return f"{len(self.unknown)} {noun} not in {vocabulary}{why}: {shown}{more}"


@dataclass(frozen=True)
class Vocab:
    level: Level
    tokens: tuple[str, ...]
    stoi: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.level not in ("char", "word"):
            raise ValueError(f"vocabulary level must be 'char' or 'word', got {self.level!r}")
        if not self.tokens:
            raise ValueError("vocabulary is empty")
        stoi = {t: i for i, t in enumerate(self.tokens)}
        if len(stoi) != len(self.tokens):
            raise ValueError("vocabulary holds duplicate tokens")
        if self.level == "char" and any(len(t) != 1 for t in self.tokens):
            raise ValueError("a char vocabulary holds only single characters")
        object.__setattr__(self, "stoi", stoi)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, level: Level, texts: Iterable[str], *, min_count: int = 1, max_vocab: int = 0) -> "Vocab":
        """Vocabulary over everything seen in `texts`, in a deterministic (sorted) order. Word level
        with `min_count` > 1 or `max_vocab` > 0: only words seen at least min_count times, at most
        the max_vocab most frequent (ties by spelling; the size counts <eos> and <unk>), plus <unk>
        for the rest."""
        if level == "word" and (min_count > 1 or max_vocab > 0):
            counts = Counter(w for text in texts for w in text.split())
            for special in (EOS, UNK):
                counts.pop(special, None)
            words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
            keep = words[:max_vocab - 2] if max_vocab > 0 else words
            return cls(level, tuple(sorted({*keep, EOS, UNK})))
        seen: set[str] = set()
        for text in texts:
            if level == "char":
                seen.update(text)
            else:
                seen.update(text.split())
        if level == "word":
            seen.add(EOS)
        return cls(level, tuple(sorted(seen)))

    def to_dict(self) -> dict:
        return {"level": self.level, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(d["level"], tuple(d["tokens"]))

    # -- properties -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def unk_id(self) -> int | None:
        return self.stoi.get(UNK) if self.level == "word" else None

    @property
    def eot_id(self) -> int | None:
        return self.stoi.get(EOT_CHAR if self.level == "char" else EOT_WORD)

    @property
    def eos_id(self) -> int | None:
        return self.stoi.get(EOS) if self.level == "word" else None

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, *, skip_unknown: bool = False) -> list[int]:
        """A prompt's ids (lstmgen/text.py `encode`: <eos> at each "\\n", unknown words -> <unk>
        when the vocabulary has it). Other unknown symbols raise UnknownTokensError, or with
        `skip_unknown` are dropped."""
        from lstmgen.text import encode  # lstmgen.text imports this module

        return encode(self, text, skip_unknown=skip_unknown).ids.tolist()

    # -- decoding -------------------------------------------------------------------------------
    def piece(self, token_id: int) -> str:
        """The text one token adds to a stream: a char, " word", or "\\n" for <eos>."""
        tok = self.tokens[token_id]
        if self.level == "char":
            return tok
        return "\n" if tok == EOS else " " + tok

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.piece(i) for i in ids)
