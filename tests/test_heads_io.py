"""Tests for medusa_jax.heads_io: reference-layout Medusa heads (safetensors and .pt), round trips, validation,
refusing pickled code, and Medusa-2 full checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import medusa_jax
from medusa_jax.api import MedusaModel
from medusa_jax.checkpoint import CheckpointError
from medusa_jax.config import ModelConfig
from medusa_jax.heads import HeadsConfig, base_lm_head, heads_config_of, heads_logits, init_heads
from medusa_jax.heads_io import (
    heads_from_tensors,
    heads_to_tensors,
    load_heads,
    read_full_medusa2,
    read_heads,
    save_heads,
)
from medusa_jax.model import init_params

torch = pytest.importorskip("torch")
nn = torch.nn
from safetensors.torch import load_file as torch_load_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

E, V = 32, 128


# --- Test oracle -------------------------------------------------------------------------------------
# `ResBlock` as in FasterDecoding/Medusa, medusa/model/medusa_model.py (Apache-2.0), docstrings trimmed.
class ResBlock(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        torch.nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def torch_heads(num_heads, num_layers, shared, hidden=E, vocab=V, seed=0):
    """The reference's `medusa_head` ModuleList (v2 / shared: no projection), with random weights."""
    torch.manual_seed(seed)
    heads = nn.ModuleList(
        [
            nn.Sequential(
                *[ResBlock(hidden) for _ in range(num_layers)],
                *([] if shared else [nn.Linear(hidden, vocab, bias=False)]),
            )
            for _ in range(num_heads)
        ]
    )
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.3)
    return heads


def torch_logits(heads, hidden, lm_head=None):
    """[K, ..., V] logits of the torch heads; `lm_head` `[E, V]` (numpy) for shared heads."""
    x = torch.from_numpy(np.asarray(hidden))
    with torch.no_grad():
        outs = [h(x) for h in heads]
        if lm_head is not None:
            w = torch.from_numpy(np.array(lm_head, np.float32))
            outs = [o @ w for o in outs]
    return torch.stack(outs).numpy()


def write_heads_dir(path, heads, fmt, config):
    os.makedirs(path, exist_ok=True)
    state = {k: v.contiguous() for k, v in heads.state_dict().items()}
    file = os.path.join(path, f"medusa_lm_head.{fmt}")
    if fmt == "safetensors":
        torch_save_file(state, file)
    else:
        torch.save(state, file)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return file


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
    )
    return MedusaModel(cfg, init_params(cfg, seed=0))


def jax_leaves(tree):
    return jax.tree.leaves(tree)


def random_hidden(seed=1, shape=(2, 3, E)):
    return np.random.default_rng(seed).normal(0.0, 1.0, shape).astype(np.float32)


