"""The user-facing object: `medusa_jax.load(ckpt)` -> `MedusaModel` with `forward` and `generate`."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from medusa_jax import checkpoint, shard_load
from medusa_jax.config import ModelConfig, check_numerics, default_dtype
from medusa_jax.feature_drafter import is_feature
from medusa_jax.generation import bucket
from medusa_jax.heads import (
    HeadsConfig,
    attach_draft_vocab,
    base_lm_head,
    heads_logits,
    is_sequential,
    root_embedding,
    sequence_path,
    sequence_roots,
    uses_root,
)
from medusa_jax.lookup import DEFAULT_LOOKUP
from medusa_jax.medusa_decode import MedusaLoop, Thresholds, generate_medusa
from medusa_jax.model import Transformer, causal_mask
from medusa_jax.options import GenerateOptions, batch_key
from medusa_jax.plan import DecodePlan, plan_decoding
from medusa_jax.sampling import SamplingParams
from medusa_jax.sharding import inference_mesh, param_shardings, replicated, shard_global, to_host


@dataclasses.dataclass
class ForwardResult:
    logits: jax.Array  # [B, T, V] float32
    medusa_logits: jax.Array | None  # [K, B, T, V] float32, or None without heads (and for a feature drafter)
    hidden: jax.Array  # [B, T, E]


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]  # new tokens, including the EOS token when one was generated
    text: str
    new_tokens: int
    steps: int  # forward passes after the prefill
    seconds: float  # wall time of the batch this prompt ran in

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / max(self.steps, 1)


@dataclasses.dataclass(eq=False)
class MedusaModel:
    """A backbone (plus optional Medusa heads) with its tokenizer. Params are plain pytrees in `.params` and
    `.heads`; everything here is a thin host-side wrapper over jitted pure functions. Build one with `load()`."""

    cfg: ModelConfig
    params: dict  # the backbone's params pytree (adapters already merged)
    tokenizer: object | None = None  # a transformers tokenizer, or None (prompts as token ids)
    heads: dict | None = None  # the Medusa heads' params pytree (with "draft" when a draft vocabulary is attached)
    name: str = ""
    tree: list | None = None  # the heads' own default tree (`tree.json` beside them): a list of paths
    calibration: dict | None = None  # the tree per batch size measured for this device and dtype (`calibrate`)
    train_config: str | None = None  # the resolved training config (YAML) of a run directory
    max_cache: int = 0  # cache positions a conversation may use (0: the model's context length)
    mesh: Mesh | None = None  # the decoding mesh the params and heads are sharded over (None: one device)

    def __post_init__(self):
        if not self.max_cache:
            self.max_cache = self.cfg.max_position_embeddings

    @property
    def heads_config(self) -> HeadsConfig | None:
        from medusa_jax.heads import heads_config_of

        return None if self.heads is None else heads_config_of(self.heads)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.cfg.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.add(int(tok_eos))
        return tuple(sorted(ids))

    # ------------------------------------------------------------------ forward
    def forward(self, token_ids) -> ForwardResult:
        """Full causal forward without cache. token_ids `[B, T]` ints -> base logits `[B, T, V]`, head logits
        `[K, B, T, V]` (None without heads; root_token heads at t see token t+1, at the last position the base
        argmax), final hidden states `[B, T, E]`."""
        tokens = np.asarray(token_ids, np.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        t = tokens.shape[1]  # padded to a bucketed length (one compile per bucket); causal: padding changes nothing
        padded = np.pad(tokens, ((0, 0), (0, bucket(t, 16) - t)))
        logits, medusa, hidden = _forward(self.cfg, self.params, self.heads, *self.host_inputs(padded, np.int32(t)))
        return ForwardResult(logits[:, :t], None if medusa is None else medusa[:, :, :t], hidden[:, :t])

    # ------------------------------------------------------------------ generate
    def encode(self, prompt, raw: bool = False) -> list[int]:
        from medusa_jax.tokenizer import encode_prompt

        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            ids = encode_prompt(self.tokenizer, prompt, raw)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        return ids

    def generate(
        self,
        prompts: str | Sequence,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        mode: str | None = None,
        raw: bool = False,
        batch_size: int | None = None,
        max_memory: int | None = None,
        **medusa_kw,
    ) -> list[GenerationResult]:
        """Generate for each prompt (a string, or a list of token ids). Returns one result per prompt, in order.

        mode: "ar" or "medusa" (default: "medusa" when heads are loaded, except for batch sizes whose calibrated
        tree is empty, where verification costs more than it gains). Prompts run in batches of up to `batch_size`
        (default 16) whose KV cache and temporaries fit `max_memory` bytes (default: half the available memory, see
        `medusa_jax.memory`); with more prompts than one batch, prompts of similar length share a batch.
        Sampling (T > 0): batch j draws from `fold_in(PRNGKey(seed), j)`, so calls with different seeds share no
        random stream; the same prompts, batch_size and seed give the same output. Bad options raise ValueError."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int | np.integer)):
            prompts = [prompts]
        if not len(prompts):
            raise ValueError("no prompts: give at least one prompt (a string or a list of token ids)")
        GenerateOptions.from_kwargs(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed, batch_size=batch_size, **medusa_kw)  # fmt: skip
        if mode not in (None, "ar", "medusa"):
            raise ValueError(f"mode must be 'ar' or 'medusa', got {mode!r}")
        if mode == "medusa" and self.heads is None:
            raise ValueError("mode='medusa' needs Medusa heads: load(ckpt, heads=PATH)")
        encoded = [self.encode(p, raw) for p in prompts]
        # more prompts than one batch: batch them by length (less padding in prefill, cache and attention)
        run_mode = mode or ("medusa" if self.heads is not None else "ar")
        batches = self.plan_batches(encoded, max_new_tokens, run_mode, batch_size, max_memory, medusa_kw)
        rows = self.batch_rows(encoded, batches, max_new_tokens, run_mode, max_memory, medusa_kw)
        order = [j for idx in batches for j in idx] if len(batches) > 1 else None
        if order is not None:
            encoded = [encoded[j] for j in order]
        th = Thresholds(
            jnp.float32(medusa_kw.get("posterior_threshold", 0.09)), jnp.float32(medusa_kw.get("posterior_alpha", 0.3))
        )
        results = []
        i = 0
        for j, (size, n_rows) in enumerate(zip(map(len, batches), rows)):
            chunk, i = encoded[i : i + size], i + size
            plan = self.plan(n_rows, mode=mode, temperature=temperature, **medusa_kw)
            if plan.mode == "ar" and mode is None and self.calibration is not None and self.heads is not None:
                _warn_unused(medusa_kw, n_rows)
            results += self._generate_batch(
                chunk, max_new_tokens, temperature, top_p, top_k, batch_key(seed, j), plan, th, n_rows
            )
        if order is not None:
            results = [r for _, r in sorted(zip(order, results), key=lambda t: t[0])]
        return results

    def plan(self, batch: int, mode: str | None = None, temperature: float = 0.0, **medusa_kw) -> DecodePlan:
        """The decode plan (mode, tree, acceptance and why) for a batch of `batch` rows: `medusa_jax.plan`."""
        kw = {k: medusa_kw[k] for k in ("tree", "lookup", "acceptance", "topk") if k in medusa_kw}
        return plan_decoding(self, batch, mode=mode, greedy=temperature == 0.0, **kw)

    def plan_batches(self, encoded, max_new, mode, batch_size=None, max_memory=None, medusa_kw=None):
        """Prompt indices per batch, in run order: up to `batch_size` (default 16) prompts whose KV cache and
        temporaries (`memory.batch_bytes`) fit `max_memory` bytes (default `memory.default_budget()`)."""
        from medusa_jax import memory

        fits = self._fits(max_new, mode, max_memory, medusa_kw)
        return memory.plan_batches([len(e) for e in encoded], batch_size or 16, fits)

    def batch_rows(self, encoded, batches, max_new, mode, max_memory=None, medusa_kw=None) -> list[int]:
        """The rows each batch of `plan_batches` runs with: a smaller batch (the trailing one) is padded to the
        smallest larger batch size of the call that still fits the memory budget, so it reuses that compiled loop."""
        fits = self._fits(max_new, mode, max_memory, medusa_kw)
        sizes = sorted({len(b) for b in batches})
        rows = []
        for b in batches:
            longest = max(len(encoded[j]) for j in b)
            rows.append(next((n for n in sizes if n > len(b) and fits(n, longest)), len(b)))
        return rows

    def _fits(self, max_new, mode, max_memory=None, medusa_kw=None):
        """(batch, longest prompt) -> whether its KV cache and temporaries (`memory.batch_bytes`) fit `max_memory`
        bytes (default `memory.default_budget()`)."""
        from medusa_jax import memory

        kw = medusa_kw or {}
        budget = max_memory or memory.default_budget()
        nodes: dict[int, int] = {}

        def fits(b: int, longest: int) -> bool:
            if b not in nodes:
                nodes[b] = self._tree_nodes(b, kw) if mode == "medusa" else 1
            extra = nodes[b] + 1 if mode == "medusa" else 0
            slots = self.check_fits(longest, max_new, extra=extra)
            return memory.batch_bytes(self.cfg, b, bucket(longest), slots, nodes[b]) <= budget

        return fits

    def _tree_nodes(self, batch: int, kw: dict) -> int:
        """The nodes of the tree a Medusa batch of this size runs (as `generate` picks it)."""
        from medusa_jax.medusa_decode import resolve_tree

        if "tree" in kw:
            tree, lookup = kw["tree"], kw.get("lookup")
        else:
            tree, lookup = self.default_tree(batch) or None, kw.get("lookup", self.default_lookup(batch))
        tree = tree if tree is not None else self.tree
        try:
            return resolve_tree(tree, self.heads_config.num_heads, kw.get("topk", 10), lookup).num_nodes
        except ValueError:
            return 1  # a bad tree: the batch run reports it (after its other checks)

    def default_tree(self, batch: int):
        """The tree used when none is named: the calibrated one for this batch size, else the heads' `tree.json`,
        else the built-in default for the backend (None)."""
        if self.calibration is not None:
            from medusa_jax.calibrate import tree_for_batch

            return tree_for_batch(self.calibration, batch)
        return self.tree

    def default_lookup(self, batch: int) -> int:
        """The lookup chain's length when no tree is named: the calibrated one with the calibrated tree for this batch
        size (0 in calibrations made before the chain existed), else `DEFAULT_LOOKUP` with the default tree."""
        if self.calibration is not None and self.default_tree(batch):
            from medusa_jax.calibrate import lookup_for_batch

            return lookup_for_batch(self.calibration, batch)
        return DEFAULT_LOOKUP

    def check_fits(self, prompt_len: int, max_new_tokens: int, extra: int = 0) -> int:
        """The cache slots a batch needs; raises ValueError when it cannot fit the model's context."""
        slots = -(-(bucket(prompt_len) + bucket(max_new_tokens, 16) + extra) // 64) * 64  # a multiple of 64
        need = prompt_len + max_new_tokens + extra
        if need > self.max_cache:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) needs {need} cache positions, "
                f"more than the model's {self.max_cache}: shorten the prompt or lower max_new_tokens"
            )
        return slots

    def host_inputs(self, *arrays):
        """Host arrays -> device arrays: replicated over the mesh (each process places its own devices' copies,
        from the same host data), or on the default device without a mesh."""
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        return tuple(shard_global([np.asarray(a) for a in arrays], [replicated(self.mesh)] * len(arrays)))

    def _generate_batch(self, encoded, max_new, temperature, top_p, top_k, rng, plan: DecodePlan, th, rows=None):
        """Decode the prompts `encoded` as one batch of `rows` (default: one per prompt). Padding rows hold a
        one-token prompt with no new tokens allowed: done from the start, they write nothing, and rows never
        attend to each other; their results are dropped."""
        b = len(encoded)
        n_rows = max(rows or b, b)
        lengths = np.ones(n_rows, np.int32)
        lengths[:b] = [len(e) for e in encoded]
        p_len = bucket(int(lengths.max()))
        tokens = np.zeros((n_rows, p_len), np.int32)
        for r, e in enumerate(encoded):
            tokens[r, : len(e)] = e
        row_max_new = np.zeros(n_rows, np.int32)
        row_max_new[:b] = max_new
        greedy = temperature == 0.0
        sp = SamplingParams.make(temperature if not greedy else 1.0, top_k, top_p)
        out_len = bucket(max_new, 16)
        t0 = time.perf_counter()
        extra = plan.tree.num_nodes + 1 if plan.mode == "medusa" else 0  # room for one tree beyond the output
        slots = self.check_fits(int(lengths.max()), max_new, extra=extra)
        loop = MedusaLoop(plan.tree, out_len, slots, plan.acceptance, self.eos_ids, self.mesh)
        heads = self.heads if plan.mode == "medusa" else None  # plain decoding: the root-only loop, no heads
        out, num_out, steps = generate_medusa(
            self.cfg, loop, self.params, heads, *self.host_inputs(tokens, lengths, row_max_new), sp, th, rng
        )
        out, num_out, steps = (to_host(x) for x in (out, num_out, steps))
        seconds = time.perf_counter() - t0
        results = []
        for r in range(b):
            ids = [int(t) for t in out[r, : num_out[r]]]
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
            results.append(GenerationResult(list(encoded[r]), ids, text, len(ids), int(steps[r]), seconds))
        return results


