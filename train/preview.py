"""A short sample from the model being trained (`lstmgen train --sample-every N`), as char-rnn and
nanoGPT print one, so a person watching sees the text take shape.

The sample draws from its own seeded generator with the model in eval mode (no dropout), so it
takes nothing from the training RNG: a run with samples trains, and resumes, exactly as one without.
"""
from __future__ import annotations

import torch

from lstmgen.train.model import RecurrentLM
from lstmgen.vocab import EOS, Vocab

TOKENS = {"char": 160, "word": 40}  # a few lines of text at either level
TEMPERATURE = 0.8


def _start_token(vocab: Vocab) -> int:
    """Start where a line starts: after a newline (<eos> for words), else from the first token."""
    return vocab.stoi.get("\n" if vocab.level == "char" else EOS, 0)


def printable(text: str) -> str:
    """Control characters (the end-of-text mark, ...) as escapes, so a sample cannot upset a terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


@torch.no_grad()
def sample_text(model: RecurrentLM, vocab: Vocab, *, seed: int, tokens: int | None = None,
                temperature: float = TEMPERATURE) -> str:
    """`tokens` tokens sampled from `model` with temperature, decoded to text."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        state = model.init_state(1, device)
        x = torch.tensor([[_start_token(vocab)]], device=device)  # [T=1, B=1]
        ids = []
        for _ in range(tokens or TOKENS[vocab.level]):
            logits, state = model(x, state)  # [1, 1, V]
            probs = torch.softmax(logits[-1, 0].float().cpu() / temperature, dim=-1)  # [V]
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            ids.append(nxt)
            x = torch.tensor([[nxt]], device=device)
    finally:
        model.train(was_training)
    return printable(vocab.decode(ids))
