"""Plan a pod run before booking it: compile the sharded train step of a config for N devices on simulated CPU
devices, with abstract inputs (nothing model-sized is allocated), and print per-device memory, FLOPs per step, the
step time at the chip's peak and whether it fits the chip's HBM.

    python -m medusa_jax.train.plan --config configs/vicuna_7b_medusa2_pod.yaml --devices 256 --chip v5e

The mesh is `--mesh DATA,FSDP,TENSOR`, or by default FSDP over the devices, with tensor parallelism where the
global batch has fewer rows than devices. FLOPs and memory are XLA's figures for one device's program."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

# chip: (HBM GiB, peak dense bf16 TFLOP/s)
CHIPS = {"v5p": (95.0, 459.0), "v5e": (16.0, 197.0), "h100": (80.0, 989.0)}
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: tuple[int, int, int]
    argument_bytes: int  # per device
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated arguments' buffers
    temp_bytes: int
    flops: float  # per device, one step
    compile_s: float

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def model_config(cfg, layers: int = 0, unrolled: bool = False):
    """The config's backbone as a ModelConfig (a known hub id, a local checkpoint's config, or tiny)."""
    from medusa_jax.config import known_config

    m = cfg.model
    if m.ckpt == "tiny":
        from medusa_jax.run_io import TINY

        mc = TINY
    elif known_config(m.ckpt) is not None:
        mc = known_config(m.ckpt)
    else:
        from medusa_jax import checkpoint

        mc, _ = checkpoint.read_backbone(checkpoint.resolve(None if m.ckpt == "default" else m.ckpt))
    mc = mc.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    mc = mc.replace(num_layers=layers) if layers else mc
    return mc.replace(scan_unroll=mc.num_layers) if unrolled else mc


def abstract_trainable(cfg, mc, backbone) -> dict:
    """ShapeDtypeStructs of `init_trainable`'s pytree (heads float32; LoRA factors; or the whole backbone)."""
    sds = jax_sds
    k, nl, e, v = cfg.heads.num_heads, cfg.heads.num_layers, mc.hidden_size, mc.vocab_size
    heads = {"blocks": {"kernel": sds((k, nl, e, e)), "bias": sds((k, nl, e))}}
    if not cfg.heads.shared_lm_head:
        heads["proj"] = {"kernel": sds((k, e, v))}
    if cfg.heads.root_token or cfg.heads.sequential:
        heads["root"] = {"kernel": sds((k, e, e))}
    if cfg.heads.sequential:
        heads["path"] = {"kernel": sds((k, k - 1, e, e))}
    out = {"heads": heads}
    if cfg.train.mode == "medusa2":
        if cfg.lora.rank:
            from medusa_jax.lora import GROUP

            lora: dict = {}
            for t in cfg.lora.targets:
                n, fan_in, fan_out = backbone["layers"][GROUP[t]][t]["kernel"].shape
                lora.setdefault(GROUP[t], {})[t] = {"lora_a": sds((n, fan_in, cfg.lora.rank)),
                                                    "lora_b": sds((n, cfg.lora.rank, fan_out))}  # fmt: skip
            out["lora"] = lora
        else:
            out["backbone"] = backbone
    return out


def jax_sds(shape, dtype="float32"):
    import jax

    return jax.ShapeDtypeStruct(shape, dtype)


def default_mesh(devices: int, batch: int, tensor: int = 1) -> tuple[int, int, int]:
    """(1, devices / t, t): FSDP over the devices, t the smallest power of two >= `tensor` that leaves at most
    `batch` rows' worth of batch shards."""
    t = max(1, tensor)
    while devices // t > batch or devices % t:
        t *= 2
        if t > devices:
            raise ValueError(f"cannot split a batch of {batch} rows over {devices} devices")
    return 1, devices // t, t


