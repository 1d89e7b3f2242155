"""The backbone: cached decoding equals the full forward; dtypes; rematerialization; the attention mask."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from medusa_jax.config import ModelConfig
from medusa_jax.model import KVCache, Transformer, attention_mask, causal_mask, init_params

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8
)


@jax.jit(static_argnums=0)
def full_logits(cfg, params, tokens):
    m = Transformer(cfg)
    b, t = tokens.shape
    h, _ = m.apply({"params": params}, tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), causal_mask(t))
    return m.apply({"params": params}, h, method=m.logits)


def test_cache_chunks_equal_full_forward_per_row_offsets():
    params = init_params(CFG, seed=1)
    m = Transformer(CFG)
    apply = jax.jit(m.apply, static_argnames="method")
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 64)
    ref = full_logits(CFG, params, tokens)
    # row 0 prefills 5 tokens, row 1 prefills 8 (right-padded to 8), then both feed the rest in chunks
    lengths = jnp.array([5, 8])
    cache = KVCache.zeros(CFG, 2, 32)
    _, cache = m.apply(
        {"params": params},
        tokens[:, :8],
        jnp.broadcast_to(jnp.arange(8), (2, 8)),
        causal_mask(8),
        cache,
        jnp.zeros(2, jnp.int32),
    )
    pos = lengths[:, None] + jnp.arange(3)[None]
    nxt = jnp.take_along_axis(tokens, pos, axis=1)
    h, cache = apply({"params": params}, nxt, pos, causal_mask(3), cache, lengths)
    got = apply({"params": params}, h, method="logits")
    want = jnp.take_along_axis(ref, pos[..., None], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_and_param_dtypes():
    params = init_params(CFG, seed=2)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 10), 0, 64)
    ref = full_logits(CFG, params, tokens)
    bf = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    got = full_logits(bf, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), tokens)
    mixed = full_logits(CFG.replace(dtype="bfloat16"), params, tokens)  # float32 master weights, bf16 compute
    assert got.dtype == jnp.float32
    # a few bfloat16 roundings (2^-8 = 0.4% each) through 3 layers: measured 0.6% of the scale at the worst logit
    # and 0.5% RMS; another model's logits are off by more than 100%
    scale, rms = float(jnp.abs(ref).max()), float(jnp.sqrt(jnp.mean(ref**2)))
    for out in (got, mixed):
        assert float(jnp.abs(out - ref).max()) < 0.015 * scale
        assert float(jnp.sqrt(jnp.mean((out - ref) ** 2))) < 0.01 * rms
    assert float(jnp.abs(got - ref).max()) > 0  # really computed in bfloat16
    # the inference numerics (bfloat16 weights, float32 activations in two-part matmuls): only the weights' rounding
    weights_only = full_logits(CFG, jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params), tokens)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    inference = full_logits(CFG.for_inference("bfloat16"), bf16, tokens)
    err = float(jnp.abs(inference - weights_only).max())
    assert err < 1e-4 * scale < float(jnp.abs(got - weights_only).max()), err


def test_float32_activations_enter_bfloat16_matmuls_in_two_parts():
    """`matmul` with float32 activations and bfloat16 weights: one bfloat16 pass rounds the activations to 8 mantissa
    bits; the inference numerics' two parts keep ~16, so the sums land within float32 noise of the exact ones."""
    from medusa_jax.model import matmul

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 3, 256)) * rng.uniform(0.1, 10, (5, 3, 1)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(256, 64)), jnp.bfloat16)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    cfg = CFG.for_inference("bfloat16")
    assert (cfg.dtype, cfg.param_dtype, cfg.matmul_dtype, cfg.matmul_passes) == ("float32", "bfloat16", "bfloat16", 2)
    err = {n: np.abs(np.asarray(matmul(cfg.replace(matmul_passes=n), "...e,ef->...f", x, w)) - exact).max()
           for n in (1, 2, 3)}  # fmt: skip
    scale = np.abs(exact).max()
    assert err[1] > 5e-4 * scale  # bfloat16 inputs: ~2^-9 relative per element
    assert err[2] < 2e-5 * scale and err[3] < 2e-6 * scale, err
    # bfloat16 activations go in as they are (one pass)
    xb = x.astype(jnp.bfloat16)
    one = matmul(cfg.replace(matmul_passes=1), "...e,ef->...f", xb, w)
    np.testing.assert_array_equal(np.asarray(matmul(cfg, "...e,ef->...f", xb, w)), np.asarray(one))


def fold_convert_pairs(f, *args):
    """f(*args) evaluated as XLA's `SimplifyFPConversions` (run when excess precision is allowed) rewrites it: a chain
    of float converts that ends in its source's dtype (float32 -> bfloat16 -> float32) is replaced by the source."""
    closed = jax.make_jaxpr(f)(*args)
    env = dict(zip(closed.jaxpr.constvars, closed.consts)) | dict(zip(closed.jaxpr.invars, args))
    source = {}  # a convert's output -> the value its float convert chain started from
    read = lambda v: v.val if isinstance(v, Literal) else env[v]
    for eqn in closed.jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type" and not isinstance(eqn.invars[0], Literal):
            src, out = source.get(eqn.invars[0], eqn.invars[0]), eqn.outvars[0]
            floats = all(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in (src, out))
            if floats and src.aval.dtype == out.aval.dtype:
                env[out] = env[src]
                continue
            if floats:
                source[out] = src
        outs = eqn.primitive.bind(*map(read, eqn.invars), **eqn.primitive.get_bind_params(eqn.params))
        for v, o in zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]):
            env[v] = o
    return [read(v) for v in closed.jaxpr.outvars]


