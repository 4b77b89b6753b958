"""Optimisers and learning rates of both stages.

Stage 1 (VQGAN and discriminator): Adam, as the reference. Stage 2 (GPT): AdamW with
weight decay on Dense kernels only and an optional linear warm-up. Both scale the base
learning rate by the global batch size unless `config.learning_rate` is given.
"""

from typing import Any

import jax
import optax


def learning_rate(config) -> float:
  """lr = base_learning_rate x global batch (the reference's scaling) unless given directly."""
  if config.learning_rate > 0:
    return float(config.learning_rate)
  return float(config.base_learning_rate) * config.batch_size


def schedule(config) -> optax.Schedule:
  """The GPT's learning rate per step: linear warm-up to learning_rate(config), then
  constant. The optimiser and the logged learning rate both read this one object."""
  lr = learning_rate(config)
  if config.warmup_steps > 0:
    return optax.linear_schedule(0.0, lr, config.warmup_steps)
  return optax.constant_schedule(lr)


def decay_mask(params) -> Any:
  """True for Dense kernels (weight decay), False for embeddings, biases, LayerNorm, wpe."""
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(config) -> optax.GradientTransformation:
  tx = optax.adamw(schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                   weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def make_adam(config, lr: float) -> optax.GradientTransformation:
  """Stage 1's optimiser (generator and discriminator alike), with optional clipping."""
  tx = optax.adam(lr, b1=config.adam_b1, b2=config.adam_b2)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
