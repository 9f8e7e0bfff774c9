"""The sampling controls and log-probabilities through the real server (ONNX Runtime, gRPC)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lstmgen_client import Client

MIXED = [dict(temperature=0.8, top_p=0.9), dict(temperature=0.8, top_k=40), dict(min_p=0.1),
         dict(temperature=0.7, top_k=5, top_p=0.8, min_p=0.05), dict(repetition_penalty=1.3),
         dict(frequency_penalty=0.8, presence_penalty=0.4), dict(greedy=True, repetition_penalty=1.5),
         dict(temperature=1e-30)]


@pytest.fixture
def client(char_server):
    with Client(char_server.target) as c:
        yield c


def test_every_control_is_reproducible_alone_and_in_a_mixed_batch(char_server):
    """Per-row seeded sampling: the same request and seed give the same text whatever shares the batch."""
    from concurrent.futures import ThreadPoolExecutor

    with Client(char_server.target) as c:
        alone = [c.generate("First", max_new_tokens=40, seed=7 + i, **kw).text for i, kw in enumerate(MIXED)]
        with ThreadPoolExecutor(len(MIXED) * 2) as pool:
            futures = [pool.submit(c.generate, "First", max_new_tokens=40, seed=7 + i % len(MIXED),
                                   **MIXED[i % len(MIXED)]) for i in range(2 * len(MIXED))]
            together = [f.result().text for f in futures]
    assert together == alone + alone


def test_tiny_temperature_decodes_greedily(client):
    greedy = client.generate("First", max_new_tokens=30, greedy=True).text
    assert client.generate("First", max_new_tokens=30, temperature=1e-40, seed=3).text == greedy
    assert client.generate("First", max_new_tokens=30, temperature=5e-5, seed=4).text == greedy


def test_repetition_penalty_changes_greedy_text_and_penalises_repeats(client):
    plain = client.generate("First", max_new_tokens=60, greedy=True).text
    penalised = client.generate("First", max_new_tokens=60, greedy=True, repetition_penalty=5.0).text
    assert penalised != plain
    # with a strong penalty, greedy decoding cycles through many more distinct symbols
    assert len(set(penalised)) > len(set(plain))


def test_logprobs_are_the_model_log_softmax(client):
    r = client.generate("First", max_new_tokens=25, seed=5, temperature=0.8, top_k=10, logprobs=True,
                        top_logprobs=10)
    assert len(r.logprobs) == r.finished.generated_tokens == 25
    assert "".join(lp.text for lp in r.logprobs) == r.text
    for lp in r.logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 10
        tops = [t.logprob for t in lp.top]
        assert tops == sorted(tops, reverse=True) and math.fsum(math.exp(t) for t in tops) <= 1 + 1e-5
        # a chosen token among the alternatives carries the same log-probability
        same = [t for t in lp.top if t.token_id == lp.token_id]
        assert not same or abs(same[0].logprob - lp.logprob) < 1e-5
        # top_k=10 sampling never picks a token outside the model's 10 most likely
        assert same and lp.logprob >= tops[-1] - 1e-6
    greedy = client.generate("First", max_new_tokens=10, greedy=True, logprobs=True, top_logprobs=1)
    for lp in greedy.logprobs:  # greedy takes the most likely token, so it heads the list
        assert lp.top[0].token_id == lp.token_id


def test_logprobs_match_an_offline_log_softmax(bundles, char_server):
    """The first token's reported log-probability equals log-softmax of the prompt graph's logits."""
    from lstmgen.serve.engine import Engine, EngineConfig

    engine = Engine(bundles["char"], EngineConfig(device="cpu"))
    ids = engine.manifest.vocab.encode("First")
    logits, _ = engine.prefill(np.array([ids]), np.array([len(ids)]), engine.zeros(1))
    x = logits[0].astype(np.float64)
    want = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    with Client(char_server.target) as c:
        r = c.generate("First", max_new_tokens=1, seed=11, logprobs=True, top_logprobs=3)
    lp = r.logprobs[0]
    assert abs(lp.logprob - want[lp.token_id]) < 1e-4
    assert [t.token_id for t in lp.top] == list(np.argsort(-want, kind="stable")[:3])
    # the penalties rewrite the step's logits in place: the reported figures stay the model's
    with Client(char_server.target) as c:
        r = c.generate("First", max_new_tokens=1, seed=11, logprobs=True, top_logprobs=3, repetition_penalty=5.0,
                       frequency_penalty=2.0)
    lp = r.logprobs[0]
    assert abs(lp.logprob - want[lp.token_id]) < 1e-4
    assert [t.token_id for t in lp.top] == list(np.argsort(-want, kind="stable")[:3])


def test_model_info_reports_sampling_limits(client):
    lim = client.model_info().limits
    assert lim.max_top_logprobs == 20 and 0 < lim.min_temperature < 1e-3
