"""Loading a training run directory as a `MedusaModel`: see `medusa_jax.run_io` (inference reads run dirs there)."""

from medusa_jax.run_io import is_run_dir, load_run, split_run_path

__all__ = ["is_run_dir", "load_run", "split_run_path"]