def _warn_unused(medusa_kw: dict, batch: int) -> None:
    """Medusa options given while the calibration runs plain decoding: say that they do not apply."""
    if medusa_kw:
        import warnings

        warnings.warn(
            f"{', '.join(sorted(medusa_kw))} not used: this device's calibration picks plain decoding at batch {batch}; "
            "pass mode='medusa' to use them",
            stacklevel=3,
        )


@jax.jit(static_argnums=(0,))
def _forward(cfg, params, heads, tokens, length):
    """tokens `[B, T]` of which the first `length` (a scalar) are real -> logits `[B, T, V]`, head logits
    `[K, B, T, V]` (or None), hidden `[B, T, E]`; what follows `length` is padding's."""
    model = Transformer(cfg)
    b, t = tokens.shape
    hidden, _ = model.apply({"params": params}, tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), causal_mask(t))
    logits = model.apply({"params": params}, hidden, method=model.logits)
    medusa = None
    if heads is not None and not is_feature(heads):  # root_token heads see the next input token (the base argmax)
        root_emb = None
        if uses_root(heads):
            last = jax.lax.dynamic_slice_in_dim(logits, length - 1, 1, axis=1)  # [B, 1, V]
            roots = jnp.where(jnp.arange(t) < length - 1, sequence_roots(tokens, logits), jnp.argmax(last, axis=-1))
            root_emb = root_embedding(params, roots.astype(tokens.dtype))
        path_emb = None  # sequential heads: teacher-forced on the input's own tokens t+2 ..
        if is_sequential(heads):
            path_emb = root_embedding(params, sequence_path(tokens, heads["blocks"]["kernel"].shape[0]))
        medusa = heads_logits(heads, hidden, base_lm_head(params), root_emb=root_emb, path_emb=path_emb)
    return logits, medusa, hidden


