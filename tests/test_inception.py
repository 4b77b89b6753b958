"""Tests for the FID InceptionV3 (vqgan_jax.models.inception) and its weight converter.

The network runs once, at batch 2 on a 64x64 input (resized to 299 inside), in a
module-scoped fixture shared by every test that needs outputs or random weights.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import traverse_util

from vqgan_jax import convert_inception as conv
from vqgan_jax.models import inception

# Total size of pytorch-fid's FID InceptionV3 state dict without the
# `num_batches_tracked` counters: 23,850,960 trainable parameters (torchvision's
# inception_v3 without aux classifier, fc 2048 -> 1008) plus 34,432 BatchNorm running
# statistics. Obtained once by building that architecture (torchvision layout with
# FIDInceptionA/C/E_1/E_2 blocks) in torch 2.13 and summing
# `v.numel()` over its state dict; it has 472 such arrays (94 BasicConv2d x 5 + fc x 2).
FID_INCEPTION_NUM_PARAMS = 23_885_392
FID_INCEPTION_NUM_ARRAYS = 472


def _random_variables(seed=0):
  """Random weights for every parameter, drawn in numpy.

  Much faster than `model.init` on CPU (which spends about a minute drawing 24M
  truncated normals with threefry), and the BatchNorm statistics are non-trivial.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in conv.expected_shapes().items():
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel":  # He-normal, so activations keep their scale through 94 layers
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:  # bias, mean
      value = rng.uniform(-0.1, 0.1, shape).astype(np.float32)
    flat[path] = value
  return {"params": traverse_util.unflatten_dict(flat, sep="/")}


@pytest.fixture(scope="module")
def model_and_outputs():
  model = inception.InceptionV3()
  variables = _random_variables()
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-1.0, maxval=1.0)
  out = jax.jit(model.apply)(variables, x)
  return model, variables, jax.device_get(out)


@pytest.fixture(scope="module")
def saved_npz(model_and_outputs, tmp_path_factory):
  _, variables, _ = model_and_outputs
  path = tmp_path_factory.mktemp("inception") / "inception_fid.npz"
  conv.save_params_npz(variables, path)
  return path


# ---------------------------------------------------------------- architecture


def test_output_shapes_from_resized_input(model_and_outputs):
  _, _, out = model_and_outputs
  assert out["pool"].shape == (2, inception.FEATURE_DIM)
  assert out["logits"].shape == (2, inception.NUM_CLASSES)
  assert np.all(np.isfinite(out["pool"])) and np.all(np.isfinite(out["logits"]))
  assert np.all(out["pool"] >= 0)  # mean of ReLU outputs
  assert not np.allclose(out["pool"][0], out["pool"][1])


def test_logits_are_fc_of_pool(model_and_outputs):
  _, variables, out = model_and_outputs
  fc = variables["params"]["fc"]
  np.testing.assert_allclose(out["logits"], out["pool"] @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-4)


def test_param_count_and_names_match_pytorch_fid():
  shapes = conv.expected_shapes()
  assert len(shapes) == FID_INCEPTION_NUM_ARRAYS
  assert sum(int(np.prod(s)) for s in shapes.values()) == FID_INCEPTION_NUM_PARAMS
  assert shapes["Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
  assert shapes["Conv2d_1a_3x3/bn/var"] == (32,)
  assert shapes["Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
  assert shapes["Mixed_7c/branch3x3dbl_3b/conv/kernel"] == (3, 1, 384, 384)
  assert shapes["Mixed_7c/branch_pool/conv/kernel"] == (1, 1, 2048, 192)
  assert shapes["fc/kernel"] == (2048, 1008)
  top = {k.split("/")[0] for k in shapes}
  assert top == {"Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                 "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"}


def test_fid_pooling_semantics():
  ones = jnp.ones((1, 5, 5, 2))
  # count_include_pad=False: border windows average real pixels only (TF SAME).
  np.testing.assert_allclose(inception._avg_pool_3x3_same(ones), 1.0)
  # Max pool padding must never win: all-negative input stays negative at the border.
  neg = -1.0 - jnp.arange(25.0).reshape(1, 5, 5, 1)
  pooled = inception._max_pool_3x3_same(neg)
  assert float(pooled[0, 0, 0, 0]) == -1.0 and float(pooled.max()) < 0


def _torch_bilinear_reference(x, out_h, out_w):
  """numpy transcription of torch's F.interpolate(bilinear, align_corners=False).

  Source coordinate (i + 0.5) * in / out - 0.5, clamped below at 0; the upper
  neighbour is clamped to the last pixel. (Checked once against torch 2.13.)
  """
  def weights(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), i0), 1 - lam)
    np.add.at(w, (np.arange(n_out), i1), lam)
    return w

  wh, ww = weights(x.shape[1], out_h), weights(x.shape[2], out_w)
  return np.einsum("oh,bhwc,pw->bopc", wh, x.astype(np.float64), ww, optimize=True)


@pytest.mark.parametrize("shape", [(1, 64, 48, 3), (1, 350, 420, 3)])
def test_resize_matches_torch_bilinear_align_corners_false(shape):
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  ours = np.asarray(inception.resize_to_input(jnp.asarray(x)))
  assert ours.shape == (1, 299, 299, 3)
  # The reference computes source coordinates in float64; torch and JAX both use
  # float32 (e.g. the scale 350/299), which moves samples by up to ~4e-5 px and values
  # of this rough random image by up to ~5e-5. Against torch itself the JAX resize
  # agreed to 2e-7 on these shapes.
  np.testing.assert_allclose(ours, _torch_bilinear_reference(x, 299, 299), atol=2e-4)


def test_rejects_non_rgb_input():
  with pytest.raises(ValueError, match="NHWC RGB"):
    inception.InceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))