def step_inputs(cfg, mesh_shape: tuple[int, int, int], layers: int = 0, unrolled: bool = False, devices=None):
    """The config's jitted train step for `mesh_shape` and its abstract arguments: (step, [(abstract pytree,
    shardings)] for trainable, optimizer state, frozen params, batch and step number)."""
    import jax
    import jax.numpy as jnp

    from medusa_jax import sharding as sh
    from medusa_jax.model import Transformer, causal_mask
    from medusa_jax.train.step import jit_step, make_optimizer

    if cfg.train.mode == "medusa1" and cfg.train.precompute_hidden:
        raise ValueError(
            "Medusa-1 on precomputed hidden states needs no pod: plan it with train.precompute_hidden=false"
        )
    mc = model_config(cfg, layers, unrolled)
    mesh = sh.make_mesh(*mesh_shape, devices=None if devices is None else list(devices))
    tokens = jnp.zeros((1, 4), jnp.int32)
    init = lambda m: m.logits(m(tokens, tokens, causal_mask(4))[0])  # noqa: E731
    backbone = jax.eval_shape(lambda key: Transformer(mc).init(key, method=init)["params"], jax.random.PRNGKey(0))
    backbone = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, mc.jnp_param_dtype), backbone)
    trainable = abstract_trainable(cfg, mc, backbone)
    frozen = {"backbone": backbone}
    if cfg.train.mode == "medusa2" and not cfg.lora.rank and cfg.train.backbone_loss != "kl":
        frozen = {}
    opt_state = jax.eval_shape(make_optimizer(cfg).init, trainable)
    trainable_sh = sh.param_shardings(trainable, mesh)
    frozen_sh = sh.param_shardings(frozen, mesh)
    opt_sh = sh.state_shardings(opt_state, trainable_sh, mesh)
    b, length = cfg.train.batch_size, cfg.data.max_len
    batch = {"input_ids": jax_sds((b, length), "int32"), "loss_mask": jax_sds((b, length), "int32")}
    batch_sh = {k: sh.batch_sharding(mesh, 2) for k in batch}
    rep = sh.replicated(mesh)
    step = jit_step(cfg, mc, False, trainable_sh, opt_sh, frozen_sh, batch_sh, rep)
    args = [(trainable, trainable_sh), (opt_state, opt_sh), (frozen, frozen_sh), (batch, batch_sh),
            (jax_sds((), "int32"), rep)]  # fmt: skip
    return step, args


def _compile(cfg, mesh_shape, layers: int, unrolled: bool = False, devices=None):
    step, args = step_inputs(cfg, mesh_shape, layers, unrolled, devices)
    return step.lower(*[a for a, _ in args]).compile()


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def plan(cfg, mesh_shape: tuple[int, int, int], layers: int = 0, devices=None) -> Plan:
    """Lower and compile the config's train step for `mesh_shape` on this host's (simulated) devices. Memory comes
    from that compilation; FLOPs from two small ones with the layer loop unrolled (1 and 2 layers: XLA's cost
    analysis counts a loop body once), extrapolated linearly to the model's layers."""
    t0 = time.perf_counter()
    compiled = _compile(cfg, mesh_shape, layers, devices=devices)
    dt = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    n = layers or model_config(cfg).num_layers
    one, two = (_flops(_compile(cfg, mesh_shape, k, unrolled=True, devices=devices)) for k in (1, 2))
    flops = one + (two - one) * (n - 1)
    return Plan(mesh_shape, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes), flops, dt)  # fmt: skip


