"""Decoding on a device mesh (8 simulated CPU devices): greedy tokens equal the one-device run for plain and Medusa
decoding at batch 8 on meshes 1x8, 2x4 and 8x1 (and batch 1 on 2x4), sampling (rejection, typical) draws the same
tokens, a two-turn conversation reuses its sharded cache, and the bfloat16 default keeps greedy Medusa equal to greedy
plain decoding; SmolLM2 with its shipped heads (`mc_sim_7b_63` + lookup 10) gives the one-device tokens on a mesh."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import xla_env

TINY = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from medusa_jax.api import MedusaModel, place
    from medusa_jax.config import ModelConfig
    from medusa_jax.heads import HeadsConfig, init_heads
    from medusa_jax.model import init_params
    from medusa_jax.session import Session
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                      head_dim=4, tie_word_embeddings=True, max_position_embeddings=512,
                      attention_block=64)  # attention over the cache blockwise (the bf16 runs: in one pass)
    params = jax.tree.map(lambda a: a * 8 if a.ndim >= 2 else a, init_params(cfg, 1))
    model = MedusaModel(cfg, params, heads=init_heads(HeadsConfig(4, 1), params, seed=1, scale=0.3))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 64, size=int(rng.integers(3, 20))).tolist() for _ in range(8)]
    medusa = dict(mode="medusa", tree="cpu_16", lookup=4)
    runs = {"ar": dict(mode="ar"), "medusa": medusa, "rejection": dict(medusa, temperature=0.8, seed=5),
            "typical": dict(medusa, temperature=0.8, seed=5, acceptance="typical"),
            "ar-sample": dict(mode="ar", temperature=0.8, top_k=20, top_p=0.9, seed=5)}

    def run(m, full):
        out = {}
        for name, kw in runs.items():
            if name in ("typical", "ar-sample", "rejection") and not full:
                continue
            b8 = m.generate(prompts, max_new_tokens=24, batch_size=8, **kw)
            out[name] = [r.output_ids for r in b8] + [r.steps for r in b8]
        if full:
            out["medusa-b1"] = m.generate(prompts[:1], max_new_tokens=24, batch_size=1, **medusa)[0].output_ids
            chat = Session(m, mode="medusa", tree="cpu_16", lookup=4)
            first = [t for c in chat.stream_ids(prompts[0], 16) for t in c]
            second = [t for c in chat.stream_ids(chat.ids + prompts[1], 16) for t in c]
            out["chat"] = [first, second, chat.last_reused]
        return out

    res = {"one": run(model, True)}
    for mesh in ("1x8", "2x4", "8x1"):
        m = place(model, mesh)
        res[mesh] = run(m, mesh == "2x4")
        res[mesh + "-q"] = list(m.params["layers"]["attn"]["q_proj"]["kernel"].sharding.spec)
    # the TPU attention kernel's code (Pallas, run by XLA here) under shard_map, rows and kv heads split (2x4)
    for mesh in ("2x4",):
        kern = place(MedusaModel(cfg.replace(attention_kernel="interpret"), params, heads=model.heads), mesh)
        res["kernel-" + mesh] = {k: [r.output_ids for r in kern.generate(prompts, max_new_tokens=24, batch_size=8, **kw)]
                                 for k, kw in (("ar", dict(mode="ar")), ("medusa", medusa))}
    # the bfloat16 default (bf16 weights, float32 activations and cache) on a mesh: greedy Medusa == plain decoding
    bf = MedusaModel(cfg.for_inference("bfloat16").replace(attention_block=0), jax.tree.map(lambda a: a.astype("bfloat16"), params),
                     heads=jax.tree.map(lambda a: a.astype("bfloat16"), model.heads))
    bf = place(bf, "2x4")
    res["bf16"] = {k: [r.output_ids for r in bf.generate(prompts, max_new_tokens=24, batch_size=8, **kw)]
                   for k, kw in (("ar", dict(mode="ar")), ("medusa", medusa))}
    # a feature drafter: its K/V cache in the loop's carry, split by rows
    from medusa_jax.feature_drafter import init_feature_drafter
    fmodel = MedusaModel(cfg, params, heads=init_feature_drafter(params, seed=2, scale=0.3))
    fgen = lambda m: [[r.output_ids, r.steps] for r in m.generate(prompts, max_new_tokens=24, batch_size=8, **medusa)]
    res["feature"] = {"one": fgen(fmodel), "2x4": fgen(place(fmodel, "2x4"))}
    print("RESULT " + json.dumps(res))
    """
)