# --- reading the reference layout --------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("shared", [False, True], ids=["proj", "v2"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_reference_heads_match_torch(tmp_path, model, fmt, shared, num_layers):
    heads = torch_heads(4, num_layers, shared, seed=num_layers)
    config = {"medusa_num_heads": 4, "medusa_num_layers": num_layers, "base_model_name_or_path": "tiny"}
    if shared:
        config["version"] = "2"
    file = write_heads_dir(tmp_path / "heads", heads, fmt, config)

    params = load_heads(str(tmp_path / "heads"), model)
    assert heads_config_of(params) == HeadsConfig(4, num_layers, shared)
    assert all(a.dtype == jnp.float32 for a in jax_leaves(params))
    hidden = random_hidden()
    lm = base_lm_head(model.params)
    ours = np.asarray(heads_logits(params, jnp.asarray(hidden), lm))
    ref = torch_logits(heads, hidden, lm if shared else None)
    assert ours.shape == (4, 2, 3, V)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)

    # the file itself reads the same, with the directory's config as meta
    direct, meta = read_heads(file)
    for a, b in zip(jax_leaves(direct), jax_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta["num_heads"] == 4 and meta["num_layers"] == num_layers
    assert meta["base_model_name_or_path"] == "tiny"
    assert meta["version"] == ("2" if shared else None)
    assert meta["shared_lm_head"] is shared


def test_config_head_count_disagrees_file_wins(tmp_path, model):
    heads = torch_heads(4, 1, shared=False)
    write_heads_dir(tmp_path, heads, "safetensors", {"medusa_num_heads": 5, "medusa_num_layers": 1})
    with pytest.warns(UserWarning, match="medusa_num_heads=5"):
        params, meta = read_heads(str(tmp_path))
    assert meta["num_heads"] == 4
    assert heads_config_of(params).num_heads == 4
    with pytest.warns(UserWarning, match="medusa_num_heads"):
        assert load_heads(str(tmp_path), model)["blocks"]["kernel"].shape[0] == 4


def test_heads_from_tensors_prefix_and_errors():
    heads = torch_heads(2, 1, shared=False)
    named = {f"medusa_head.{k}": v.numpy() for k, v in heads.state_dict().items()}
    named["model.norm.weight"] = np.ones(E, np.float32)
    params = heads_from_tensors(named, prefix="medusa_head.")
    assert heads_config_of(params) == HeadsConfig(2, 1, False)
    np.testing.assert_array_equal(params["proj"]["kernel"][1], heads[1][1].weight.detach().numpy().T)

    partial = {k: v for k, v in named.items() if k != "medusa_head.1.1.weight"}
    with pytest.raises(CheckpointError, match="only some Medusa heads have a projection"):
        heads_from_tensors(partial, prefix="medusa_head.")
    no_bias = {k: v for k, v in named.items() if k != "medusa_head.0.0.linear.bias"}
    with pytest.raises(CheckpointError, match=r"0\.0\.linear\.bias"):
        heads_from_tensors(no_bias, prefix="medusa_head.")
    with pytest.raises(CheckpointError, match="no Medusa head tensors"):
        heads_from_tensors({"model.norm.weight": np.ones(E, np.float32)})


# --- writing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True], ids=["proj", "v2"])
def test_save_read_round_trip_and_torch_strict_load(tmp_path, model, shared):
    params = init_heads(HeadsConfig(3, 2, shared), model.params, seed=3, scale=0.2)
    out = tmp_path / "saved"
    save_heads(params, str(out), base_model_name_or_path="tiny-llama", extra_config={"note": "test"})
    assert sorted(os.listdir(out)) == ["config.json", "medusa_lm_head.safetensors"]
    mode = lambda name: (out / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("medusa_lm_head.safetensors") == mode("config.json")  # readable like any file, not 0600
    config = json.loads((out / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["medusa_num_layers"] == 2
    assert config["base_model_name_or_path"] == "tiny-llama" and config["note"] == "test"
    assert config.get("version") == ("2" if shared else None)

    back, meta = read_heads(str(out))
    assert meta["num_heads"] == 3 and meta["num_layers"] == 2 and meta["base_model_name_or_path"] == "tiny-llama"
    assert sorted(back) == sorted(params)
    for a, b in zip(jax_leaves(back), jax_leaves(params)):
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # the reference module loads the file strictly and computes the same logits
    ref = torch_heads(3, 2, shared)
    ref.load_state_dict(torch_load_file(str(out / "medusa_lm_head.safetensors")), strict=True)
    hidden = random_hidden(seed=4)
    lm = base_lm_head(model.params)
    np.testing.assert_allclose(
        np.asarray(heads_logits(params, jnp.asarray(hidden), lm)),
        torch_logits(ref, hidden, lm if shared else None),
        atol=1e-5,
        rtol=0,
    )


def test_root_token_heads_round_trip(tmp_path, model):
    """root_token heads (our extension) write `{i}.root.weight` and a config flag, and read back the same; their
    logits depend on the root embedding, which they require."""
    from medusa_jax.heads import root_embedding

    params = init_heads(HeadsConfig(2, 1, True, root_token=True), model.params, seed=5, scale=0.2)
    save_heads(params, str(tmp_path / "r"))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["medusa_root_token"] is True
    back, meta = read_heads(str(tmp_path / "r"))
    assert meta["root_token"] and heads_config_of(back) == HeadsConfig(2, 1, True, True)
    np.testing.assert_array_equal(back["root"]["kernel"], np.asarray(params["root"]["kernel"]))
    save_heads(params, str(tmp_path / "half"), dtype="float16")  # half the bytes, loaded back in float32
    half = load_heads(str(tmp_path / "half"), model)
    assert half["root"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(half["root"]["kernel"], params["root"]["kernel"], rtol=1e-3, atol=1e-4)
    hidden, lm = jnp.asarray(random_hidden(seed=6, shape=(3, E))), base_lm_head(model.params)
    a, b = (
        heads_logits(back, hidden, lm, root_emb=root_embedding(model.params, jnp.array(r))) for r in ([1] * 3, [2] * 3)
    )
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    with pytest.raises(ValueError, match="root_emb"):
        heads_logits(back, hidden, lm)
    torn = {k: v for k, v in heads_to_tensors(back).items() if k != "1.root.weight"}
    with pytest.raises(CheckpointError, match="root.weight for every head"):
        heads_from_tensors(torn)


def test_sequential_heads_round_trip(tmp_path, model):
    """Sequential heads write `{i}.path.{j}.weight` (j < i) and a config flag, and read back the same; a path weight
    for j >= i is refused."""
    params = init_heads(HeadsConfig(3, 1, True, sequential=True), model.params, seed=5, scale=0.2)
    save_heads(params, str(tmp_path / "s"))
    assert json.loads((tmp_path / "s" / "config.json").read_text())["medusa_sequential"] is True
    back, meta = read_heads(str(tmp_path / "s"))
    assert meta["sequential"] and heads_config_of(back) == HeadsConfig(3, 1, True, True, True)
    kept = np.tril(np.ones((3, 2)), -1)[:, :, None, None]  # what a head uses: j < i
    np.testing.assert_array_equal(back["path"]["kernel"], np.asarray(params["path"]["kernel"]) * kept)
    tensors = heads_to_tensors(back)
    assert sorted(k for k in tensors if ".path." in k) == ["1.path.0.weight", "2.path.0.weight", "2.path.1.weight"]
    tensors["1.path.1.weight"] = tensors["2.path.1.weight"]
    with pytest.raises(CheckpointError, match="j < i"):
        heads_from_tensors(tensors)


def test_save_is_atomic(tmp_path, model, monkeypatch):
    out = tmp_path / "saved"
    old = init_heads(HeadsConfig(2, 1), model.params, seed=0, scale=0.1)
    save_heads(old, str(out))
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_heads(init_heads(HeadsConfig(4, 1), model.params, seed=1, scale=0.1), str(out))
    with pytest.raises(OSError, match="disk full"):
        save_heads(old, str(tmp_path / "fresh"))
    monkeypatch.undo()
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # untouched, no temp files left
    assert sorted(os.listdir(tmp_path)) == ["saved"]

    save_heads(init_heads(HeadsConfig(4, 1), model.params, seed=1, scale=0.1), str(out))  # overwrite works
    assert read_heads(str(out))[1]["num_heads"] == 4
    assert sorted(os.listdir(out)) == ["config.json", "medusa_lm_head.safetensors"]


# --- validation --------------------------------------------------------------------------------------
def test_hidden_size_mismatch(tmp_path, model):
    write_heads_dir(
        tmp_path, torch_heads(2, 1, False, hidden=48), "safetensors", {"base_model_name_or_path": "other/model"}
    )
    with pytest.raises(CheckpointError, match=r"hidden size 48 but the model has 32.*other/model"):
        load_heads(str(tmp_path), model)


def test_vocab_mismatch(tmp_path, model):
    write_heads_dir(tmp_path, torch_heads(2, 1, False, vocab=100), "safetensors", {})
    with pytest.raises(CheckpointError, match=r"vocabulary of 100 but the model has 128"):
        load_heads(str(tmp_path), model)


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_object_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    file = tmp_path / "medusa_lm_head.pt"
    torch.save({"0.0.linear.weight": evil, "0.0.linear.bias": torch.zeros(E)}, str(file))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="never executed"):
        read_heads(str(file))
    assert not marker.exists()


def test_pt_that_is_not_a_state_dict(tmp_path):
    file = tmp_path / "medusa_lm_head.pt"
    torch.save([torch.zeros(3)], str(file))
    with pytest.raises(CheckpointError, match="state dict"):
        read_heads(str(file))


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_safetensors(tmp_path, keep):
    file = write_heads_dir(tmp_path, torch_heads(2, 1, False), "safetensors", {})
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[: max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="cannot read"):
        read_heads(str(tmp_path))


def test_missing_heads(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="medusa_lm_head"):
        read_heads(str(tmp_path))


# --- Medusa-2 full checkpoints -------------------------------------------------------------------------
def test_medusa2_full_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    ckpt = tmp_path / "medusa2"
    llama.save_pretrained(str(ckpt), safe_serialization=True)

    # shard 1: the backbone as saved; shard 2: the Medusa heads, with an index naming both
    index_path = ckpt / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        os.replace(ckpt / "model.safetensors", ckpt / "model-00001-of-00002.safetensors")
        names = torch_load_file(str(ckpt / "model-00001-of-00002.safetensors"))
        index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}
    heads = torch_heads(3, 1, shared=False, seed=5)
    head_state = {f"medusa_head.{k}": v.contiguous() for k, v in heads.state_dict().items()}
    torch_save_file(head_state, str(ckpt / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update({n: "model-00002-of-00002.safetensors" for n in head_state})
    index_path.write_text(json.dumps(index))

    m = medusa_jax.load(str(ckpt), tokenizer=False)
    assert m.heads is not None and m.heads_config == HeadsConfig(3, 1, False)
    tokens = np.array([[1, 5, 9, 17, 33], [2, 4, 8, 16, 32]], np.int32)
    out = m.forward(tokens)
    assert out.medusa_logits.shape == (3, 2, 5, V)
    with torch.no_grad():
        hidden = llama.model(input_ids=torch.from_numpy(tokens).long()).last_hidden_state
    ref = torch_logits(heads, hidden.numpy())
    np.testing.assert_allclose(np.asarray(out.medusa_logits), ref, atol=1e-4, rtol=1e-4)

    cfg, backbone, h2 = read_full_medusa2(str(ckpt))
    assert cfg.hidden_size == E and "embed" in backbone
    np.testing.assert_array_equal(h2["proj"]["kernel"], np.asarray(m.heads["proj"]["kernel"]))
    params, meta = read_heads(str(ckpt))  # the directory also works as a heads path
    assert meta["num_heads"] == 3
    np.testing.assert_array_equal(params["blocks"]["kernel"], h2["blocks"]["kernel"])

    # explicit heads win over the embedded ones; a plain checkpoint has none
    save_heads(init_heads(HeadsConfig(2, 1), m.params, scale=0.1), str(tmp_path / "other"))
    assert medusa_jax.load(str(ckpt), tokenizer=False, heads=str(tmp_path / "other")).heads_config.num_heads == 2
    llama.save_pretrained(str(tmp_path / "plain"), safe_serialization=True)
    with pytest.raises(CheckpointError, match="not a Medusa-2"):
        read_full_medusa2(str(tmp_path / "plain"))
    assert medusa_jax.load(str(tmp_path / "plain"), tokenizer=False).heads is None
