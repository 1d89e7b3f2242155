"""medusa-jax: Medusa speculative decoding (multiple decoding heads) for JAX/Flax."""

from __future__ import annotations

import importlib

__all__ = ["CheckpointError", "ForwardResult", "GenerationResult", "MedusaModel", "ModelConfig", "load"]
__version__ = "0.1.0"
_HOMES = {"CheckpointError": "checkpoint", "ModelConfig": "config"}  # the rest live in medusa_jax.api


def __getattr__(name: str):
    """Imported on first use, so that stdlib-only submodules (prompts, cache) load without JAX; submodules too
    (`medusa_jax.checkpoint.resolve` after `import medusa_jax`)."""
    if name in __all__:
        return getattr(importlib.import_module(f"medusa_jax.{_HOMES.get(name, 'api')}"), name)
    try:
        return importlib.import_module(f"medusa_jax.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"medusa_jax.{name}":
            raise
        raise AttributeError(f"module 'medusa_jax' has no attribute {name!r}") from None
