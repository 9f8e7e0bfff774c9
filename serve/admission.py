"""A request becomes a Generation: checked, its prompt encoded, its state decoded, its seed set.

Everything here runs on the caller's thread (the event loop, an offline feeder) before the request
reaches the worker, so a bad value is refused at once and never shares a step with anyone.
"""
from __future__ import annotations

import secrets
from dataclasses import replace

import numpy as np

from lstmgen.serve.generation import Draws, Generation
from lstmgen.serve.params import GenerationRequest, RequestLimits, check_bias_ids, encode_prompt, validate
from lstmgen.serve.penalties import TokenHistory
from lstmgen.serve.state_blob import rng_at
from lstmgen.serve.stopping import StopChecker
from lstmgen.vocab import Vocab


def admit(req: GenerationRequest, limits: RequestLimits, vocab: Vocab, sink: object, quiet: bool = False) -> Generation:
    """Raises InvalidRequest naming the field; `sink` receives the output (Stream, CompletionSink)."""
    max_new = validate(req, limits)
    check_bias_ids(req, len(vocab))
    state = req.state
    prompt_ids = encode_prompt(req, vocab)
    if state is not None and (not req.seed_given or req.sampling.seed == state.seed):
        rng = rng_at(state.rng)  # the state's generator goes on where it stopped
        req = replace(req, sampling=replace(req.sampling, seed=state.seed))
    else:
        if not req.seed_given:  # < 2^53: a client reading it as a double (JavaScript) can replay it
            req = replace(req, sampling=replace(req.sampling, seed=secrets.randbits(53)))
        rng = np.random.Generator(np.random.PCG64(req.sampling.seed))
    # Held-back text goes on only in a pure continuation; after new prompt text it belonged to the
    # previous turn, which reported it (Finished.held_text).
    pending = state.pending if state is not None and not prompt_ids else ""
    stopper = StopChecker(max_new, req.stop, vocab.eot_id, pending, hold_at_length=req.return_state)
    history = None
    if state is not None and state.history is not None:
        history = TokenHistory.restore(*state.history, prompt_ids)
    elif req.sampling.has_penalties:
        history = TokenHistory(prompt_ids)
        if state is not None:
            history.add(state.token)  # generated before the state was taken
    gen = Generation(req, prompt_ids, Draws(rng), stopper, sink, history=history,
                     want_state=req.return_state or req.state_every > 0, bias=_bias_arrays(req), quiet=quiet)
    if state is not None:
        if prompt_ids:  # read the state's last token, then the new text, from the state
            gen.prompt_ids, gen.carried, gen.partial = [state.token, *prompt_ids], 1, state.tensors
        else:
            gen.rejoin = (state.token, state.tensors)
    return gen


def _bias_arrays(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray] | None:
    if not req.logit_bias:
        return None
    ids, values = zip(*req.logit_bias)
    return np.array(ids, dtype=np.int64), np.array(values, dtype=np.float32)  # [K], [K]
