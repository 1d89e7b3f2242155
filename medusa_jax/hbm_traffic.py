"""HBM traffic of a program compiled for a TPU, read from its optimized HLO (no device needed).

XLA's cost analysis ("bytes accessed") counts every operand and result of every op, wherever it lives. On a TPU
much of that is on-chip: the compiler stages weights and activations through VMEM (async `copy-start` /
`slice-start` into memory space S(1)), so a weight read once from HBM is counted once for the copy's read, once for
its write into VMEM and again for each read by the matmul. A stack of 32 bf16 MLP layers that reads each weight
once scores 4-6x its weight bytes there (tests/test_hbm_traffic.py). What bounds a decode step is HBM bandwidth,
so this module counts only what crosses HBM:

  - an op's operands and results that live in HBM (no `S(n)` memory-space annotation in their layout);
  - of an operand a fusion only slices (dynamic-slice, slice, gather), the slices it reads; into an operand
    updated in place (dynamic-update-slice, aliased results), what is written;
  - an async copy once, at its start: the bytes it moves, read from HBM and/or written to HBM;
  - a while loop's body times its trip count (loops of the form `i < N` from 0, as scan and fori_loop emit;
    others count once).

Pallas kernels count the bytes of their cost estimate (their DMAs are inside the kernel); other custom calls their
HBM operands and results whole. It is an estimate from the program's
structure, like the cost analysis, not a hardware counter.
"""

from __future__ import annotations

import collections
import re

_ARRAY = re.compile(
    r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2)\[([\d,]*)\](\{[^}]*\})?"
)
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64,
         "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "f8e4m3fn": 8, "f8e5m2": 8}  # fmt: skip
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)(?:, |$)")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .*\{$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}
_DONE = {"copy-done", "slice-done", "all-reduce-done", "all-gather-done", "collective-permute-done", "send-done",
         "recv-done"}  # fmt: skip
_SLICING = {"dynamic-slice", "slice", "gather"}