SMOLLM2 = textwrap.dedent(
    """
    import json, sys
    import jax
    import medusa_jax
    prompts, new = json.loads(sys.argv[1]), int(sys.argv[2])
    medusa = dict(mode="medusa", tree="mc_sim_7b_63", lookup=10)
    one = medusa_jax.load(dtype="float32")
    res = {"ar": [r.output_ids for r in one.generate(prompts, max_new_tokens=new, mode="ar")]}
    m = medusa_jax.load(dtype="float32", mesh="2x4")
    got = m.generate(prompts, max_new_tokens=new, **medusa)
    res["mesh"] = [r.output_ids for r in got]
    res["steps"] = [r.steps for r in got]
    spec = lambda x: list(x.sharding.spec)
    res["specs"] = {"up": spec(m.params["layers"]["mlp"]["up_proj"]["kernel"]), "q": spec(m.params["layers"]["attn"]
                    ["q_proj"]["kernel"]), "embed": spec(m.params["embed"]["embedding"]),
                    "proj": spec(m.heads["proj"]["kernel"]) if "proj" in m.heads else spec(m.heads["draft"]["kernel"])}
    print("RESULT " + json.dumps(res))
    """
)


def run_worker(tmp_path, source: str, *args: str, timeout: int = 900) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(source)
    env = xla_env(8)
    out = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.mark.parametrize("mesh", ["1x8", "2x4", "8x1"])
def test_tokens_on_a_mesh_equal_one_device(tiny_runs, mesh):
    """Greedy plain and Medusa decoding on every mesh; batch 1, rejection and typical acceptance, top-k/top-p
    sampling and a two-turn conversation on 2x4 (rows over data and heads over tensor at once)."""
    one, got = tiny_runs["one"], tiny_runs[mesh]
    assert len(got) >= 2
    for name in got:
        assert got[name] == one[name], (mesh, name)
    assert one["medusa"][:8] == one["ar"][:8]  # greedy Medusa is lossless (the premise)
    assert sum(one["medusa"][8:]) < 0.9 * sum(one["ar"][8:])  # and really ran its tree
    assert one["chat"][2] > len(one["chat"][0])  # the second turn reused the first turn's cache


def test_feature_drafter_on_a_mesh_equals_one_device(tiny_runs):
    got = tiny_runs["feature"]
    assert got["2x4"] == got["one"]  # tokens and steps
    assert [out for out, _ in got["one"]] == tiny_runs["one"]["ar"][:8]  # greedy: the base model's tokens


def test_attention_kernel_on_a_mesh_gives_the_same_tokens(tiny_runs):
    """The Pallas attention kernel (interpreted on the CPU) per shard: plain and Medusa tokens of the XLA path."""
    got, one = tiny_runs["kernel-2x4"], tiny_runs["one"]
    assert got["ar"] == one["ar"][:8] and got["medusa"] == one["medusa"][:8]


def test_heads_that_divide_the_model_axis_are_split(tiny_runs):
    assert tiny_runs["1x8-q"] == [None, None, "tensor"]  # 8 heads over 8 devices
    assert tiny_runs["2x4-q"] == [None, None, "tensor"]
    assert tiny_runs["8x1-q"] in ([], [None, None, None])


def test_smollm2_on_a_mesh_equals_one_device(tmp_path, dev_prompts):
    res = run_worker(tmp_path, SMOLLM2, json.dumps(dev_prompts[:2]), "16")
    assert res["mesh"] == res["ar"]  # 2x4 Medusa (float32) == one-device plain decoding, at batch 2
    assert sum(res["steps"]) < 0.75 * sum(len(a) for a in res["ar"])
    # SmolLM2's 9 query heads stay whole on 4 devices; MLP, vocabulary and the heads' projection are split
    assert res["specs"]["q"] in ([], [None, None, None])
    assert res["specs"]["up"] == [None, None, "tensor"]
    assert "tensor" in res["specs"]["embed"] and "tensor" in res["specs"]["proj"]


def test_bfloat16_default_keeps_its_parity_on_a_mesh(tiny_runs):
    assert tiny_runs["bf16"]["medusa"] == tiny_runs["bf16"]["ar"]
