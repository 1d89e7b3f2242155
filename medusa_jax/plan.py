"""One decision, made in one place: which loop runs for a batch (plain decoding or a Medusa tree), with which tree,
lookup chain and acceptance rule, and why.

`plan_decoding(model, batch, ...)` turns the model (its heads, shipped tree and calibration), the batch size and
the user's options into a `DecodePlan`. `generate`, `Session`, `decode.py` and `bench` all ask it, so they agree.
Plain decoding is the Medusa loop with a root-only tree and no heads.
"""

from __future__ import annotations

import dataclasses

from medusa_jax.lookup import DEFAULT_LOOKUP
from medusa_jax.medusa_decode import default_tree_name, resolve_tree
from medusa_jax.options import ACCEPTANCE
from medusa_jax.tree import TreeBuffers, build_buffers

MODES = ("ar", "medusa")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The static decode settings of one batch (hashable: part of the jit cache key through `MedusaLoop`)."""

    mode: str  # "ar" | "medusa"
    tree: TreeBuffers  # root-only for "ar"
    acceptance: str  # "greedy" | "typical" | "rejection"
    reason: str  # one line for the user: why this mode and tree

    @property
    def uses_heads(self) -> bool:
        return self.mode == "medusa" and self.tree.head_depth > 0


def root_only() -> TreeBuffers:
    return build_buffers([], topk=1)


def plain_rule(greedy: bool) -> str:
    """Plain decoding samples the root from the model's distribution (the rejection rule with no candidates)."""
    return "greedy" if greedy else "rejection"


def plan_decoding(
    model,
    batch: int,
    mode: str | None = None,
    tree=None,
    lookup: int | None = None,
    acceptance: str | None = None,
    greedy: bool = True,
    topk: int = 10,
) -> DecodePlan:
    """The plan for a batch of `batch` rows.

    mode None: Medusa when the model has heads, unless the heads' calibration for this device finds no tree worth
    verifying at this batch size (then plain decoding). tree None: the calibrated tree for this batch size, else the
    heads' own `tree.json`, else the backend's default (cut to the heads' depth). lookup None: the calibrated chain
    with the calibrated tree, `DEFAULT_LOOKUP` with a default tree, none with a named tree. acceptance None: greedy at
    temperature 0, else rejection sampling; any rule is greedy at temperature 0, and plain decoding samples from the
    model's distribution whatever the rule."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be 'ar' or 'medusa', got {mode!r}")
    if acceptance is not None and acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance must be one of {', '.join(ACCEPTANCE)}, got {acceptance!r}")
    if mode == "medusa" and model.heads is None:
        raise ValueError("mode='medusa' needs Medusa heads: load(ckpt, heads=PATH)")
    rule = "greedy" if greedy else (acceptance or "rejection")
    if model.heads is None or mode == "ar":
        why = "no Medusa heads loaded" if model.heads is None else "plain decoding asked for"
        return DecodePlan("ar", root_only(), plain_rule(greedy), why)
    num_heads = model.heads_config.num_heads
    if tree is not None:
        return DecodePlan("medusa", resolve_tree(tree, num_heads, topk, lookup), rule, "the tree asked for")
    cal = model.calibration
    calibrated = model.default_tree(batch) if cal is not None else None
    if cal is not None and not calibrated and mode is None:
        why = f"this device's calibration ({cal.get('device', '?')}) picks plain decoding at batch {batch}"
        return DecodePlan("ar", root_only(), plain_rule(greedy), why)
    if calibrated:
        chain = model.default_lookup(batch) if lookup is None else lookup
        why = f"this device's calibration picks a {len(calibrated)}-node tree at batch {batch}"
        return DecodePlan("medusa", resolve_tree(calibrated, num_heads, topk, chain), rule, why)
    chain = DEFAULT_LOOKUP if lookup is None else lookup
    if model.tree is not None:
        return DecodePlan("medusa", resolve_tree(model.tree, num_heads, topk, chain), rule, "the heads' own tree")
    name = default_tree_name()
    return DecodePlan("medusa", resolve_tree(None, num_heads, topk, chain), rule, f"the default tree {name}")