def arrays(shape_text: str) -> list[tuple[int, bool]]:
    """(bytes, on chip) of each array in an HLO shape (a tuple lists several)."""
    out = []
    for ty, dims, layout in _ARRAY.findall(shape_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append((n * _BITS[ty] // 8, "S(" in (layout or "")))
    return out


def hbm_bytes_of(shape_text: str) -> int:
    return sum(b for b, on_chip in arrays(shape_text) if not on_chip)


class Module:
    """An optimized HLO module's computations: name -> (parameter shapes by name, instruction lines)."""

    def __init__(self, text: str):
        self.comps: dict[str, tuple[dict[str, str], list[str]]] = {}
        self.entry = None
        lines = None
        for line in text.splitlines():
            m = _HEADER.match(line)
            if m and not line.startswith(" "):
                params = {p.group(1): p.group(2) for p in re.finditer(
                    r"([\w.\-]+): ((?:\([^()]*\))|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)", m.group(2))}  # fmt: skip
                lines = []
                self.comps[m.group(1)] = (params, lines)
                if line.startswith("ENTRY"):
                    self.entry = m.group(1)
            elif line.startswith("}"):
                lines = None
            elif lines is not None:
                lines.append(line)

    def trip_count(self, cond: str) -> int:
        """N of a loop condition `i < N` (i from 0: what scan and fori_loop emit); 1 when not of that form."""
        body = "\n".join(self.comps[cond][1])
        consts = re.findall(r"constant\((\d+)\)", body)
        return int(consts[0]) if consts and "direction=LT" in body else 1

    def fused_read(self, comp: str, index: int, full: int) -> int:
        """HBM bytes a fused computation reads of its parameter `index` (`full` bytes): only the slices when it only
        slices it (in nested fusions too), nothing when it only updates it in place, else all of it."""
        body = self.comps[comp][1]
        name = next((m.group(1) for m in map(_INSTR.match, body)
                     if m and m.group(3) == "parameter" and m.group(4) == str(index)), None)  # fmt: skip
        if name is None:
            return full
        total = 0
        for m in map(_INSTR.match, body):
            if not m or m.group(3) == "parameter":
                continue
            ops = [o.strip().lstrip("%") for o in m.group(4).split(",")]
            if name not in ops:
                continue
            op = m.group(3)
            if op in _SLICING and ops[0] == name:
                total += sum(b for b, _ in arrays(m.group(2)))
            elif op == "dynamic-update-slice" and ops[0] == name:
                continue  # written in place: counted as the fusion's result
            elif op == "fusion":
                inner = re.search(r"calls=%([\w.\-]+)", m.string).group(1)
                total += sum(self.fused_read(inner, j, full) for j, o in enumerate(ops) if o == name)
            else:
                return full
        return min(total, full)

    def traffic(self, comp: str | None = None, by: collections.Counter | None = None, times: int = 1) -> int:
        """HBM bytes of one run of computation `comp` (default: the entry), loops included; `by` gets them per
        op_name (its last 60 characters)."""
        by = by if by is not None else collections.Counter()
        total = 0
        for line, times_run, shapes in self.instructions(comp, times):
            name, shape, op, args = _INSTR.match(line).groups()
            if op in _FREE or op in _DONE:
                continue
            ops = [a.strip().split(" ")[-1].lstrip("%") for a in args.split(",") if "%" in a]
            estimate = (
                re.search(r'"cost_estimate":\{[^}]*"bytes_accessed":"(\d+)"', line) if op == "custom-call" else None
            )
            if estimate:  # a Pallas kernel: the bytes it says it moves (its DMAs are not in the HLO)
                moved = int(estimate.group(1))
            elif op in ("copy-start", "slice-start"):  # (destination, source, context) / ((source), destination, ..)
                arrs = arrays(shape)
                dest = arrs[0] if op == "copy-start" else arrs[1]
                from_hbm = bool(ops) and hbm_bytes_of(shapes.get(ops[0], "")) > 0
                moved = dest[0] * (int(from_hbm) + int(not dest[1]))
            else:
                calls = re.search(r"calls=%([\w.\-]+)", line)
                read = 0
                for j, o in enumerate(ops):
                    b = hbm_bytes_of(shapes.get(o, ""))
                    if not b:
                        continue
                    if op == "fusion" and calls:
                        b = self.fused_read(calls.group(1), j, b)
                    elif op in _SLICING and j == 0:
                        b = min(b, sum(x for x, _ in arrays(shape)))
                    elif op == "dynamic-update-slice" and j == 0:
                        b = 0
                    read += b
                written = hbm_bytes_of(shape)
                if op == "dynamic-update-slice" or '"aliasing_operands":{"lists":[{' in line:
                    written = min(written, sum(hbm_bytes_of(shapes.get(o, "")) for o in ops[1:]))
                moved = read + written
            label = re.search(r'op_name="([^"]*)"', line)
            label = (
                re.sub(r"jit\([\w]+\)/|while/body/|closed_call/|checkpoint/|remat/", "", label.group(1))
                if label
                else op
            )
            by[label[-60:]] += moved * times_run
            total += moved * times_run
        return total

    def instructions(self, comp: str | None = None, times: int = 1):
        """(instruction line, how many times it runs, shapes by name in its computation so far) of one run of
        `comp`, through loops (x trip count), calls and conditionals; fused computations are not entered."""
        params, body = self.comps[comp or self.entry]
        shapes = dict(params)
        for line in body:
            m = _INSTR.match(line)
            if not m:
                continue
            shapes[m.group(1)] = m.group(2)
            if m.group(3) == "while":
                n = self.trip_count(re.search(r"condition=%([\w.\-]+)", line).group(1))
                yield from self.instructions(re.search(r"body=%([\w.\-]+)", line).group(1), times * n)
            elif m.group(3) in ("call", "conditional"):
                for c in re.findall(r"(?:to_apply=|calls=|branch_computations=\{)%([\w.\-]+)", line):
                    yield from self.instructions(c, times)
            else:
                yield line, times, shapes

    def loop_named(self, scope: str) -> str | None:
        """The body of the entry's while loop whose op_name contains `scope` (a `jax.named_scope`)."""
        for line in self.comps[self.entry][1]:
            if " while(" in line and re.search(rf'op_name="[^"]*{re.escape(scope)}[^"]*"', line):
                return re.search(r"body=%([\w.\-]+)", line).group(1)
        return None


def hbm_traffic(text: str, loop_scope: str | None = None) -> tuple[int, collections.Counter]:
    """(HBM bytes, per op_name) of an optimized HLO module, or of one iteration of its top-level while loop under
    `jax.named_scope(loop_scope)`."""
    mod = Module(text)
    comp = mod.loop_named(loop_scope) if loop_scope else None
    if loop_scope and comp is None:
        raise ValueError(f"no top-level while loop under the scope {loop_scope!r} in this module")
    by: collections.Counter = collections.Counter()
    return mod.traffic(comp, by), by


__all__ = ["Module", "arrays", "hbm_traffic"]