def _load_tokenizer(path: str):
    """The checkpoint's tokenizer; None (said once on stderr) for a model directory without tokenizer files, so the
    backbone still loads and only text prompts fail (`encode`)."""
    from medusa_jax.tokenizer import has_tokenizer_files, load_tokenizer

    if os.path.isdir(path) and not has_tokenizer_files(path):
        print(f"note: {path} has no tokenizer files: loaded the model without a tokenizer (prompts must be token "
              "ids; copy the tokenizer files into the directory to use text)", file=sys.stderr, flush=True)  # fmt: skip
        return None
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as e:
        msg = " ".join(str(e).split())[:300]
        raise checkpoint.CheckpointError(
            f"cannot read the tokenizer of {path}: {msg}; fix its tokenizer files or load with tokenizer=False"
        ) from e


SHIPPED_HEADS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "head_sets")
DEFAULT_HEADS = "smollm2_medusa1"  # trained for the embedded default model; used when no heads are named


def shipped_heads(name: str) -> str | None:
    """The directory of a head set shipped in the package (`medusa_jax/head_sets/NAME`), or None."""
    path = os.path.join(SHIPPED_HEADS_DIR, name)
    return path if os.path.exists(os.path.join(path, "config.json")) else None


def load(
    ckpt: str | None = None,
    dtype: str | None = None,
    activations: str | None = None,
    heads: str | bool | None = None,
    tokenizer: bool = True,
    draft_vocab: bool | int = True,
    scan_unroll: int = 1,
    mesh=None,
) -> MedusaModel:
    """Load a backbone (and optional Medusa heads).

    ckpt: a Hugging Face model directory (config.json + safetensors), a `.gguf` file, a hub id (`org/name`), a
    training run directory (or one step's checkpoint in it), or None for the embedded default
    (SmolLM2-135M-Instruct). heads: a heads directory/file/hub id, a shipped head set's name, False for none, or
    None: a Medusa-2 checkpoint's own heads, or the shipped default heads for the embedded model.
    dtype: the weights and the inputs of their matmuls ("float32", "bfloat16" or "float16"; None: float32 on CPUs,
    bfloat16 on accelerators, `config.default_dtype`); sums, activations and the KV cache stay float32, which keeps
    greedy Medusa output equal to plain decoding. activations:
    "bfloat16" for bfloat16 activations and KV cache too (half the cache memory; greedy output may then differ
    from plain decoding after near-ties). draft_vocab: use the reduced
    draft vocabulary saved beside the heads (`draft_vocab.json`), if any: True (all of it), an int (its first N
    tokens) or False (the heads draft from the full vocabulary). scan_unroll: layers per iteration of the layer loop;
    `num_layers` removes the loop (on a 2-core CPU ~25% faster decode steps for SmolLM2, 2-3x longer compiles).
    mesh: decode sharded over devices: a `jax.sharding.Mesh` with the axes `sharding.MESH_AXES`, or "DATAxMODEL" /
    (data, model), e.g. "1x8": rows over DATA devices, heads, MLP and vocabulary over MODEL (`medusa_jax.sharding`).
    The backbone is read straight into its shards (each device's slice from the checkpoint, in `dtype`:
    `shard_load.read_backbone_sharded`). None: one device."""
    dtype = dtype or default_dtype()[0]
    check_numerics(dtype, activations)  # before any reading
    mesh = None if mesh is None else inference_mesh(mesh)
    if ckpt is not None and os.path.isdir(ckpt):
        from medusa_jax.run_io import is_run_dir

        if is_run_dir(ckpt):
            return load_run(ckpt, dtype=dtype, tokenizer=tokenizer, activations=activations, mesh=mesh)
    if isinstance(heads, str) and shipped_heads(heads):
        heads = shipped_heads(heads)
    if heads is None and ckpt in (None, "default", "smollm2"):
        heads = shipped_heads(DEFAULT_HEADS)
    if heads is False:
        heads = None
        auto_heads = False
    else:
        auto_heads = heads is None
    path = checkpoint.resolve(ckpt)
    medusa2: dict = {}  # a Medusa-2 full checkpoint's `medusa_head.*` tensors, collected while reading the backbone

    def collect(name, arr):
        if auto_heads and name.startswith("medusa_head."):
            medusa2[name] = arr

    shardings = None if mesh is None else (lambda tree, c: param_shardings(tree, mesh, c.head_dim))
    cfg, params = shard_load.read_backbone_sharded(path, dtype, shardings, on_unknown=collect)  # dtype: param_dtype
    cfg = cfg.for_inference(dtype, activations).replace(scan_unroll=max(1, min(scan_unroll, cfg.num_layers)))
    tok = _load_tokenizer(path) if tokenizer else None
    model = MedusaModel(cfg, params, tok, name=os.path.basename(path.rstrip("/")))
    if heads is not None:
        model = with_heads(model, heads, dtype, draft_vocab)
    elif medusa2:
        from medusa_jax.heads_io import check_heads, heads_from_tensors

        found = check_heads(heads_from_tensors(medusa2, "medusa_head."), model, {"source": path})
        model = dataclasses.replace(model, heads=found)
    return place(model, mesh)


