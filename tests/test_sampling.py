import numpy as np
import pytest

from lstmgen.serve.params import SamplingParams
from lstmgen.serve.sampling import BatchSampling, apply_top_k, apply_top_p, choose, softmax


def sp(*params):
    return BatchSampling.from_params(list(params))


def test_greedy_rows_take_argmax():
    logits = np.array([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]], np.float32)
    out = choose(logits, sp(SamplingParams(greedy=True), SamplingParams(temperature=0.0)), np.array([0.9, 0.1]))
    assert out.tolist() == [1, 0]


def test_top_k_masks_all_but_k():
    logits = np.array([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]], np.float32)
    out = apply_top_k(logits, np.array([2, 0]))
    assert np.isneginf(out[0]).tolist() == [True, False, False, True]
    assert np.isfinite(out[1]).all()  # k = 0: untouched
    mixed = apply_top_k(logits, np.array([1, 3]))  # different k per row
    assert np.isfinite(mixed[0]).sum() == 1 and np.isfinite(mixed[1]).sum() == 3


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]] * 3)
    out = apply_top_p(probs, np.array([0.6, 0.5, 1.0]))
    assert (out[0] > 0).tolist() == [True, True, False, False]
    assert (out[1] > 0).tolist() == [True, False, False, False]  # 0.5 reached by the first token
    assert (out[2] > 0).all()


def test_sampling_follows_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.7, 0.2, 0.1]], np.float32))
    params = sp(SamplingParams(temperature=1.0))
    draws = [int(choose(logits, params, rng.random(1))[0]) for _ in range(4000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


def test_temperature_sharpens():
    logits = np.log(np.array([[0.6, 0.4]], np.float32))
    cold = softmax(logits * sp(SamplingParams(temperature=0.25)).inv_temperature)
    assert cold[0, 0] > 0.8


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
