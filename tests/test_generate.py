"""Generation with SmolLM2 (float32): greedy output equals HF transformers' `generate` token for token, at batch 1
and in one batch of mixed lengths; sampling, EOS, length limits and cache checks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

NUM_PROMPTS = 4
MAX_NEW = 64
SHORT_ANSWER = "What is 2+2?"  # SmolLM2 answers in about a dozen tokens, then EOS
LONG_ANSWER = "Write an essay about data security."


def trim_after_eos(ids: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


@pytest.fixture(scope="module")
def prompts(dev_prompts) -> list[str]:
    return dev_prompts[:NUM_PROMPTS]


@pytest.fixture(scope="module")
def hf_reference(prompts, smollm2, hf_smollm2) -> list[list[int]]:
    """HF greedy new tokens for each prompt, run at batch 1, trimmed after the first EOS."""
    hf_model, _ = hf_smollm2
    refs = []
    for p in prompts:
        ids = torch.tensor([smollm2.encode(p)])
        with torch.no_grad():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=MAX_NEW,
                pad_token_id=smollm2.eos_ids[0],
            )
        refs.append(trim_after_eos(out[0, ids.shape[1] :].tolist(), smollm2.eos_ids))
    return refs


def check_against_reference(results, refs, eos):
    assert len(results) == len(refs)
    for n, (r, ref) in enumerate(zip(results, refs)):
        assert r.output_ids == ref, f"prompt {n}: first difference at token {_first_diff(r.output_ids, ref)}"
        assert r.new_tokens == len(r.output_ids)
        assert r.steps == r.new_tokens  # plain decoding: the root-only loop, one forward and one token per step
        assert len(r.output_ids) == MAX_NEW or r.output_ids[-1] in eos


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_chat_template_matches_hf(smollm2, hf_smollm2, prompts):
    _, hf_tok = hf_smollm2
    for p in prompts[:3]:
        ids = hf_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        assert smollm2.encode(p) == list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_greedy_matches_hf_batch1(smollm2, prompts, hf_reference):
    results = [smollm2.generate(p, max_new_tokens=MAX_NEW, mode="ar")[0] for p in prompts]
    check_against_reference(results, hf_reference, smollm2.eos_ids)


def test_greedy_matches_hf_one_mixed_batch(smollm2, prompts, hf_reference):
    lengths = {len(smollm2.encode(p)) for p in prompts}
    assert len(lengths) > 1  # really mixed lengths
    results = smollm2.generate(prompts, max_new_tokens=MAX_NEW, mode="ar", batch_size=len(prompts))
    assert len({r.seconds for r in results}) == 1  # one batch
    check_against_reference(results, hf_reference, smollm2.eos_ids)
    assert [r.text for r in results] == [
        smollm2.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in results
    ]


def test_per_sequence_eos_stop(smollm2):
    eos = smollm2.eos_ids
    short, long_ = smollm2.generate([SHORT_ANSWER, LONG_ANSWER], max_new_tokens=MAX_NEW, mode="ar")
    assert short.output_ids[-1] in eos and short.new_tokens < MAX_NEW, "precondition: the short answer ends early"
    assert not any(t in eos for t in short.output_ids[:-1])
    assert short.new_tokens == len(short.output_ids) and short.steps == short.new_tokens
    # the other row keeps going after the first one stopped
    assert long_.new_tokens == MAX_NEW == len(long_.output_ids) and not any(t in eos for t in long_.output_ids)
    assert long_.steps == MAX_NEW
    # and each row is what it would be alone
    assert smollm2.generate(SHORT_ANSWER, max_new_tokens=MAX_NEW)[0].output_ids == short.output_ids


@pytest.mark.parametrize("max_new", [1, 5, 20])
def test_max_new_tokens_respected(smollm2, max_new):
    (r,) = smollm2.generate(LONG_ANSWER, max_new_tokens=max_new, mode="ar")
    assert r.new_tokens == len(r.output_ids) == max_new
    assert r.steps == max_new
    full = smollm2.generate(LONG_ANSWER, max_new_tokens=32, mode="ar")[0].output_ids
    assert r.output_ids == full[:max_new]


def test_sampling_deterministic_per_seed(smollm2):
    kw = dict(max_new_tokens=24, temperature=1.0, mode="ar")
    a = smollm2.generate(LONG_ANSWER, seed=1, **kw)[0].output_ids
    b = smollm2.generate(LONG_ANSWER, seed=1, **kw)[0].output_ids
    c = smollm2.generate(LONG_ANSWER, seed=2, **kw)[0].output_ids
    assert a == b
    assert a != c


def test_top_k_1_equals_greedy(smollm2):
    greedy = smollm2.generate(LONG_ANSWER, max_new_tokens=24, mode="ar")[0].output_ids
    sampled = smollm2.generate(LONG_ANSWER, max_new_tokens=24, temperature=1.0, top_k=1, seed=7, mode="ar")
    assert sampled[0].output_ids == greedy


def test_prompt_too_long_for_cache(smollm2):
    too_long = [1] * (smollm2.max_cache - 10)
    with pytest.raises(ValueError, match=r"cache positions.*shorten the prompt or lower max_new_tokens"):
        smollm2.generate(too_long, max_new_tokens=64, mode="ar")
    with pytest.raises(ValueError, match=str(smollm2.max_cache)):
        smollm2.check_fits(smollm2.max_cache, 1)