def test_two_part_matmul_survives_convert_pair_folding():
    """The second part of a two-pass matmul is not built from a float32 -> bfloat16 -> float32 convert pair, which
    XLA may fold to a no-op (GPU and CPU, with excess precision allowed: the default), making it zero. Under such
    folding the sums keep the two-pass accuracy, and the compiled program keeps a reduce-precision op and bfloat16
    matmul operands with both parts as rows."""
    from medusa_jax.model import matmul

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 3, 256)) * rng.uniform(0.1, 10, (5, 3, 1)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(256, 64)), jnp.bfloat16)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    cfg = CFG.for_inference("bfloat16")
    f = lambda x, w: matmul(cfg, "...e,ef->...f", x, w)
    (folded,) = fold_convert_pairs(f, x, w)
    err = np.abs(np.asarray(folded) - exact).max() / np.abs(exact).max()
    assert err < 2e-5, err  # one pass (the second part folded to zero): ~1e-3
    hlo = jax.jit(f).lower(x, w).compile().as_text()
    assert "reduce-precision(" in hlo and "exponent_bits=8" in hlo and "mantissa_bits=7" in hlo
    assert re.search(r"bf16\[(30|2,15|2,5,3),256\]", hlo), "the two parts enter one bfloat16 matmul as stacked rows"


def test_inference_numerics_keep_float32_activations_and_cache():
    cfg = CFG.for_inference("bfloat16")
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_params(cfg.replace(param_dtype="float32"), seed=4))
    tokens = jnp.arange(6)[None] % 64
    h, cache = Transformer(cfg).apply({"params": params}, tokens, tokens, causal_mask(6), KVCache.zeros(cfg, 1, 8),
                                      jnp.zeros((1,), jnp.int32))  # fmt: skip
    assert h.dtype == jnp.float32 and cache.k.dtype == jnp.float32
    pure = CFG.for_inference("bfloat16", activations="bfloat16")
    assert KVCache.zeros(pure, 1, 8).k.dtype == jnp.bfloat16 and pure.matmul_dtype == "bfloat16"
    with np.testing.assert_raises_regex(ValueError, "activations must be one of float32, bfloat16, float16"):
        CFG.for_inference("bfloat16", activations="int8")


def test_remat_gives_same_values_and_grads():
    params = init_params(CFG, seed=3)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 0, 64)
    loss = lambda cfg: lambda p: full_logits(cfg, p, tokens).sum()
    g0 = jax.jit(jax.grad(loss(CFG)))(params)
    g1 = jax.jit(jax.grad(loss(CFG.replace(remat=True))))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)


def test_blockwise_attention_reads_only_the_live_blocks():
    """Attention over the cache in blocks of 64 slots (`attend_live`) equals the one-pass attention for a tree step
    at per-row offsets, and never reads past the longest row's live length: NaN in every later slot changes
    nothing (the one-pass attention turns it into NaN); so does the Pallas kernel's (interpreted)."""
    tree = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool)
    starts = jnp.array([100, 37])  # row 0's step ends at slot 104: blocks 0-1 are live, 2-7 are not
    rng = np.random.default_rng(0)
    cache = KVCache(*(jnp.asarray(rng.normal(size=(3, 2, 512, 2, 8)), jnp.float32) for _ in range(2)))
    poisoned = KVCache(cache.k.at[:, :, 128:].set(jnp.nan), cache.v.at[:, :, 128:].set(jnp.nan))
    tokens = jnp.array([[3, 4, 5, 6], [7, 8, 9, 10]])
    pos = starts[:, None] + jnp.array([0, 1, 1, 2])[None]
    params = init_params(CFG, seed=2)

    def run(block, c, kernel="xla"):
        m = Transformer(CFG.replace(attention_block=block, attention_kernel=kernel))
        h, c = jax.jit(m.apply)({"params": params}, tokens, pos, tree, c, starts)
        return np.asarray(h), c

    want, _ = run(0, cache)
    got, new = run(64, poisoned)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    # the TPU kernel's code (`tree_attention`, interpreted here): the prefix by blocks, the tree apart, merged
    fused, fused_cache = run(64, poisoned, "interpret")
    np.testing.assert_allclose(fused, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(fused_cache.k[:, :, :128]), np.asarray(new.k[:, :, :128]), atol=2e-5)
    assert np.isnan(run(0, poisoned)[0]).all()  # the one-pass attention reads every slot
    assert np.isnan(np.asarray(new.k[:, :, 128:])).all()  # (the cache itself is left as it was past the step)
    blocks = CFG.replace(attention_block=512)
    assert blocks.attention_block_for(576) == 288  # the largest divisor up to 512
    assert blocks.attention_block_for(4096) == 512 and blocks.attention_block_for(256) == 0  # one block: one pass
    assert CFG.replace(attention_block=0).attention_block_for(4096) == 0


def test_attention_mask_prefix_and_block():
    tree = jnp.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)  # two children of node 0
    mask = attention_mask(tree, jnp.array([2, 4]), 8)
    assert mask.shape == (2, 3, 8)
    # row 0: slots 0-1 are prefix, the block sits at 2-4, slots 5.. are unseen
    np.testing.assert_array_equal(mask[0, 2], [1, 1, 1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(mask[1, 1], [1, 1, 1, 1, 1, 1, 0, 0])


def test_weights_default_to_bfloat16_on_accelerators_and_float32_on_cpus():
    from medusa_jax.config import default_dtype

    assert default_dtype("cpu")[0] == "float32"
    for backend in ("gpu", "tpu"):
        dtype, why = default_dtype(backend)
        assert dtype == "bfloat16" and "float32 activations and KV cache" in why and backend in why
