"""Loading a training run directory as a `MedusaModel` (`medusa_jax.load(RUN_DIR)` does the same)."""

from medusa_jax.api import load_run
from medusa_jax.run_io import is_run_dir, split_run_path

__all__ = ["is_run_dir", "load_run", "split_run_path"]