# ---------------------------------------------------------------- weight files


def test_weight_npz_round_trip(model_and_outputs, saved_npz):
  _, variables, _ = model_and_outputs
  loaded = conv.load_inception_params(saved_npz)
  flat_a = conv.flatten_params(variables)
  flat_b = conv.flatten_params(loaded)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
  assert (jax.tree_util.tree_structure(loaded)
          == jax.tree_util.tree_structure(jax.tree_util.tree_map(np.asarray, variables)))


def test_checksum(saved_npz):
  good = conv.file_sha256(saved_npz)
  conv.load_inception_params(saved_npz, expected_sha256=good.upper())
  with pytest.raises(ValueError, match=r"inception_fid\.npz.*SHA-256 mismatch.*" + good):
    conv.load_inception_params(saved_npz, expected_sha256="0" * 64)


def test_wrong_shape_missing_and_unused_keys_are_named(model_and_outputs, tmp_path):
  _, variables, _ = model_and_outputs
  flat = conv.flatten_params(variables)
  flat["Mixed_6c/branch1x1/conv/kernel"] = np.zeros((1, 1, 768, 7), np.float32)
  del flat["Mixed_7a/branch3x3_2/bn/mean"]
  flat["Mixed_9z/extra"] = np.zeros(3, np.float32)
  path = tmp_path / "broken.npz"
  conv.save_params_npz(flat, path)
  with pytest.raises(ValueError) as err:
    conv.load_inception_params(path)
  msg = str(err.value)
  assert "broken.npz" in msg
  assert "Mixed_6c/branch1x1/conv/kernel: expected (1, 1, 768, 192), found (1, 1, 768, 7)" in msg
  assert "Mixed_7a/branch3x3_2/bn/mean" in msg
  assert "Mixed_9z/extra" in msg
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    conv.load_inception_params(tmp_path / "absent.npz")


def _fake_torch_state_dict(variables):
  """A pytorch-fid-style state dict (numpy) holding the given Flax weights."""
  sd = {}
  for path, value in conv.flatten_params(variables).items():
    parts = path.split("/")
    module, leaf = ".".join(parts[:-1]), parts[-1]
    if path == "fc/kernel":
      sd["fc.weight"] = value.T  # (in, out) -> torch Linear's (out, in)
    elif leaf == "kernel":
      sd[module + ".weight"] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif module == "fc":
      sd["fc.bias"] = value
    else:
      torch_leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                    "var": "running_var"}[leaf]
      sd[f"{module}.{torch_leaf}"] = value
      if leaf == "var":
        sd[module + ".num_batches_tracked"] = np.array(0, np.int64)
  return sd


def test_convert_state_dict(model_and_outputs):
  _, variables, _ = model_and_outputs
  sd = _fake_torch_state_dict(variables)
  assert len(sd) == FID_INCEPTION_NUM_ARRAYS + 94  # + one counter per BatchNorm
  flat = conv.convert_state_dict(sd)
  for k, v in conv.flatten_params(variables).items():
    np.testing.assert_array_equal(flat[k], v, err_msg=k)

  sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  sd["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
  del sd["Mixed_6e.branch_pool.bn.running_var"]
  with pytest.raises(ValueError) as err:
    conv.convert_state_dict(sd)
  msg = str(err.value)
  assert "AuxLogits.fc.weight" in msg
  assert "Mixed_5b.branch1x1.conv.weight: expected (64, 192, 1, 1), found (64, 192, 3, 3)" in msg
  assert "Mixed_6e.branch_pool.bn.running_var" in msg


def test_convert_cli_with_torch(model_and_outputs, tmp_path):
  torch = pytest.importorskip("torch")
  _, variables, _ = model_and_outputs
  sd = {k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in _fake_torch_state_dict(variables).items()}
  src = tmp_path / "pt_inception-fake.pth"
  torch.save(sd, src)
  out = tmp_path / "converted.npz"
  assert conv.convert_file(str(src), str(out), check_hash=False).startswith(f"wrote {out}")
  loaded = conv.flatten_params(conv.load_inception_params(out))
  for k, v in conv.flatten_params(variables).items():
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)


def test_read_torch_state_dict_needs_torch(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("no torch here")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ImportError, match=r"x\.pth needs PyTorch"):
    conv.read_torch_state_dict(tmp_path / "x.pth")
