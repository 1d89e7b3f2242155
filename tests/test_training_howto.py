"""docs/TRAINING.md's how-to, run as written on a tiny random Llama directory that has the embedded model's tokenizer:
HF model dir -> self-distillation data -> Medusa-1 -> Medusa-2 -> decode.py --ckpt RUN_DIR -> bench --calibrate ->
decode.py with the calibrated heads. Each command runs in this process (through its `main`), with small sizes
appended; the tiny-config round trip at the end of the how-to runs too."""

from __future__ import annotations

import functools
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "TRAINING.md"
SMALL = {  # appended to each kind of command: tiny sizes
    "distill": ["--num-prompts", "3", "--max-new-tokens", "8", "--batch-size", "4"],
    "medusa1": ["train.steps=2", "train.save_every=2", "train.eval_every=0", "train.log_every=1", "data.max_len=48",
                "train.batch_tokens=16", "heads.num_heads=2"],
    "medusa2": ["train.steps=2", "train.save_every=2", "train.eval_every=0", "train.log_every=1", "data.max_len=48",
                "train.batch_size=2", "heads.num_heads=2", "train.heads_warmup_steps=1", "lora.rank=2"],
    "tiny": ["train.steps=2", "train.save_every=2"],
    "decode": ["--max-new-tokens", "4"],
    "bench": ["--num-prompts", "2", "--max-new-tokens", "8", "--batch-sizes", "1"],
}  # fmt: skip


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def commands(block: str, env: dict) -> list[list[str]]:
    out = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            for k, v in env.items():
                line = line.replace(f"${k}", v)
            out.append(shlex.split(line))
    return out


def write_tiny_model(path: Path) -> None:
    """A random 1-layer Llama in the Hugging Face layout (config.json, model.safetensors) with SmolLM2's tokenizer."""
    from safetensors.numpy import save_file

    from medusa_jax.checkpoint import default_gguf
    from medusa_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(default_gguf())
    v, e, f, h, kv, d = len(tok), 32, 64, 2, 1, 16
    path.mkdir()
    config = dict(model_type="llama", vocab_size=v, hidden_size=e, intermediate_size=f, num_hidden_layers=1,
                  num_attention_heads=h, num_key_value_heads=kv, head_dim=d, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,),
              "model.layers.0.self_attn.q_proj.weight": (h * d, e), "model.layers.0.self_attn.k_proj.weight": (kv * d, e),
              "model.layers.0.self_attn.v_proj.weight": (kv * d, e), "model.layers.0.self_attn.o_proj.weight": (e, h * d),
              "model.layers.0.mlp.gate_proj.weight": (f, e), "model.layers.0.mlp.up_proj.weight": (f, e),
              "model.layers.0.mlp.down_proj.weight": (e, f), "model.layers.0.input_layernorm.weight": (e,),
              "model.layers.0.post_attention_layernorm.weight": (e,)}  # fmt: skip
    tensors = {n: (np.ones(s) if len(s) == 1 else 0.2 * rng.standard_normal(s)).astype(np.float32)
               for n, s in shapes.items()}  # fmt: skip
    save_file(tensors, str(path / "model.safetensors"))
    tok.save_pretrained(str(path))


def run_command(argv: list[str], capsys) -> str:
    """Runs one documented command through its entry point; returns its stdout."""
    import decode
    import train
    from medusa_jax import bench
    from medusa_jax.train import distill

    if argv[:3] == ["python", "-m", "medusa_jax.train.distill"]:
        rc = distill.main(argv[3:] + SMALL["distill"])
    elif argv[:2] == ["python", "train.py"]:
        kind = "tiny" if "configs/tiny.yaml" in argv else "medusa2" if "medusa2" in " ".join(argv) else "medusa1"
        rc = train.main(["--no-progress", *argv[2:], *SMALL[kind]])
    elif argv[:2] == ["python", "decode.py"]:
        rc = decode.main(argv[2:] + SMALL["decode"])
    elif argv[:3] == ["python", "-m", "medusa_jax.bench"]:
        rc = bench.main(argv[3:] + SMALL["bench"])
    else:
        raise AssertionError(f"an undocumented kind of command: {argv}")
    out = capsys.readouterr().out
    assert rc in (0, None), (argv, out)
    return out


def test_training_howto_runs_as_written(tmp_path, monkeypatch, capsys):
    from medusa_jax import calibrate

    sys.path.insert(0, str(REPO))
    monkeypatch.chdir(REPO)  # the commands name configs/*.yaml relative to the repository
    monkeypatch.setattr(calibrate, "calibrate", functools.partial(calibrate.calibrate, sizes=(1, 2), lookup=2))
    model = tmp_path / "model"
    write_tiny_model(model)
    prompts = ["Name a color.", "Say hi.", "Count to three.", "Why is the sky blue?"]
    (tmp_path / "train_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:3]))
    (tmp_path / "dev_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[2:]))
    env = {"MODEL": str(model), "PROMPTS": str(tmp_path / "train_prompts.jsonl"), "DEV": str(tmp_path / "dev_prompts.jsonl"),
           "OUT": str(tmp_path / "runs")}  # fmt: skip
    blocks = bash_blocks()
    steps, tiny = commands(blocks[1], env), commands(blocks[2], env)
    assert [c[1] if c[1] != "-m" else c[2] for c in steps] == ["medusa_jax.train.distill"] * 2 + ["train.py"] * 2 + [
        "decode.py", "medusa_jax.bench", "decode.py"]  # fmt: skip
    outputs = [run_command(c, capsys) for c in steps + tiny]
    runs = tmp_path / "runs"
    assert (runs / "medusa2" / "tokenizer" / "tokenizer.json").exists()
    assert (runs / "tiny" / "tokenizer" / "tokenizer.json").exists()
    assert list((runs / "medusa2" / "export").glob("calibration-*.json"))
    for n in (4, 6, 8):  # the three decode.py runs: a run dir, the calibrated heads, the tiny run dir
        assert re.search(r"^1 prompts, 4 new tokens in .*\((ar|medusa)\)$", outputs[n], re.M), outputs[n]
