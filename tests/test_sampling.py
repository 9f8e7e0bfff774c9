import numpy as np
import pytest

from lstmgen.serve.params import SamplingParams
from lstmgen.serve.sampling import BatchSampling, choose, unnormalised_probs


def sp(*params):
    return BatchSampling.from_params(list(params))


def test_greedy_rows_take_argmax():
    logits = np.array([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]], np.float32)
    out = choose(logits, sp(SamplingParams(greedy=True), SamplingParams(temperature=0.0)), np.array([0.9, 0.1]))
    assert out.tolist() == [1, 0]


def test_top_k_keeps_only_the_k_most_likely():
    logits = np.array([[1.0, 4.0, 3.0, 2.0]] * 2, np.float32)
    params = sp(SamplingParams(top_k=2), SamplingParams(top_k=1))
    seen = {0: set(), 1: set()}
    for u in np.linspace(0, 0.999, 50):
        out = choose(logits, params, np.array([u, u]))
        seen[0].add(int(out[0]))
        seen[1].add(int(out[1]))
    assert seen == {0: {1, 2}, 1: {1}}


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 3, np.float32))
    params = sp(SamplingParams(top_p=0.6), SamplingParams(top_p=0.5), SamplingParams(top_p=1.0))
    seen = [set(), set(), set()]
    for u in np.linspace(0, 0.999, 200):
        for r, tok in enumerate(choose(logits, params, np.full(3, u))):
            seen[r].add(int(tok))
    assert seen == [{0, 1}, {0}, {0, 1, 2, 3}]  # 0.5 is reached by the first token alone


def test_sampling_follows_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.7, 0.2, 0.1]], np.float32))
    params = sp(SamplingParams(temperature=1.0))
    draws = [int(choose(logits, params, rng.random(1))[0]) for _ in range(4000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


def test_temperature_sharpens():
    logits = np.log(np.array([[0.6, 0.4]], np.float32))
    w = unnormalised_probs(logits, sp(SamplingParams(temperature=0.25)).inv_temperature)  # [B]
    assert w[0, 0] / w[0].sum() > 0.8


@pytest.mark.parametrize("vocab", [7, 500])
def test_row_result_independent_of_batch(vocab):
    """A row's token depends only on its logits and uniform, not on its neighbours."""
    rng = np.random.default_rng(1)
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.9), SamplingParams(greedy=True),
              SamplingParams(temperature=1.3, top_k=3, top_p=0.8)]
    logits = rng.normal(size=(len(params), vocab)).astype(np.float32)
    uniforms = rng.random(len(params))
    together = choose(logits, sp(*params), uniforms)
    alone = [int(choose(logits[i:i + 1], sp(p), uniforms[i:i + 1])[0]) for i, p in enumerate(params)]
    assert together.tolist() == alone
