"""Every quantizer (vq, vq_ema, fsq, lfq, simvq) through the normal commands, on tiny models.

For each kind: the stage-1 trainer runs 2 steps and checkpoints, `load_stage1` restores
exactly what was saved (the "vq_stats" collection of vq_ema/simvq included), the token
export of the val split gives indices in [0, codebook size), and decoding them (the
quantizer's `lookup`) gives images. Then vq_ema's state moves by its EMA alone and
simvq's basis not at all, and a stage-2 GPT trains on fsq tokens, loads and samples.

Each kind is trained once per module (`trained`). The VQGANs are f = 1 without attention
resolutions and the discriminator has 2 layers (it is initialised, never used): the cost
here is compilation, not steps. Keys are "unsafe_rbg" inside this module: the threefry
initialisers of a VQGAN and its discriminator take about four times as long to compile.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

import helpers
from configs import transformer_tiny
from vqgan_jax import checkpointing, config_lib, decode_tokens, export_tokens, handoff, sample
from vqgan_jax.data import tokens as tokens_lib
from vqgan_jax.models import quantizer as quantizers
from vqgan_jax.models import vqgan
from vqgan_jax.training import stage1 as stage1_trainer
from vqgan_jax.training import stage2 as stage2_trainer

CODES = 32  # every kind gets a codebook of 32
KIND_KEYS = {"vq": {}, "vq_ema": {}, "simvq": {},
             "fsq": {"fsq_levels": (4, 4, 2)},   # 4 * 4 * 2 = 32 codes in 3 dimensions
             "lfq": {"lfq_bits": 5}}             # 2**5 = 32 codes in 5 dimensions
LOOKUP_DIM = {"fsq": 3, "lfq": 5}                # the others: embed_dim (32)
STATEFUL = ("vq_ema", "simvq")


pytestmark = pytest.mark.usefixtures("fast_prng")  # tests/conftest.py


def stage1_config(kind):
  config = helpers.tiny_stage1_config()
  m = config.model
  m.ch_mult, m.attn_resolutions = (1,), ()
  m.quantizer = kind
  for key, value in KIND_KEYS[kind].items():
    m[key] = value
  config.loss.disc_num_layers, config.loss.disc_ndf = 2, 8
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """kind -> (workdir, config, final metrics) of a 2-step stage-1 run, trained on first use."""
  runs = {}

  def get(kind):
    if kind not in runs:
      workdir = str(tmp_path_factory.mktemp(f"stage1_{kind}"))
      config = stage1_config(kind)
      runs[kind] = (workdir, config, stage1_trainer.train_and_evaluate(config, workdir))
    return runs[kind]

  return get


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _restore_raw(workdir, item, step=2):
  """An item of a checkpoint as it was written (no abstract tree)."""
  manager = checkpointing.make_manager(workdir, read_only=True)
  return manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))[item]


@pytest.mark.parametrize("kind", quantizers.QUANTIZERS)
def test_train_save_load_export_decode(kind, trained, tmp_path):
  workdir, config, metrics = trained(kind)
  assert checkpointing.latest_step(workdir) == 2
  assert np.isfinite(metrics["val_l1"]) and 0 < metrics["val_codebook_usage"] <= 100

  frozen = checkpointing.load_stage1(workdir)
  assert frozen.metadata["quantizer"] == kind
  assert frozen.n_embed == CODES and frozen.model.codebook_size == CODES
  assert frozen.lookup_dim == LOOKUP_DIM.get(kind, config.model.embed_dim)
  assert (vqgan.STATE_KEY in frozen.params) == (kind in STATEFUL)
  saved, loaded = _flat(_restore_raw(workdir, "model")), _flat(frozen.params)
  assert sorted(saved) == sorted(loaded)
  for name, value in saved.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)

  out = str(tmp_path / "tokens")
  meta = export_tokens.export_tokens(config, workdir, out, split="validation", batch_size=8)
  assert meta["codebook_size"] == CODES
  source = tokens_lib.TokenSource(out, "validation")
  tokens = np.stack([source[i]["tokens"] for i in range(len(source))]).astype(np.int64)
  assert tokens.shape[1:] == (16, 16) and len(tokens) >= 8
  assert 0 <= tokens.min() and tokens.max() < CODES
  images = decode_tokens.decode_to_images(tokens[:4], frozen, batch_size=4)
  assert images.shape == (4, 16, 16, 3) and np.all(np.abs(images) <= 1.0)


def test_vq_ema_state_moves_by_its_ema_alone(trained):
  workdir, config, _ = trained("vq_ema")
  stats = _flat(checkpointing.load_stage1(workdir).params[vqgan.STATE_KEY])
  cluster_size, embed_avg, codes = (stats[f"quantize/{k}"]
                                    for k in ("cluster_size", "embed_avg", "embedding"))
  # Two updates moved the statistics away from their start (counts of 1 everywhere) ...
  assert not np.allclose(cluster_size, 1.0)
  # ... and the codes are still exactly what the EMA update makes of them: had the
  # optimiser (or the dead-code restart) touched any of the three, this would not hold.
  n, eps = cluster_size.sum(), config.model.ema_eps
  smoothed = (cluster_size + eps) / (n + CODES * eps) * n
  np.testing.assert_allclose(codes, embed_avg / smoothed[:, None], rtol=1e-5, atol=1e-7)
  # The optimiser holds no state for them.
  opt_state = _restore_raw(workdir, "trainer")["g_opt_state"]
  opt_paths = [jax.tree_util.keystr(path)
               for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
  assert opt_paths and not any(vqgan.STATE_KEY in p for p in opt_paths)
  assert not any("'quantize']['embedding'" in p for p in opt_paths)
  assert any("'quantize']['codebook_proj'" not in p and "'quant_conv'" in p for p in opt_paths)


def test_vq_ema_state_passes_through_grad_accumulation():
  """With micro-batches the state is carried from one to the next (traced, not run)."""
  config = stage1_config("vq_ema")
  config.grad_accum_steps = 2
  setup = stage1_trainer.Stage1Setup(config)
  state = jax.eval_shape(setup.init_state, setup.rng)
  batch = {"image": jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32)}
  new_state, _ = jax.eval_shape(functools.partial(setup.train_step, use_gan=False), state,
                                batch, None)
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  assert sorted(new_state.g_params[vqgan.STATE_KEY]["quantize"]) == [
      "cluster_size", "embed_avg", "embedding"]


def test_simvq_basis_is_the_initial_one(trained):
  workdir, config, _ = trained("simvq")
  basis = checkpointing.load_stage1(workdir).params[vqgan.STATE_KEY]["quantize"]["basis"]
  setup = stage1_trainer.Stage1Setup(config)
  g_key = jax.random.split(setup.rng)[0]  # Stage1Setup.init_state's generator key
  x = jnp.zeros((1, 16, 16, 3), jnp.float32)
  initial = jax.jit(lambda k: setup.model.init(k, x)[vqgan.STATE_KEY])(g_key)
  np.testing.assert_array_equal(basis, initial["quantize"]["basis"])


def test_stage2_on_fsq_tokens_trains_loads_and_samples(trained, tmp_path):
  stage1_dir, s1_config, _ = trained("fsq")
  tokens_dir = str(tmp_path / "tokens")
  config = transformer_tiny.get_config()
  config.first_stage.workdir = stage1_dir
  config.cond.kind, config.cond.cfg_dropout = "none", 0.0
  config.data.photos.photo_short_side = s1_config.data.photos.photo_short_side
  config.tokens_dir = tokens_dir
  config.async_checkpointing = False
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  for split in ("train", "validation"):
    export_tokens.export_tokens(config, stage1_dir, tokens_dir, split=split, batch_size=8)
  gpt_dir = str(tmp_path / "gpt")
  metrics = stage2_trainer.train_and_evaluate(config, gpt_dir)
  assert np.isfinite(metrics["val_loss"])

  loaded = handoff.load_stage2(gpt_dir)
  assert loaded.layout.n_codes == CODES and loaded.first_stage.n_embed == CODES
  assert loaded.first_stage.metadata["quantizer"] == "fsq"
  written = sample.run_sampling(gpt_dir, str(tmp_path / "samples"), num_samples=2,
                                batch_size=2, sliding_window_factor=1, top_k=8)
  assert written and all(os.path.isfile(p) for p in written.values())


# ----- configs (pure) -------------------------------------------------------------------


@pytest.mark.parametrize("kind,keys,named", [
    ("pq", {}, "model.quantizer"),
    ("fsq", {"n_embed": 1000}, "model.n_embed"),     # 4 * 4 * 2 = 32 codes
    ("lfq", {"lfq_bits": 6}, "model.n_embed"),       # 64 codes
    ("fsq", {"fsq_levels": (32, 1)}, "model.fsq_levels"),
    ("lfq", {"codebook_dim": 8}, "model.codebook_dim"),
    ("fsq", {"l2_normalize": True}, "model.l2_normalize"),
    ("simvq", {"restart_dead_codes": True}, "model.restart_dead_codes"),
    ("vq_ema", {"restart_dead_codes": True}, "model.restart_dead_codes"),
    ("vq_ema", {"ema_decay": 1.5}, "model.ema_decay"),
    ("lfq", {"lfq_temperature": 0.0}, "model.lfq_temperature"),
])
def test_quantizer_config_errors_name_the_key(kind, keys, named):
  config = stage1_config(kind if kind in KIND_KEYS else "vq")
  config.model.quantizer = kind
  for key, value in keys.items():
    config.model[key] = value
  with pytest.raises(config_lib.ConfigError, match=named.replace(".", r"\.")):
    config_lib.validate_vqgan_config(config)


def test_dead_code_restart_stays_available_for_vq():
  config = stage1_config("vq")
  config.model.restart_dead_codes = True
  assert config_lib.validate_vqgan_config(config) is None      # accepted for vq
  config.model.quantizer = "vq_ema"
  with pytest.raises(config_lib.ConfigError, match=r"restart_dead_codes"):
    config_lib.validate_vqgan_config(config)                     # refused for the others


def test_imagenet_fsq_config():
  from configs import vqgan_imagenet_f16_fsq  # pylint: disable=g-import-not-at-top
  config = vqgan_imagenet_f16_fsq.get_config()
  config_lib.validate_vqgan_config(config)
  meta = checkpointing.stage1_metadata(config, 0)
  assert (meta["quantizer"], meta["n_embed"], meta["lookup_dim"]) == ("fsq", 64000, 6)


def test_checkpoints_from_before_the_quantizer_keys_resume_as_vq():
  """A saved model config without the quantizer keys is the paper's VQ: resuming it with
  today's defaults is not a model change, but resuming it as another quantizer is."""
  current = checkpointing.config_to_dict(stage1_config("vq"))["model"]
  saved = {k: v for k, v in current.items() if k not in quantizers.QUANTIZER_DEFAULTS}
  checkpointing.check_same_model(saved, current, "old_run")
  current["quantizer"] = "fsq"
  with pytest.raises(checkpointing.CheckpointError, match="model.quantizer"):
    checkpointing.check_same_model(saved, current, "old_run")
