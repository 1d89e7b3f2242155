"""Trees sized to the hardware: rank accuracies, the greedy tree growth, the choice against measured costs, and the
calibration file that load() picks up."""

import json
import os

import jax
import numpy as np
import pytest
from test_medusa import random_prompts, tiny_model

from medusa_jax import calibrate
from medusa_jax.lookup import DEFAULT_LOOKUP
from medusa_jax.tree import build_buffers, validate_choices


def test_grow_tree_is_prefix_closed_and_best_first():
    acc = [[0.5, 0.2, 0.1], [0.4, 0.1, 0.05], [0.3, 0.1, 0.0]]
    paths, expected = calibrate.grow_tree(acc, 12)
    assert paths[:5] == [[0], [0, 0], [1], [2], [1, 0]]  # 0.5, 0.2, 0.2, 0.1, 0.08 (ties: path order)
    np.testing.assert_allclose(expected[:4], [1.5, 1.7, 1.9, 2.0])
    for n in range(1, len(paths) + 1):
        validate_choices(paths[:n])  # every prefix of the order is a valid tree
    assert all(b >= a for a, b in zip(expected, expected[1:]))


def test_choose_picks_ar_when_verification_costs_more():
    expected = {0: 1.0, 1: 1.3, 4: 1.6}
    assert calibrate.choose(expected, {0: 1.0, 1: 1.1, 4: 1.2})[0] == 4
    assert calibrate.choose(expected, {0: 1.0, 1: 1.5, 4: 2.0})[0] == 0  # e.g. big batches on a CPU
    near = {0: 1.0, 1: 1.2, 4: 1.5}  # the best tree (1 node) is expected 1.08x AR: within step-cost noise
    assert calibrate.choose(expected, near)[0] == 0 and calibrate.choose(expected, near, min_gain=1.0)[0] == 1


def test_calibrate_end_to_end_and_load_uses_it(tmp_path):
    from medusa_jax.heads_io import save_heads

    m = tiny_model(vocab=16, heads=2, seed=1)
    prompts = random_prompts(3, 16, seed=5)
    acc = calibrate.rank_accuracy(m, prompts, max_new_tokens=12)
    a = np.asarray(acc["acc"])
    assert a.shape == (2, 10) and (a >= 0).all() and (a.sum(1) <= 1 + 1e-6).all()
    assert acc["positions"] == [3 * 11, 3 * 10]  # head h is judged where t >= prompt end - 1 and t + h + 2 exists
    cal = calibrate.calibrate(m, prompts, batch_sizes=(2,), sizes=(1, 3), max_new_tokens=12, lookup=4,
                              log=lambda s: None)  # fmt: skip
    assert set(cal["by_batch"]) == {"2"} and cal["lookup"] == 4
    v = cal["by_batch"]["2"]
    for key in ("step_ms", "step_ms_lookup", "expected_tokens_per_s", "expected_tokens_per_s_lookup"):
        assert set(v[key]) == {"0", "1", "3"} and all(x > 0 for x in v[key].values())
    assert v["tree"] == cal["order"][: v["best_size"]] and v["lookup"] in (0, 4)
    # the expected tokens per step are the real decode loop's, on the calibration's own greedy answers
    for key, chain in (("expected_tokens_per_step", 0), ("expected_tokens_per_step_lookup", 4)):
        tree = build_buffers(cal["order"][:3], topk=10, lookup=chain)
        real = m.generate(prompts, max_new_tokens=12, mode="medusa", tree=tree)
        assert cal[key]["3"] == round(sum(r.new_tokens for r in real) / sum(r.steps for r in real), 4)
    cal["by_batch"]["1"] = dict(v)
    # written beside the heads, it becomes the default tree (per batch size) on this kind of device
    heads_dir = tmp_path / "heads"
    save_heads(jax.tree.map(np.asarray, m.heads), str(heads_dir))
    cal["by_batch"]["1"].update(tree=[[0], [1]], lookup=3)
    cal["by_batch"]["2"].update(tree=[], lookup=0)
    with open(calibrate.calibration_path(str(heads_dir), "float32"), "w") as f:
        json.dump(cal, f)
    assert calibrate.read_calibration(str(heads_dir), "float32") == cal
    m.calibration = cal
    assert m.default_tree(1) == [[0], [1]] and m.default_tree(3) == []
    assert m.default_lookup(1) == 3 and m.default_lookup(3) == DEFAULT_LOOKUP  # forced Medusa without a tree
    del cal["by_batch"]["1"]["lookup"]
    assert m.default_lookup(1) == 0  # a calibration from before the chain measured none
    cal["by_batch"]["1"]["lookup"] = 3
    ar = m.generate(prompts[:2], max_new_tokens=8, mode="ar")
    auto = m.generate(prompts[:2], max_new_tokens=8)  # batch 2: calibrated "no tree" -> AR steps
    assert [r.output_ids for r in auto] == [r.output_ids for r in ar]
    assert [r.steps for r in auto] == [r.steps for r in ar]
    one = m.generate(prompts[:1], max_new_tokens=8)  # batch 1: the calibrated tree and chain
    assert one[0].output_ids == ar[0].output_ids
    same = m.generate(prompts[:1], max_new_tokens=8, tree=build_buffers([[0], [1]], topk=10, lookup=3))
    assert one[0].steps == same[0].steps
    png = str(tmp_path / "c.png")
    assert calibrate.plot(cal, png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_step_costs_compared_over_one_cache_size(monkeypatch):
    """AR, trees and trees with a lookup chain are timed over KV caches of the same number of slots (a deeper tree
    step must not be timed over a bigger cache than the plain step it is compared with): in `calibrate` and in
    `bench.step_costs`."""
    from medusa_jax import bench, medusa_decode

    seen = []
    real = medusa_decode.MedusaLoop

    def spy(tree, max_new, slots, *rest):
        seen.append((tree.depth, slots))
        return real(tree, max_new, slots, *rest)

    monkeypatch.setattr(medusa_decode, "MedusaLoop", spy)  # step_cost's loops (generate's come from api's import)
    m = tiny_model(vocab=16, heads=2, seed=1)
    calibrate.calibrate(m, random_prompts(2, 16, seed=5), batch_sizes=(1,), sizes=(1, 3), max_new_tokens=8,
                        lookup=6, log=lambda s: None)  # fmt: skip
    assert len({d for d, _ in seen}) >= 3 and len({s for _, s in seen}) == 1, seen
    seen.clear()
    bench.step_costs(m, [1], [2, 3], prefix=8, iters=20, repeats=1)
    assert len({d for d, _ in seen}) >= 2 and len({s for _, s in seen}) == 1, seen


def test_bad_calibration_file(tmp_path):
    path = calibrate.calibration_path(str(tmp_path), "float32")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="rerun --calibrate"):
        calibrate.read_calibration(str(tmp_path), "float32")
    os.remove(path)
    assert calibrate.read_calibration(str(tmp_path), "float32") is None
