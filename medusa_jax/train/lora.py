"""LoRA factors for training: see `medusa_jax.lora` (inference merges them from there)."""

from medusa_jax.lora import GROUP, HF_GROUP, apply_adapter, from_peft_tensors, init_lora, merge, to_peft_tensors

__all__ = ["GROUP", "HF_GROUP", "apply_adapter", "from_peft_tensors", "init_lora", "merge", "to_peft_tensors"]
