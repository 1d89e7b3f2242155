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
    cal = calibrate.calibrate(m, prompts, batch_sizes=(2,), sizes=(1, 3), max_new_tokens=12, lookup=4, confirm_gain=0, repeats=1,
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

    monkeypatch.setattr(medusa_decode, "MedusaLoop", spy)  # step_timer's loops (generate's come from api's import)
    m = tiny_model(vocab=16, heads=2, seed=1)
    calibrate.calibrate(m, random_prompts(2, 16, seed=5), batch_sizes=(1,), sizes=(1, 3), max_new_tokens=8,
                        lookup=6, log=lambda s: None, confirm_gain=0, repeats=1)  # fmt: skip
    assert len({d for d, _ in seen}) >= 3 and len({s for _, s in seen}) == 1, seen
    seen.clear()
    bench.step_costs(m, [1], [2, 3], prefix=8, iters=2, repeats=1)
    assert len({d for d, _ in seen}) >= 2 and len({s for _, s in seen}) == 1, seen


def burst_timers(monkeypatch, burst: int):
    """Replace `calibrate.step_timer` by fakes that log their calls; the first `burst` measurements (a burst of load
    on a shared machine) take 10 s per step, every later one 1 s."""
    calls = []

    def fake(model, prompt_ids, batch, tree, heads, iters=8, *, slots):
        key = (batch, tree.num_nodes, heads is None)

        def run():
            calls.append(key)
            return 10.0 if len(calls) <= burst else 1.0

        return run

    monkeypatch.setattr(calibrate, "step_timer", fake)
    return calls


def test_step_cost_repeats_go_round_robin(monkeypatch):
    """A burst of load that spans two measurements moves no median: the repeats alternate between the options
    (timed one after the other, one option's three repeats would all fall in a three-measurement burst)."""
    calls = burst_timers(monkeypatch, burst=2)
    ar, tree = build_buffers([], topk=1), build_buffers([[0], [1]], topk=2)
    cost = calibrate.step_costs(None, [1, 2], 1, {"ar": (ar, None), "tree": (tree, "heads")}, repeats=3, slots=64)
    assert cost == {"ar": 1.0, "tree": 1.0}
    assert [c[2] for c in calls] == [True, False] * 3
    calls.clear()
    m = tiny_model(vocab=16, heads=2, seed=1)
    cal = calibrate.calibrate(m, random_prompts(2, 16, seed=5), batch_sizes=(1, 2), sizes=(1, 3), max_new_tokens=8,
                              lookup=0, log=lambda s: None, confirm_gain=0)  # fmt: skip
    assert cal["repeats"] == 3 and len(calls) == 3 * 2 * 3  # 3 options (AR, 1 and 3 nodes) x 2 batch sizes x 3
    for key in set(calls):  # no option measured twice in a row
        at = [i for i, c in enumerate(calls) if c == key]
        assert len(at) == 3 and min(b - a for a, b in zip(at, at[1:])) > 1, (key, calls)
    assert all(v["step_ms"] == {"0": 1000.0, "1": 1000.0, "3": 1000.0} for v in cal["by_batch"].values())


def test_a_pick_that_decodes_slower_end_to_end_falls_back_to_ar(monkeypatch):
    """The step costs make a tree look cheap (fake timers: every step 1 s); `confirm` then decodes the prompts with
    it and with AR, and the tree is kept only if it is at least CONFIRM_GAIN times as fast end to end."""
    from medusa_jax import timing

    burst_timers(monkeypatch, burst=0)
    m = tiny_model(vocab=16, heads=2, seed=1)
    prompts = random_prompts(2, 16, seed=5)
    kw = dict(batch_sizes=(1,), sizes=(1, 3), max_new_tokens=8, lookup=0, log=lambda s: None)
    real = timing.run_ours_interleaved
    seen = []

    def spy(model, rows, configs, max_new, batch_size, repeats):
        out, per, last = real(model, rows, configs, max_new, batch_size, repeats)
        seen.append(({k: c[0] for k, c in configs.items()}, len(rows), batch_size, last))
        return out, per, last

    monkeypatch.setattr(timing, "run_ours_interleaved", spy)
    cal = calibrate.calibrate(m, prompts, confirm_gain=1e-6, **kw)  # any measured speed keeps the tree
    v = cal["by_batch"]["1"]
    assert v["best_size"] > 0 and v["confirmed"]["kept"], v
    assert v["confirmed"]["ratio"] == pytest.approx(
        v["confirmed"]["tree_tokens_per_s"] / v["confirmed"]["ar_tokens_per_s"], rel=0.01
    )
    ((modes, n_rows, b, last),) = seen
    assert modes == {"ar": "ar", "tree": "medusa"} and n_rows == 4 and b == 1
    assert [r.output_ids for r in last["tree"]] == [r.output_ids for r in last["ar"]]  # the same decode, faster or not
    assert sum(r.steps for r in last["tree"]) < sum(r.steps for r in last["ar"])  # the tree really ran
    cal = calibrate.calibrate(m, prompts, confirm_gain=1e6, **kw)  # nothing is that much faster: AR
    v = cal["by_batch"]["1"]
    assert v["confirmed"]["kept"] is False and v["tree"] == [] and v["best_size"] == 0 and v["lookup"] == 0
    m.calibration = cal
    assert m.plan(1).mode == "ar"


def test_bad_calibration_file(tmp_path):
    path = calibrate.calibration_path(str(tmp_path), "float32")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="rerun --calibrate"):
        calibrate.read_calibration(str(tmp_path), "float32")
    os.remove(path)
    assert calibrate.read_calibration(str(tmp_path), "float32") is None
