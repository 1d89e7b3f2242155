"""TPU devices to compile for on any host: accelerator names (`v5e-8`) -> libtpu topologies -> compile-only devices.

With libtpu installed (`pip install "jax[tpu]==<jax version>"`), `jax.experimental.topologies` hands out TPU devices
of a named slice on a machine without TPUs: programs lower and compile for them with the TPU compiler (memory and
cost analyses, collectives), and nothing runs. This is how `medusa_jax.aot` and `medusa_jax.train.plan` check that a
configuration compiles and fits a slice before one is rented.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # "v5e"
    device_kind: str  # what jax reports
    hbm_bytes: int  # per chip
    cores_per_chip: int  # TensorCores; v5p-N and v4-N count cores, v5e-N and v6e-N chips
    bf16_tflops: float  # peak dense bf16 per chip
    hbm_gbps: float  # HBM bandwidth per chip, GB/s


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GIB, 2, 275.0, 1228.0),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, 1, 197.0, 819.0),
    "v5p": Chip("v5p", "TPU v5", 95 * GIB, 2, 459.0, 2765.0),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GIB, 1, 918.0, 1640.0),
}
# chips -> the libtpu topology of that many chips (2D tori for v5e/v6e, 3D for v4/v5p); one chip is compiled as
# one device of the smallest host (2x2)
_SHAPES_2D = {1: "2x2", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {1: "2x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}


class TopologyError(ValueError):
    """A topology name that cannot be resolved, or no libtpu; the message says what to do."""


def resolve(name: str) -> tuple[str, int, Chip]:
    """`v5e-8` (chips; cores for v4/v5p: `v5p-8` is 4 chips) or `v5e:2x4` -> (libtpu topology name, chips used, chip)."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
    if m:
        chip = CHIPS[m.group(1)]
        count = int(m.group(2))
        if count % chip.cores_per_chip:
            raise TopologyError(f"{name}: {chip.name}-N counts TensorCores, N must be a multiple of 2")
        chips = count // chip.cores_per_chip
        shapes = _SHAPES_3D if chip.cores_per_chip == 2 else _SHAPES_2D
        if chips not in shapes:
            raise TopologyError(f"{name}: no {chip.name} slice of {chips} chips; use one of {sorted(shapes)} chips")
        return f"{chip.name}:{shapes[chips]}", chips, chip
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name)
    if m:
        chips = 1
        for d in m.group(2).split("x"):
            chips *= int(d)
        return name, chips, CHIPS[m.group(1)]
    raise TopologyError(
        f"unknown TPU topology {name!r}: use an accelerator name such as v5e-1, v5e-8, v5p-8, v6e-8, v5e-256, or a "
        "libtpu topology such as v5e:2x4"
    )


def libtpu_hint() -> str:
    import jax

    return f'pip install "jax[tpu]=={jax.__version__}"'


@functools.lru_cache(maxsize=16)
def devices(name: str) -> tuple:
    """The compile-only TPU devices of topology `name` (the first `chips` of its host layout)."""
    topo_name, chips, _ = resolve(name)
    # compile-only use: several processes (parallel tests, two reports) may hold libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name=topo_name)
    except Exception as e:  # no libtpu, or a topology it does not know
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TopologyError(
            f"cannot get TPU topology {topo_name} ({first}): compiling for TPUs needs libtpu: {libtpu_hint()}"
        ) from None
    return tuple(topo.devices[:chips])


def chip_of(device) -> Chip:
    """The chip of a (TPU) device, from its device_kind."""
    for chip in CHIPS.values():
        if device.device_kind == chip.device_kind:
            return chip
    raise TopologyError(f"unknown TPU device kind {device.device_kind!r}")
