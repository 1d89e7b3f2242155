"""Sampling filters match Hugging Face's `generate` (temperature, then top-k, then top-p), ties included."""

from __future__ import annotations

import numpy as np
import pytest

from medusa_jax.sampling import SamplingParams, process_logits

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

CASES = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8), (1.3, 8, 0.6), (0.5, 3, 0.9), (1.0, 1, 0.5), (2.0, 40, 0.3)]


def hf_process(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The warpers HF's `generate` builds for these knobs, in its order."""
    procs = lp.LogitsProcessorList()
    if temperature != 1.0:
        procs.append(lp.TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(lp.TopPLogitsWarper(top_p))
    return procs(torch.zeros((logits.shape[0], 1), dtype=torch.long), torch.from_numpy(logits)).numpy()


def ours(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    return np.asarray(process_logits(logits, SamplingParams.make(temperature, top_k, top_p)))


@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_matches_hf_on_random_logits(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 3, (32, 64)).astype(np.float32)
    want, got = hf_process(logits, temperature, top_k, top_p), ours(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_matches_hf_with_ties(temperature, top_k, top_p):
    """Logits from 5 values: top-k keeps every tie of the k-th logit (as HF does); at the top-p cutoff HF's order
    among equal logits is its sort's, so the kept logits are compared as a multiset (equal counts, equal values)."""
    logits = np.random.default_rng(1).integers(0, 5, (64, 24)).astype(np.float32)
    want, got = hf_process(logits, temperature, top_k, top_p), ours(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1))
    if top_k and top_p == 1.0:  # every tie of the k-th logit stays, so some rows keep more than k
        kept = np.isfinite(got).sum(-1)
        assert (kept >= min(top_k, 24)).all() and (kept > top_k).any()


def test_top_p_after_top_k():
    """top_k=2 leaves .4/.3 -> .57/.43, and top_p=.5 keeps the first only; with an exact tie at the k-th logit
    (.4/.3/.3) top-k keeps both .3s (HF keeps ties) and top-p then keeps two tokens, the lower id of the tie."""
    logits = np.log(np.array([[0.4, 0.3, 0.29], [0.4, 0.3, 0.3]], np.float32))
    got = np.isfinite(ours(logits, 1.0, 2, 0.5))
    assert got.tolist() == [[True, False, False], [True, True, False]]
    want = np.isfinite(hf_process(logits, 1.0, 2, 0.5))
    assert (got.sum(-1) == want.sum(-1)).all()
    # top-k alone keeps the tie (3 tokens for k=2), top-p alone on .4/.3/.29 keeps 2
    assert np.isfinite(ours(logits, 1.0, 2, 1.0)).sum(-1).tolist() == [2, 3]
    assert np.isfinite(ours(logits, 1.0, 0, 0.5)).sum(-1).tolist() == [2, 2]


def test_no_filter_skips_the_sort_with_the_same_logits():
    """Without top-k and top-p the filters drop nothing, so the sort is skipped (statically) with equal results."""
    import jax

    logits = np.random.default_rng(2).integers(0, 5, (8, 24)).astype(np.float32)
    off = SamplingParams.make(0.7)
    assert (
        not off.filtered and SamplingParams.make(0.7, top_k=3).filtered and SamplingParams.make(0.7, top_p=0.9).filtered
    )
    sorted_anyway = off.replace(filtered=True)
    np.testing.assert_array_equal(process_logits(logits, off), process_logits(logits, sorted_anyway))
    jaxpr = lambda sp: str(jax.make_jaxpr(lambda x: process_logits(x, sp))(logits))
    assert "sort" not in jaxpr(off) and "sort" in jaxpr(sorted_anyway)
