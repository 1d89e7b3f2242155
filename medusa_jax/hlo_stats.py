"""Hardware-independent proxies for a decode step, read from XLA's compiled program (no device run needed).

`step_stats(cfg, batch, slots)` compiles one AR step (one token per row through every layer, cache update, logits,
argmax) for abstract params and cache (`jax.ShapeDtypeStruct`, so a 7B-shaped model compiles without allocating
it) and reports:
  while_depth   nested while loops (a layer loop inside the decode loop adds one level; on GPU each while
                iteration sends its predicate to the host)
  bytes         bytes accessed per step by XLA's cost analysis, against `param_bytes + cache_bytes` (the least a
                step must read): a step that copies each layer's weights or the whole cache shows a ratio >> 1
  fusions       fused kernels in the compiled program
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from medusa_jax.config import ModelConfig
from medusa_jax.model import KVCache, Transformer, causal_mask

_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE_BODY = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")


def hlo_computations(text: str) -> dict[str, str]:
    """HLO module text -> {computation name: its body text}; the entry computation is also under "ENTRY"."""
    comps: dict[str, str] = {}
    name, lines = None, []
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and name is None:
            name, lines = m.group(1), []
            if line.startswith("ENTRY"):
                comps["ENTRY"] = ""
                entry = name
            continue
        if line.strip() == "}" and name is not None:
            comps[name] = "\n".join(lines)
            name = None
            continue
        if name is not None:
            lines.append(line)
    if "ENTRY" in comps:
        comps["ENTRY"] = comps[entry]
    return comps


def while_depth(text: str) -> int:
    """The deepest nesting of while loops in an HLO module (0: none; 2: a loop inside a loop)."""
    comps = hlo_computations(text)
    calls = {n: set(re.findall(r"(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-]+)", b))
             for n, b in comps.items()}  # fmt: skip
    bodies = {n: set(_WHILE_BODY.findall(b)) for n, b in comps.items()}
    memo: dict[str, int] = {}

    def depth(n: str, seen=()) -> int:
        if n in memo:
            return memo[n]
        if n in seen or n not in comps:
            return 0
        d = 0
        for c in calls[n]:
            d = max(d, depth(c, seen + (n,)) + (c in bodies[n]))
        memo[n] = d
        return d

    return depth("ENTRY")


def cost(compiled) -> dict:
    """`compiled.cost_analysis()` as one dict (older JAX returns a list with one dict per program)."""
    ca = compiled.cost_analysis()
    return ca[0] if isinstance(ca, list | tuple) else dict(ca)


def abstract_params(cfg: ModelConfig):
    """ShapeDtypeStructs of the backbone's params (nothing allocated)."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    init = lambda m: m.logits(m(tokens, tokens, causal_mask(4))[0])
    shapes = jax.eval_shape(lambda k: Transformer(cfg).init(k, method=init)["params"], jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.jnp_param_dtype), shapes)


def nbytes(tree) -> int:
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def ar_step_fn(cfg: ModelConfig):
    """(params, cache, last `[B]`, lengths `[B]`) -> (next token `[B]`, cache): one plain decoding step."""
    model = Transformer(cfg)

    def step(params, cache, last, lengths):
        hidden, cache = model.apply({"params": params}, last[:, None], lengths[:, None], causal_mask(1), cache, lengths)
        logits = model.apply({"params": params}, hidden[:, 0], method=model.logits)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    return step


def step_stats(cfg: ModelConfig, batch: int = 1, slots: int = 1024) -> dict:
    """Compile one AR step for abstract params and cache and read the proxies (see the module docstring)."""
    params = abstract_params(cfg)
    cache_shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(*(jax.ShapeDtypeStruct(cache_shape, cfg.jnp_dtype) for _ in range(2)))
    vec = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = jax.jit(ar_step_fn(cfg), donate_argnums=(1,)).lower(params, cache, vec, vec).compile()
    text = compiled.as_text()
    c = cost(compiled)
    p_bytes, c_bytes = nbytes(params), nbytes(cache)
    return {
        "while_depth": while_depth(text),
        "fusions": len(re.findall(r"\bfusion\(", text)),
        "bytes_accessed": float(c.get("bytes accessed", 0.0)),
        "flops": float(c.get("flops", 0.0)),
        "param_bytes": p_bytes,
        "cache_bytes": c_bytes,
        "bytes_ratio": float(c.get("bytes accessed", 0.0)) / (p_bytes + c_bytes),
    }
