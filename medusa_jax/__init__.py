"""medusa-jax: Medusa speculative decoding (multiple decoding heads) for JAX/Flax."""

from medusa_jax.api import ForwardResult, GenerationResult, MedusaModel, load
from medusa_jax.checkpoint import CheckpointError
from medusa_jax.config import ModelConfig

__all__ = ["CheckpointError", "ForwardResult", "GenerationResult", "MedusaModel", "ModelConfig", "load"]
__version__ = "0.1.0"