def report(p: Plan, chip: str, batch: int, layers_scale: float = 1.0) -> dict:
    """The table row: GiB per device, TFLOPs per device, step time at peak, fits, and the largest batch that fits
    (temporaries scaled linearly with the batch). `layers_scale` scales a reduced-layer plan to the full model."""
    hbm, peak = CHIPS[chip]
    s = layers_scale
    args, out = p.argument_bytes * s / GIB, (p.output_bytes - p.alias_bytes) * s / GIB
    temp, flops = p.temp_bytes * s / GIB, p.flops * s
    total = args + out + temp
    fixed = args + out
    max_batch = int(batch * (hbm - fixed) / temp) if temp > 0 and hbm > fixed else 0
    g = lambda x: float(f"{x:.3g}")  # noqa: E731
    return {"mesh": "x".join(map(str, p.mesh)), "args_gib": g(args), "out_gib": g(out),
            "temp_gib": g(temp), "total_gib": g(total), "hbm_gib": hbm, "fits": total <= hbm,
            "tflops": g(flops / 1e12), "step_s_at_peak": g(flops / (peak * 1e12)),
            "max_batch": max_batch, "compile_s": round(p.compile_s, 1)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--devices", type=int, default=0, help="devices of the pod slice (simulated here)")
    ap.add_argument("--mesh", default="", help="DATA,FSDP,TENSOR (default: FSDP, tensor where needed)")
    ap.add_argument("--chip", default="v5p", choices=sorted(CHIPS))
    ap.add_argument(
        "--topology",
        default="",
        help="compile with the TPU compiler for this slice (v5p-64, v5e-256, "
        "v5e:16x16; needs libtpu) instead of on simulated CPU devices; sets --devices and --chip",
    )
    ap.add_argument("--layers", type=int, default=0, help="compile with this many layers and scale linearly")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args(argv)
    devices = None
    if args.topology:
        from medusa_jax import topology

        try:
            devices = topology.devices(args.topology)
        except topology.TopologyError as e:
            print(f"plan: error: {e}", file=sys.stderr)
            return 2
        args.devices, args.chip = len(devices), topology.chip_of(devices[0]).name
        CHIPS.setdefault(args.chip, (topology.CHIPS[args.chip].hbm_bytes / GIB, topology.CHIPS[args.chip].bf16_tflops))
    if args.devices < 1:
        ap.error("--devices (>= 1) or --topology is required")
    from medusa_jax.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        mesh = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else None
        if mesh is not None and (len(mesh) != 3 or mesh[0] * mesh[1] * mesh[2] != args.devices):
            raise ValueError(f"--mesh {args.mesh}: three sizes whose product is --devices {args.devices}")
        mesh = mesh or default_mesh(args.devices, cfg.train.batch_size, cfg.mesh.tensor)
        if cfg.train.batch_size % (mesh[0] * mesh[1]):
            raise ValueError(f"train.batch_size {cfg.train.batch_size} does not divide over data x fsdp of {mesh}")
    except (ConfigError, ValueError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    import jax

    if devices is None:
        with contextlib.suppress(RuntimeError):  # the backend is already up (in-process callers): use what it has
            jax.config.update("jax_num_cpu_devices", args.devices)
    if devices is None and jax.device_count() < args.devices:
        print(f"plan: error: {jax.device_count()} devices here; start a fresh process", file=sys.stderr)
        return 2
    full = model_config(cfg).num_layers
    p = plan(cfg, mesh, args.layers, devices)
    row = report(p, args.chip, cfg.train.batch_size, full / args.layers if args.layers else 1.0)
    name = os.path.basename(args.config)
    where = f"the TPU compiler for {args.topology}" if devices is not None else "XLA:CPU on simulated devices"
    print(f"{name} on {args.devices} x {args.chip}, compiled by {where} (mesh data x fsdp x tensor = {row['mesh']}), batch "
          f"{cfg.train.batch_size} x {cfg.data.max_len} tokens{f', {args.layers} layers scaled to {full}' if args.layers else ''}:")  # fmt: skip
    print(f"  per device: arguments {row['args_gib']} GiB, outputs {row['out_gib']} GiB (beyond donated), "
          f"temporaries {row['temp_gib']} GiB = {row['total_gib']} GiB of {row['hbm_gib']} GiB: "
          f"{'fits' if row['fits'] else 'DOES NOT FIT'}")  # fmt: skip
    print(f"  {row['tflops']} TFLOPs per device per step: {row['step_s_at_peak']} s per step at peak; "
          f"largest batch that fits ~{row['max_batch']} rows (compiled in {row['compile_s']} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
