"""Scale-out pieces on CPU: the scanned GPT equals the unrolled one, gradient accumulation
gives the update of the whole batch, batch sizes are checked against the mesh, and
activation constraints follow the logical axes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from configs import transformer_default
from tests import helpers
from vqgan_jax import checkpointing, config_lib, sharding
from vqgan_jax.training import stage1 as stage1_trainer
from vqgan_jax.training import stage2 as stage2_trainer
from vqgan_jax.models import transformer, vqgan

GPT_CFG = dict(vocab_size=40, block_size=16, n_layer=3, n_head=2, n_embd=32)


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_gpt_equals_unrolled(remat):
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, GPT_CFG["vocab_size"])
  plain = transformer.GPT(**GPT_CFG)
  scanned = transformer.GPT(**GPT_CFG, scan_layers=True, remat=remat)
  params = plain.init(jax.random.key(1), tokens)["params"]
  stacked = transformer.stack_block_params(params, GPT_CFG["n_layer"])
  # Same tree as the scanned model's own init, and the conversion round-trips.
  own = scanned.init(jax.random.key(1), tokens)["params"]
  assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(stacked)
  assert own["blocks"]["attn"]["query"]["kernel"].shape == (3, 32, 32)
  assert _max_diff(transformer.unstack_block_params(stacked, 3), params) == 0.0

  logits = plain.apply({"params": params}, tokens)
  np.testing.assert_allclose(scanned.apply({"params": stacked}, tokens), logits, atol=2e-6)
  loss = lambda model: lambda p: jnp.mean(model.apply({"params": p}, tokens, train=True) ** 2)
  grads = jax.grad(loss(plain))(params)
  grads_scanned = jax.grad(loss(scanned))(stacked)
  assert _max_diff(transformer.stack_block_params(grads, 3), grads_scanned) < 1e-6

  # KV-cache decoding through the scanned blocks (stacked cache) matches the forward pass.
  cache = scanned.init_cache(2, 16)
  assert cache["layers"]["key"].shape[0] == 3
  prefill, cache = scanned.apply({"params": stacked}, tokens[:, :5], cache,
                                 method=transformer.GPT.prefill)
  step, _ = scanned.apply({"params": stacked}, tokens[:, 5], 5, cache,
                          method=transformer.GPT.decode_step)
  np.testing.assert_allclose(prefill, logits[:, :5], atol=2e-6)
  np.testing.assert_allclose(step, logits[:, 5], atol=2e-6)


def test_scanned_gpt_dropout_differs_per_layer_and_is_deterministic():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, GPT_CFG["vocab_size"])
  model = transformer.GPT(**GPT_CFG, resid_pdrop=0.5, scan_layers=True)
  params = model.init(jax.random.key(1), tokens)["params"]
  run = lambda k: model.apply({"params": params}, tokens, train=True, rngs={"dropout": k})
  np.testing.assert_array_equal(run(jax.random.key(2)), run(jax.random.key(2)))
  assert not np.allclose(run(jax.random.key(2)), run(jax.random.key(3)))


def _tiny_first_stage():
  config = helpers.tiny_stage1_config()
  model = vqgan.vqmodel_from_config(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  meta = {"n_embed": 32, "lookup_dim": 32, "downsample_factor": 2, "latent_grid": [8, 8]}
  return checkpointing.FrozenStage1(model=model, params=params, config=config, metadata=meta,
                                    step=0)


def _tiny_stage2_config(accum: int):
  config = transformer_default.get_config()
  m = config.model
  m.n_layer, m.n_head, m.n_embd = 2, 2, 32
  config.data.image_size = 8   # f = 2 -> a 4x4 token grid
  config.batch_size = 8
  config.grad_accum_steps = accum
  config.learning_rate = 1e-3
  return config


@pytest.mark.parametrize("scan_layers", [False, True])
def test_stage2_grad_accumulation_equals_one_big_batch(scan_layers):
  first = _tiny_first_stage()
  tokens = jax.random.randint(jax.random.key(5), (8, 4, 4), 0, 32)
  batch = {"tokens": tokens}
  results = []
  for accum in (1, 4):
    config = _tiny_stage2_config(accum)
    config.model.scan_layers = scan_layers
    setup = stage2_trainer.Stage2Setup(config, first, None, 0)
    setup.tx = optax.sgd(1.0)  # the update is the gradient itself (Adam's first step
                               # would be ~lr * sign(g), amplifying rounding of tiny g)
    state = setup.init_state(setup.rng)
    new_state, metrics = jax.jit(setup.train_step)(state, batch, {"first": first.params})
    results.append((new_state.params, float(metrics["loss"]), float(metrics["grad_norm"])))
  (p1, loss1, norm1), (p4, loss4, norm4) = results
  assert loss4 == pytest.approx(loss1, rel=1e-5)
  assert norm4 == pytest.approx(norm1, rel=1e-4)
  assert _max_diff(p1, p4) < 1e-6
  # The update is not trivially zero.
  init_config = _tiny_stage2_config(1)
  init_config.model.scan_layers = scan_layers
  init = stage2_trainer.Stage2Setup(init_config, first, None, 0)
  assert _max_diff(init.init_state(init.rng).params, p1) > 1e-3


def test_stage1_grad_accumulation_equals_one_big_batch():
  batch = {"image": jax.random.uniform(jax.random.key(3), (8, 16, 16, 3), minval=-1.0,
                                       maxval=1.0)}
  results = []
  for accum in (1, 2):
    config = helpers.tiny_stage1_config()
    config.batch_size = 8
    config.grad_accum_steps = accum
    setup = stage1_trainer.Stage1Setup(config)
    setup.g_tx = optax.sgd(1.0)  # the update is the gradient itself
    state = setup.init_state(setup.rng)
    new_state, metrics = jax.jit(lambda s, b, setup=setup: setup.train_step(
        s, b, None, use_gan=False))(state, batch)
    results.append((new_state.g_params, metrics))
  (p1, m1), (p2, m2) = results
  # float32 sums in another order (two half-batch means, then their mean): parameters of
  # magnitude ~0.3 differ by ~1e-6; a missing 1/accum or a dropped micro-batch is ~1e-2.
  assert _max_diff(p1, p2) < 5e-6
  assert float(m2["rec_loss"]) == pytest.approx(float(m1["rec_loss"]), rel=1e-5)
  np.testing.assert_array_equal(m1["code_counts"], m2["code_counts"])
  assert int(np.sum(m2["code_counts"])) == 8 * 8 * 8  # every code position of the batch


def test_stage1_grad_accumulation_with_gan_trains_both_networks():
  config = helpers.tiny_stage1_config()
  config.batch_size, config.grad_accum_steps = 8, 2
  config.loss.disc_start = 0
  config.loss.disc_num_layers = 1  # 16x16 inputs: the default 3 layers leave no logits
  setup = stage1_trainer.Stage1Setup(config)
  state = setup.init_state(setup.rng)
  batch = {"image": jax.random.uniform(jax.random.key(3), (8, 16, 16, 3), minval=-1.0,
                                       maxval=1.0)}
  new_state, metrics = jax.jit(lambda s, b: setup.train_step(s, b, None, use_gan=True))(
      state, batch)
  assert bool(metrics["finite"])
  assert np.isfinite(float(metrics["d_weight"])) and float(metrics["d_weight"]) > 0
  assert _max_diff(state.trainer.d_params, new_state.trainer.d_params) > 0
  # BatchNorm statistics were carried through both micro-batches.
  assert _max_diff(state.trainer.d_batch_stats, new_state.trainer.d_batch_stats) > 0


def _mesh(data, fsdp, tensor=1):
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


def test_batch_sizes_are_checked_against_the_mesh():
  config = helpers.tiny_stage1_config()
  config.batch_size, config.eval_batch_size = 64, 16
  config_lib.validate_batch_sizes(config, _mesh(2, 8))
  config.eval_batch_size = 16
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.eval_batch_size=16 .* multiple of 32; nearest valid: 32"):
    config_lib.validate_batch_sizes(config, _mesh(1, 32))
  config.batch_size, config.eval_batch_size, config.grad_accum_steps = 64, 32, 4
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.batch_size=64 .* 4 accumulation steps.*multiple of 128; "
                           r"nearest valid: 128 \(or set config.grad_accum_steps"):
    config_lib.validate_batch_sizes(config, _mesh(1, 32))
  config.grad_accum_steps = 2
  config_lib.validate_batch_sizes(config, _mesh(1, 32))
  assert sharding.nearest_valid_batch(100, 32) == 96
  assert sharding.nearest_valid_batch(112, 32) == 128
  assert sharding.nearest_valid_batch(5, 32) == 32


def test_activation_spec_follows_logical_axes():
  mesh = _mesh(2, 4, 2)
  assert sharding.activation_spec((16, 10, 4, 8), ("batch", None, "heads", None), mesh) == \
      P(("data", "fsdp"), None, "tensor", None)
  # Axes that do not divide are left unsplit rather than padded.
  assert sharding.activation_spec((6, 10, 3), ("batch", None, "vocab"), mesh) == P(None, None,
                                                                                   None)
  x = jnp.ones((4, 3))
  assert sharding.constrain(x, "batch", None) is x  # no mesh: a no-op


def test_stacked_params_keep_the_layer_axis_whole():
  mesh = _mesh(1, 4, 2)
  spec = sharding.spec_for("params/blocks/attn/query/kernel", (48, 256, 256), mesh,
                           sharding.GPT_RULES)
  assert spec == P(None, "fsdp", "tensor")
  spec = sharding.spec_for("params/blocks/mlp/proj/kernel", (48, 1024, 256), mesh,
                           sharding.GPT_RULES)
  assert spec == P(None, "tensor", "fsdp")
  # FSDP's size threshold applies per layer: a stacked LayerNorm scale stays replicated,
  # as the unrolled one does.
  assert sharding.spec_for("params/blocks/ln1/scale", (48, 1024), mesh,
                           sharding.GPT_RULES) == P(None, None)
  # The unrolled names keep their rules.
  assert sharding.spec_for("params/blocks_3/attn/query/kernel", (256, 256), mesh,
                           sharding.GPT_RULES) == P("fsdp", "tensor")
