"""LoRA factors for training: see `medusa_jax.lora` (inference merges them from there)."""

from medusa_jax.lora import GROUP, HF_GROUP, from_peft_tensors, init_lora, merge, merge_adapter, to_peft_tensors

__all__ = ["GROUP", "HF_GROUP", "from_peft_tensors", "init_lora", "merge", "merge_adapter", "to_peft_tensors"]
