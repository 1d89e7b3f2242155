"""Training Medusa heads (Medusa-1 and Medusa-2) in JAX: self-distillation data, sharded train step, checkpoints."""