def place(model: MedusaModel, mesh) -> MedusaModel:
    """`model` with its params and heads in their shards on `mesh` (`sharding.param_shardings`; attention split by
    whole heads). Arrays already in their shards stay where they are; others are placed from host copies, each
    process placing its own devices' slices. mesh None: `model` as it is."""
    if mesh is None:
        return model
    mesh = inference_mesh(mesh)

    def put(tree):
        if tree is None:
            return None
        shardings = param_shardings(tree, mesh, model.cfg.head_dim)
        same = lambda x, s: isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)
        return jax.tree.map(lambda x, s: x if same(x, s) else shard_global(np.asarray(x), s), tree, shardings)

    return dataclasses.replace(model, params=put(model.params), heads=put(model.heads), mesh=mesh)


def with_heads(model: MedusaModel, heads: str, dtype: str, draft_vocab: bool | int = True) -> MedusaModel:
    """`model` with the heads at `heads` (a directory, file or hub id) and what lies beside them: a Medusa-2 LoRA
    adapter (merged into the backbone's params), the draft vocabulary, a fixed `tree.json` and this device's
    calibration. Returns a new model; `model` is left as it was."""
    from medusa_jax.heads_io import load_heads

    folder = heads if os.path.isdir(heads) else None
    if folder and os.path.exists(os.path.join(folder, "adapter_model.safetensors")):
        from medusa_jax.lora import merge_adapter

        params = merge_adapter(model.params, folder, model.cfg.jnp_param_dtype)  # Medusa-2: LoRA beside the heads
        model = dataclasses.replace(model, params=params)
    found = load_heads(heads, model)
    tree = calibration = None
    if folder:
        from medusa_jax.calibrate import read_calibration
        from medusa_jax.draft_vocab import read_draft_vocab
        from medusa_jax.tree import get_tree

        if draft_vocab is not False:
            size = None if draft_vocab is True else draft_vocab
            ids = read_draft_vocab(folder, size, vocab_size=model.cfg.vocab_size)
            if ids is not None:
                found = attach_draft_vocab(found, base_lm_head(model.params), ids)
        tree_file = os.path.join(folder, "tree.json")
        tree = get_tree(tree_file) if os.path.exists(tree_file) else None  # a fixed tree shipped with these heads
        calibration = read_calibration(folder, dtype)  # trees sized to this device, per batch size
    return place(dataclasses.replace(model, heads=found, tree=tree, calibration=calibration), model.mesh)


def load_run(
    path: str, dtype: str = "float32", tokenizer: bool = True, activations: str | None = None, mesh=None
) -> MedusaModel:
    """A training run directory (its latest checkpoint) or one step's directory in it -> a `MedusaModel` with the
    run's trained heads, its LoRA merged (or its fine-tuned backbone) and the backbone's tokenizer."""
    from medusa_jax.run_io import read_run

    run = read_run(path, dtype=dtype, tokenizer=tokenizer, activations=activations)
    model = MedusaModel(run.cfg, run.params, run.tokenizer, heads=run.heads, name=run.name, train_config=run.config)
    return place(model, mesh)
