"""Stage-1 trainer end to end on a tiny config: checkpoints, resume, hand-off, bad configs."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from configs import vqgan_tiny
from vqgan_jax import checkpointing, config_lib
from vqgan_jax.training import stage1 as stage1_trainer


def tiny_config():
  return vqgan_tiny.get_config()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage1"))
  config = tiny_config()
  metrics = stage1_trainer.train_and_evaluate(config, workdir)
  return config, workdir, metrics


def test_three_steps_write_checkpoint_logs_and_images(trained):
  config, workdir, metrics = trained
  assert checkpointing.latest_step(workdir) == 3
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert os.path.exists(os.path.join(workdir, "images", "reconstructions_0000003.png"))
  for key in ("val_l1", "val_psnr", "val_codebook_usage", "val_code_perplexity"):
    assert np.isfinite(metrics[key]), key
  assert 0 < metrics["val_codebook_usage"] <= 100


def test_second_run_resumes_and_continues(trained):
  config, workdir, _ = trained
  before = checkpointing.load_stage1(workdir)
  config = tiny_config()
  config.num_train_steps = 5
  stage1_trainer.train_and_evaluate(config, workdir)
  assert checkpointing.latest_step(workdir) == 5
  manager = checkpointing.make_manager(workdir, read_only=True)
  assert checkpointing.read_metadata(manager, 5)["step"] == 5
  after = checkpointing.load_stage1(workdir)
  assert after.step == 5 and before.step == 3
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before.params),
                                                       jax.tree_util.tree_leaves(after.params))]
  assert any(changed)


def test_stage1_handoff_metadata_and_index_api(trained):
  config, workdir, _ = trained
  frozen = checkpointing.load_stage1(workdir, step=3)
  assert frozen.n_embed == 32 and frozen.downsample_factor == 2
  assert frozen.metadata["latent_grid"] == [8, 8]
  assert frozen.config.model.ch_mult == (1, 2)
  x = np.zeros((2, 16, 16, 3), np.float32)
  indices = frozen.model.apply({"params": frozen.params}, x,
                               method=frozen.model.encode_to_indices)
  assert indices.shape == (2, 8, 8)
  with pytest.raises(checkpointing.CheckpointError, match="no step 7"):
    checkpointing.load_stage1(workdir, step=7)


def test_resume_with_different_model_is_refused(trained):
  _, workdir, _ = trained
  config = tiny_config()
  config.model.n_embed = 64
  config.num_train_steps = 100
  with pytest.raises(checkpointing.CheckpointError, match="n_embed"):
    stage1_trainer.train_and_evaluate(config, workdir)


def test_missing_workdir_errors_name_the_path(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match="nowhere"):
    checkpointing.load_stage1(str(tmp_path / "nowhere"))
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(checkpointing.CheckpointError, match="no finished checkpoint"):
    checkpointing.load_stage1(str(tmp_path / "empty"))


@pytest.mark.parametrize("key,value,message", [
    ("model.resolution", 17, "model.resolution"),
    ("model.attn_resolutions", (5,), "model.attn_resolutions"),
    ("model.n_embed", 0, "model.n_embed"),
    ("data.image_size", 17, "data.image_size"),
    ("loss.disc_loss", "wasserstein", "loss.disc_loss"),
])
def test_impossible_configs_fail_naming_the_key(key, value, message):
  config = tiny_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    config_lib.validate_vqgan_config(config)


def test_unknown_config_key_is_named():
  config = tiny_config()
  with config.unlocked():
    config.model.n_embedd = 10
  with pytest.raises(config_lib.ConfigError, match="model.n_embedd.*n_embed"):
    config_lib.validate_vqgan_config(config)


def test_demo_and_paper_configs_validate():
  from configs import vqgan_custom, vqgan_demo, vqgan_ffhq_f16_1024, vqgan_imagenet_f16_16384
  for module in (vqgan_demo, vqgan_ffhq_f16_1024, vqgan_imagenet_f16_16384, vqgan_custom):
    config = module.get_config()
    if module is vqgan_custom:
      config.data.folder.folder_path = "/some/folder"
    config_lib.validate_vqgan_config(config)
  imagenet = vqgan_imagenet_f16_16384.get_config()
  assert imagenet.model.n_embed == 16384 and imagenet.loss.disc_start == 250001
  assert json.loads(imagenet.to_json_best_effort())["model"]["ch_mult"] == [1, 1, 2, 2, 4]
