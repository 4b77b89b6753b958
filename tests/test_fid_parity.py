"""FID pipeline parity with pytorch-fid (PyTorch reference).

`tests/taming_reference.py --fid` runs once (module fixture) in the reference venv: it builds
pytorch-fid's `InceptionV3([3])` (use_fid_inception=True: torchvision's Inception3 with
pytorch-fid's FIDInceptionA/C/E_1/E_2 blocks) through pytorch-fid's own code, with the
weight download replaced by random weights, writes uint8 PNG images of two sizes (64x64,
upsampled to 299, and 320x400, downsampled) and records pytorch-fid's 2048-d pool features
of them from its `get_activations` (PNG -> PIL -> ToTensor [0, 1] -> bilinear resize to 299
-> 2x - 1 -> network). It also records `calculate_frechet_distance` on the statistics
(np.mean, np.cov, as pytorch-fid computes them) of synthetic feature sets.

Here the random state dict goes through `vqgan_jax.convert_inception` (convert, save, load
with shape checks) into our Flax `InceptionV3`, which takes the same images as our data
pipeline gives them (uint8 / 127.5 - 1, in [-1, 1]) and resizes inside. The features must
agree within 1e-4 (relative to the largest feature) and `metrics.frechet_distance` must
equal pytorch-fid's on the same statistics within 1e-6 relative.

The reference interpreter is $VQGAN_TAMING_PYTHON, else .venv-taming/bin/python (made by
`make test`, see requirements-taming.txt); without one, or without torchvision or
pytorch-fid in it, the tests skip saying so.
"""

import os
import subprocess

import jax
import numpy as np
import pytest

from vqgan_jax import convert_inception, metrics
from vqgan_jax.data import to_float
from vqgan_jax.models import inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURE_TOL = 1e-4
FD_TOL = 1e-6
# XLA:CPU compiles the network about twice as fast without LLVM's optimisations; the
# arithmetic is the same (no fast-math either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
NUM_IMAGE_SETS = 2


def _reference_python():
  return os.environ.get("VQGAN_TAMING_PYTHON") or os.path.join(REPO, ".venv-taming", "bin",
                                                                 "python")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  python = _reference_python()
  if not os.path.exists(python):
    pytest.skip(f"no taming-transformers reference interpreter at {python} (run `make "
                "taming-reference` or set VQGAN_TAMING_PYTHON)")
  out = str(tmp_path_factory.mktemp("fid_ref"))
  proc = subprocess.run([python, os.path.join(REPO, "tests", "taming_reference.py"), "--fid",
                         out], capture_output=True, text=True, timeout=600, check=False)
  if proc.returncode == 3:
    pytest.skip(f"the reference venv at {python} is incomplete: {proc.stdout.strip()[-300:]}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  data = dict(np.load(os.path.join(out, "fid_reference.npz")))
  data["dir"] = out
  return data


def rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def variables(ref, tmp_path_factory):
  """The reference's random Inception3 state dict, converted and loaded as users do."""
  state = dict(np.load(os.path.join(ref["dir"], "inception_state.npz")))
  flat = convert_inception.convert_state_dict(state)
  assert len(flat) == 472 and sum(k.endswith("num_batches_tracked") for k in state) == 94
  path = tmp_path_factory.mktemp("inception") / "inception_fid.npz"
  convert_inception.save_params_npz(flat, path)
  return convert_inception.load_inception_params(path)


def test_versions(ref):
  print("reference:", {k: str(ref[k]) for k in ("pytorch_fid_version", "scipy_version",
                                                "torch_version")})
  assert str(ref["pytorch_fid_version"]) == "0.3.0"


@pytest.mark.parametrize("index", range(NUM_IMAGE_SETS))
def test_pool_features_match_pytorch_fid(ref, variables, index):
  """Same uint8 images, each side's whole pipeline (resize to 299 included)."""
  images = ref[f"images_{index}"]
  x = to_float(images)
  apply = jax.jit(inception.InceptionV3().apply).lower(variables, x).compile(
      compiler_options=FAST_COMPILE)
  ours = np.asarray(apply(variables, x)["pool"])
  theirs = ref[f"pool_{index}"]
  err = rel_err(ours, theirs)
  print(f"{images.shape[1]}x{images.shape[2]} -> 299: pool features max |diff| "
        f"{np.max(np.abs(ours - theirs)):.2e}, relative to the largest feature "
        f"({np.max(np.abs(theirs)):.3f}) {err:.2e}")
  assert err < FEATURE_TOL


@pytest.mark.parametrize("case", ["full_rank", "rank_deficient", "same"])
def test_frechet_distance_matches_pytorch_fid(ref, case):
  mu0, sigma0 = ref[f"fd_{case}_mu0"], ref[f"fd_{case}_sigma0"]
  mu1, sigma1 = ref[f"fd_{case}_mu1"], ref[f"fd_{case}_sigma1"]
  ours = metrics.frechet_distance(mu0, sigma0, mu1, sigma1)
  theirs = float(ref[f"fd_{case}"])
  scale = max(abs(theirs), float(np.trace(sigma0) + np.trace(sigma1)) if case == "same" else 0)
  err = abs(ours - theirs) / scale
  # Our streaming statistics of the same features against np.mean / np.cov.
  stats_errs = []
  for k in (0, 1):
    mu, sigma = metrics.FeatureStats().update(ref[f"fd_{case}_features{k}"]).stats()
    stats_errs += [rel_err(mu, ref[f"fd_{case}_mu{k}"]), rel_err(sigma, ref[f"fd_{case}_sigma{k}"])]
  print(f"{case}: FD ours {ours!r}, pytorch-fid {theirs!r}, relative difference {err:.1e}; "
        f"FeatureStats vs np.mean/np.cov {max(stats_errs):.1e}")
  assert err < FD_TOL
  assert max(stats_errs) < 1e-10
