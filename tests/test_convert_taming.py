"""Parity of converted taming-transformers checkpoints with the PyTorch reference.

tests/taming_reference.py runs once (module fixture) in the reference venv: it builds tiny
taming VQModel / Net2NetTransformer models with random weights, saves Lightning-style
checkpoints with their yaml configs and records the reference outputs. Here (no torch)
`vqgan_jax.convert_taming` converts them, the workdirs are loaded through the project's
own loaders (`checkpointing.load_stage1`, `handoff.load_stage2`) and every output
is compared: encoder output, code indices, decoder output, discriminator logits, the
transformer's logits over image codes and greedy samples.

The reference interpreter is $VQGAN_TAMING_PYTHON, else .venv-taming/bin/python (made by
`make test`, see requirements-taming.txt); without one the tests skip saying so.
"""

import importlib.util
import os
import pickle
import subprocess
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from vqgan_jax import handoff
from vqgan_jax import conditioning
from vqgan_jax import checkpointing, convert_taming, sampling
from vqgan_jax.training import stage1 as stage1_trainer
from vqgan_jax.training import stage2 as stage2_trainer
from vqgan_jax import torch_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def _reference_python():
  return os.environ.get("VQGAN_TAMING_PYTHON") or os.path.join(REPO, ".venv-taming", "bin",
                                                                 "python")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  python = _reference_python()
  if not os.path.exists(python):
    pytest.skip(f"no taming-transformers reference interpreter at {python} (run `make "
                "taming-reference` or set VQGAN_TAMING_PYTHON)")
  out = str(tmp_path_factory.mktemp("taming_ref"))
  proc = subprocess.run([python, os.path.join(REPO, "tests", "taming_reference.py"), out],
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  data = dict(np.load(os.path.join(out, "reference.npz")))
  data["dir"] = out
  return data


@pytest.fixture(scope="module")
def converted(ref, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("converted"))
  dirs = {}
  for name in ("vqgan", "uncond", "class", "spatial"):
    dirs[name] = os.path.join(out, name)
    convert_taming.convert(os.path.join(ref["dir"], f"{name}.ckpt"),
                           os.path.join(ref["dir"], f"{name}.yaml"), dirs[name],
                           keep_discriminator=name == "vqgan")
  return dirs


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def max_diff(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def encode(frozen, x):
  """Code indices of x under a restored VQGAN, jitted (one compile, not one per op)."""
  return jax.jit(lambda p, x: handoff.encode(frozen.model, p, x))(frozen.params, x)


def _load_config_file(path):
  spec = importlib.util.spec_from_file_location("converted_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ----------------------------------------------------------------------------- reader


def test_both_readers_equal_torch_on_every_state_dict(ref):
  """Checked in the reference venv (tests/taming_reference.py: check_readers)."""
  assert bool(ref["reader_same_keys"])
  assert float(ref["reader_numpy_max_diff"]) == 0.0
  assert float(ref["reader_torch_max_diff"]) == 0.0


def test_reader_matches_torch_for_strided_half_bf16_int64(ref):
  probes = torch_checkpoint.load(os.path.join(ref["dir"], "probes.pt"))["probes"]
  for name in ("strided", "half", "bf16", "long"):
    ours = probes[name].numpy()
    np.testing.assert_array_equal(ours.astype(np.float64) if name == "bf16" else ours,
                                  ref[f"probe_{name}"])
  assert probes["half"].numpy().dtype == np.float16
  assert probes["long"].numpy().dtype == np.int64


def test_reader_keeps_unknown_objects_inert_and_names_bad_files(ref, tmp_path):
  whole = torch_checkpoint.load(os.path.join(ref["dir"], "uncond.ckpt"))
  assert isinstance(whole["hparams"], torch_checkpoint.Opaque)  # argparse.Namespace
  assert whole["hparams"].name == "argparse.Namespace"
  legacy = os.path.join(ref["dir"], "legacy.ckpt")
  with pytest.raises(torch_checkpoint.TorchCheckpointError, match="legacy.*legacy.ckpt|"
                     "legacy.ckpt.*legacy"):
    torch_checkpoint.load(legacy)
  text = tmp_path / "notes.ckpt"
  text.write_text("hello")
  with pytest.raises(torch_checkpoint.TorchCheckpointError, match="notes.ckpt"):
    torch_checkpoint.load(str(text))


class _Payload:
  """Pickles as a call of os.system: what a malicious checkpoint would contain."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_reader_never_runs_code_from_the_file(tmp_path):
  """Needs no torch: a hand-made zip checkpoint whose pickle calls os.system."""
  marker = tmp_path / "executed"
  path = tmp_path / "evil.ckpt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}, "x": _Payload(marker)},
                                                 protocol=2))
  loaded = torch_checkpoint.load(str(path))
  assert not marker.exists()
  assert isinstance(loaded["x"], torch_checkpoint.Opaque)
  assert loaded["x"].name in ("posix.system", "os.system")


def test_kept_lpips_layers_must_equal_the_packaged_ones():
  """Needs no torch: LPIPS linear layers in the reference layout (1, C, 1, 1)."""
  from vqgan_jax.models import lpips  # pylint: disable=g-import-not-at-top
  packaged = lpips.load_lpips_params()
  state = {f"lin{i}.model.1.weight": np.asarray(packaged[f"lin_{i}"]["kernel"]).transpose(3, 2, 0, 1)
           for i in range(5)}
  state["net.slice1.0.weight"] = np.zeros((64, 3, 3, 3), np.float32)
  dropped = {}
  convert_taming._check_lpips(state, "x.ckpt", "loss.", dropped)  # pylint: disable=protected-access
  assert len(dropped) == 6
  state["lin2.model.1.weight"] = state["lin2.model.1.weight"] + 1e-3
  with pytest.raises(convert_taming.ConversionError, match="lin2.model.1.weight.*differs"):
    convert_taming._check_lpips(state, "x.ckpt", "loss.", {})  # pylint: disable=protected-access
  with pytest.raises(convert_taming.ConversionError, match="loss.perceptual_loss.extra"):
    convert_taming._check_lpips({"extra": np.zeros(1)}, "x.ckpt", "loss.", {})  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- stage 1


def test_vqgan_parity_through_load_stage1(ref, converted):
  frozen = checkpointing.load_stage1(converted["vqgan"])  # converted keeping the discriminator
  assert frozen.step == 4321 and frozen.n_embed == 64

  @jax.jit
  def outputs(params, x):
    def run(m, x):
      z_q, _, info = m.encode(x)
      return m.quant_conv(m.encoder(x)), z_q, info["indices"], m.decode(z_q)
    return frozen.model.apply({"params": params}, x, method=run)

  h, z_q, indices, dec = outputs(frozen.params, nhwc(ref["vq_x"]))
  diffs = {"encoder h": max_diff(h, nhwc(ref["vq_h"])),
           "quantized z": max_diff(z_q, nhwc(ref["vq_quant"])),
           "decoder output": max_diff(dec, nhwc(ref["vq_dec"]))}
  print("VQGAN max abs diffs:", diffs)
  assert max(diffs.values()) < TOL, diffs
  np.testing.assert_array_equal(np.asarray(indices).reshape(2, -1), ref["vq_indices"])


def test_kept_discriminator_parity_config_file_and_resume_state(ref, converted):
  workdir = converted["vqgan"]
  frozen = checkpointing.load_stage1(workdir)
  config = _load_config_file(os.path.join(workdir, "config.py"))
  assert checkpointing.config_to_dict(config) == frozen.metadata["config"]
  assert config.loss.disc_start == 100 and config.loss.disc_num_layers == 2
  # The trainer's resume path restores every item it needs (fresh optimiser states).
  setup = stage1_trainer.Stage1Setup(config)
  abstract = jax.eval_shape(setup.init_state, setup.rng)
  manager = checkpointing.make_manager(workdir, read_only=True)
  restored = checkpointing.restore(manager, frozen.step, abstract.g_params, abstract.trainer)
  trainer = restored["trainer"]
  assert int(trainer.step) == 4321
  logits = jax.jit(lambda v, x: setup.disc.apply(v, x, train=False))(
      {"params": trainer.d_params, "batch_stats": trainer.d_batch_stats}, nhwc(ref["vq_x"]))
  diff = max_diff(logits, nhwc(ref["disc_logits"]))
  print("discriminator max abs diff:", diff)
  assert diff < TOL
  assert frozen.metadata["converted_from"]["global_step"] == 4321


def test_without_keep_discriminator_the_loss_keys_are_dropped(ref):
  path = os.path.join(ref["dir"], "vqgan.ckpt")
  state, rest = torch_checkpoint.load_state_dict(path)
  assert rest["global_step"] == 4321 and isinstance(rest["hparams"], torch_checkpoint.Opaque)
  model = convert_taming.read_yaml(os.path.join(ref["dir"], "vqgan.yaml"))
  config = convert_taming.vqgan_config(model, "vqgan.yaml")
  params, disc, dropped = convert_taming.convert_vqgan(state, "", config, path)
  assert disc is None
  assert sorted(dropped) == sorted(k for k in state if k.startswith("loss."))
  assert len(dropped) == 16  # 2-layer PatchGAN: 3 convs + 2 BatchNorms (5 entries each)
  assert params["quantize"]["embedding"].shape == (64, 8)


# ----------------------------------------------------------------------------- stage 2


def _condition(loaded, ref, name, x):
  layout, b = loaded.layout, x.shape[0]
  if name == "uncond":
    return conditioning.condition_tokens(layout, b), None
  if name == "class":
    return conditioning.condition_tokens(layout, b, labels=ref["labels"]), None
  cond = loaded.cond_stage
  codes = encode(cond, nhwc(ref["segmentation"]))
  return conditioning.condition_tokens(layout, b, cond_codes=codes), codes


@pytest.mark.parametrize("name", ["uncond", "class", "spatial"])
def test_transformer_parity_through_load_stage2(ref, converted, name):
  loaded = handoff.load_stage2(converted[name])
  layout, first = loaded.layout, loaded.first_stage
  x = nhwc(ref["vq_x"])
  image = np.asarray(encode(first, x)).reshape(2, -1)
  np.testing.assert_array_equal(image, ref[f"{name}_z_indices"])
  prefix, cond_codes = _condition(loaded, ref, name, x)
  if cond_codes is not None:
    np.testing.assert_array_equal(np.asarray(cond_codes).reshape(2, -1), ref[f"{name}_c_indices"])
  p = prefix.shape[1]
  assert p == loaded.prefix_len
  seq = jnp.concatenate([prefix, jnp.asarray(image, jnp.int32)], axis=1)
  logits = jax.jit(loaded.model.apply)({"params": loaded.params}, seq[:, :-1])
  ours = np.asarray(logits[:, p - 1:, :layout.n_codes])
  diff = max_diff(ours, ref[f"{name}_logits"][..., :layout.n_codes])
  print(f"{name} transformer logits max abs diff:", diff)
  assert diff < TOL
  greedy = sampling.sample({"params": loaded.params}, loaded.model, prefix, image.shape[1],
                           jax.random.PRNGKey(0), temperature=0.0,
                           num_image_codes=layout.n_codes)
  np.testing.assert_array_equal(np.asarray(greedy), ref[f"{name}_greedy"])


def test_transformer_workdir_config_vocab_and_resume_state(converted):
  workdir = converted["class"]
  loaded = handoff.load_stage2(workdir)
  assert loaded.step == 4321 and loaded.layout.num_classes == 10
  assert loaded.layout.range("class") == (64, 74)
  config = _load_config_file(os.path.join(workdir, "config.py"))
  assert checkpointing.config_to_dict(config) == loaded.metadata["config"]
  assert config.first_stage.workdir == os.path.join(workdir, "first_stage")
  setup = stage2_trainer.Stage2Setup(config, loaded.first_stage, None)
  assert setup.layout == loaded.layout
  abstract = jax.eval_shape(setup.init_state, setup.rng)
  manager = checkpointing.make_manager(workdir, read_only=True)
  restored = checkpointing.restore(manager, 4321, abstract.params, abstract.trainer)
  assert int(restored["trainer"].step) == 4321


# ----------------------------------------------------------------------------- errors


def _no_leftovers(parent, name):
  return [n for n in os.listdir(parent) if n.startswith(name)]


def test_bad_inputs_fail_naming_the_file_or_key_and_write_nothing(ref, tmp_path):
  d = ref["dir"]
  out = str(tmp_path / "out")
  with pytest.raises(convert_taming.ConversionError, match="missing.ckpt"):
    convert_taming.convert(os.path.join(d, "missing.ckpt"), os.path.join(d, "vqgan.yaml"), out)
  with pytest.raises(convert_taming.ConversionError, match="vqgan.yaml"):
    convert_taming.convert(os.path.join(d, "vqgan.yaml"), os.path.join(d, "vqgan.yaml"), out)
  with pytest.raises(convert_taming.ConversionError, match="encoder.not_in_the_model.weight"):
    convert_taming.convert(os.path.join(d, "vqgan_extra_key.ckpt"),
                           os.path.join(d, "vqgan.yaml"), out)
  with open(os.path.join(d, "vqgan.yaml")) as f:
    doc = yaml.safe_load(f)
  doc["model"]["params"]["n_embed"] = 32
  small = tmp_path / "small.yaml"
  small.write_text(yaml.safe_dump(doc))
  with pytest.raises(convert_taming.ConversionError,
                     match=r"quantize.embedding.weight: checkpoint \(64, 8\).*\(32, 8\)"):
    convert_taming.convert(os.path.join(d, "vqgan.ckpt"), str(small), out)
  doc["model"]["target"] = "taming.models.vqgan.GumbelVQ"
  other = tmp_path / "gumbel.yaml"
  other.write_text(yaml.safe_dump(doc))
  with pytest.raises(convert_taming.ConversionError, match="GumbelVQ"):
    convert_taming.convert(os.path.join(d, "vqgan.ckpt"), str(other), out)
  del doc["model"]["params"]["ddconfig"]["ch"]
  doc["model"]["target"] = convert_taming.VQMODEL
  no_ch = tmp_path / "no_ch.yaml"
  no_ch.write_text(yaml.safe_dump(doc))
  with pytest.raises(convert_taming.ConversionError, match="no_ch.yaml.*'ch'"):
    convert_taming.convert(os.path.join(d, "vqgan.ckpt"), str(no_ch), out)
  with open(os.path.join(d, "uncond.yaml")) as f:
    doc = yaml.safe_load(f)
  doc["model"]["params"]["cond_stage_config"] = {
      "target": "taming.modules.misc.coord.CoordStage", "params": {"n_embed": 64,
                                                                  "down_factor": 4}}
  coord = tmp_path / "coord.yaml"
  coord.write_text(yaml.safe_dump(doc))
  with pytest.raises(convert_taming.ConversionError, match="coord.yaml.*CoordStage"):
    convert_taming.convert(os.path.join(d, "uncond.ckpt"), str(coord), out)
  assert not _no_leftovers(str(tmp_path), "out")
  os.makedirs(out)
  (tmp_path / "out" / "keep.txt").write_text("x")
  with pytest.raises(convert_taming.ConversionError, match="not empty.*--overwrite"):
    convert_taming.convert(os.path.join(d, "vqgan.ckpt"), os.path.join(d, "vqgan.yaml"), out)
  assert os.listdir(out) == ["keep.txt"]
  with pytest.raises(convert_taming.ConversionError):
    convert_taming.convert(os.path.join(d, "legacy.ckpt"), os.path.join(d, "vqgan.yaml"), out)
  assert os.listdir(out) == ["keep.txt"]
  assert sorted(_no_leftovers(str(tmp_path), "out")) == ["out"]
  convert_taming.convert(os.path.join(d, "vqgan.ckpt"), os.path.join(d, "vqgan.yaml"), out,
                         overwrite=True)
  assert sorted(os.listdir(out)) == ["checkpoints", "config.py"]
  assert sorted(_no_leftovers(str(tmp_path), "out")) == ["out"]
