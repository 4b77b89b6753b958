"""Shared test helpers: a tiny stage-1 config and a trained (2-step) workdir built from it."""

import os

from configs import vqgan_default


def tiny_stage1_config():
  """A VQGAN small enough to train, evaluate and export in seconds on a 2-core CPU.

  f = 2 on 16x16 crops (an 8x8 code grid), 32 codes. The bundled photos are downscaled
  to a 64px short side so the val split has a few dozen crops, not thousands.
  """
  config = vqgan_default.get_config()
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2), 1, (8,)
  m.resolution, m.z_channels, m.embed_dim, m.n_embed = 16, 32, 32, 32
  config.data.image_size = 16
  config.data.photos.photo_short_side = 64
  config.data.photos.train_examples_per_epoch = 64
  config.loss.perceptual_weight = 0.0
  config.loss.disc_start = 10 ** 9
  config.batch_size = 4
  config.num_train_steps = 2
  config.log_every_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.num_eval_batches = 1
  config.eval_batch_size = 8
  config.async_checkpointing = False
  config.learning_rate = 1e-3
  return config


def build_stage1_workdir(workdir: str, config=None) -> str:
  """Trains the tiny config for its 2 steps in `workdir` (checkpoint at step 2)."""
  from vqgan_jax.training import stage1 as stage1_trainer  # pylint: disable=g-import-not-at-top
  config = config if config is not None else tiny_stage1_config()
  stage1_trainer.train_and_evaluate(config, os.fspath(workdir))
  return os.fspath(workdir)


_SHARED = {}


def shared_stage1_workdir(tmp_path_factory) -> str:
  """One tiny trained workdir per test session (both test_eval and test_export use it).

  Tests may add files under it (eval/ results) but must not remove its checkpoints.
  """
  if "workdir" not in _SHARED:
    _SHARED["workdir"] = build_stage1_workdir(tmp_path_factory.mktemp("stage1_tiny"))
  return _SHARED["workdir"]


def write_random_inception_weights(path, seed: int = 0) -> str:
  """Random FID-Inception weights of the right shapes, written with convert_inception."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vqgan_jax import convert_inception  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in convert_inception.expected_shapes().items():
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel":
      scale = np.float32(np.sqrt(2.0 / int(np.prod(shape[:-1]))))
      flat[name] = rng.standard_normal(shape, dtype=np.float32) * scale
    elif leaf in ("scale", "var"):
      flat[name] = np.ones(shape, np.float32)
    else:
      flat[name] = np.zeros(shape, np.float32)
  convert_inception.save_params_npz(flat, path)
  return os.fspath(path)


def mock_feature_fn(dim: int = 16, seed: int = 0):
  """A cheap stand-in for the Inception network: a fixed random projection of the pixels."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  cache = {}

  def features(images):
    images = jnp.asarray(images, jnp.float32)
    flat = images.reshape(images.shape[0], -1)
    if flat.shape[1] not in cache:
      rng = np.random.default_rng(seed)
      cache[flat.shape[1]] = (jnp.asarray(rng.standard_normal((flat.shape[1], dim)), jnp.float32),
                              jnp.asarray(rng.standard_normal((dim, 10)), jnp.float32))
    w, w_logits = cache[flat.shape[1]]
    pool = jnp.tanh(flat @ w / np.sqrt(flat.shape[1]))
    return {"pool": pool, "logits": pool @ w_logits}

  return features


def override(config, overrides):
  """Sets {"a.b.c": value} keys of a ConfigDict in place; returns it."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config
