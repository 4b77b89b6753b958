"""Loss-level parity with taming-transformers' training losses (PyTorch reference).

`tests/taming_reference.py --loss` runs once (module fixture) in the reference venv. It builds
a tiny VQModel whose loss is `VQLPIPSWithDiscriminator` (disc_start=3) with random weights
for all three networks: the generator, the PatchGAN discriminator and LPIPS (torchvision's
VGG16 definition without downloaded weights, random linear layers). It runs the
reference's generator pass (optimizer_idx 0) and discriminator pass (optimizer_idx 1) one
step before and one step at disc_start and records losses, log entries (d_weight, ...),
the gradients of both networks and the discriminator's BatchNorm statistics. Here the same
weights (VQModel and discriminator through `convert_taming`, LPIPS by renaming) go into our
`Stage1Setup.generator_gradients` / `discriminator_gradients`, on the same images.

Stage 2: the reference `Net2NetTransformer`'s loss (pkeep=1) against
`losses.token_cross_entropy` on identical logits/targets, and through a converted GPT;
pkeep < 1 against the reference's corruption rule on statistics.

Known differences, measured and pinned here rather than hidden (see each test):
  * LPIPS dropout: in a Lightning run `model.train()` also puts taming's LPIPS in training
    mode, so a Dropout(p=0.5) acts before each LPIPS linear layer; ours has none. The
    reference side runs LPIPS in eval mode.
  * BatchNorm running variance: torch updates it with the unbiased batch variance
    (n / (n - 1)), flax with the biased one; and the reference's generator pass (the
    discriminator in training mode) updates the statistics too. Neither changes a loss or
    gradient in training (batch statistics are used); they change eval-mode logits.
  * Before disc_start the reference still runs the discriminator with disc_factor=0 (zero
    loss and gradients, but Adam steps and BatchNorm updates); our trainer skips it.
  * Not a loss difference but an input one, outside these tests: Lightning 1.x runs the
    reference's training_step again for the discriminator after the generator's optimiser
    step, so its discriminator sees reconstructions of the updated generator; our train
    step feeds the discriminator the reconstructions of the same forward pass (before the
    update). Here both sides get the same reconstruction.

The reference interpreter is $VQGAN_TAMING_PYTHON, else .venv-taming/bin/python (made by
`make test`, see requirements-taming.txt); without one, or without torchvision in it, the
tests skip saying so.
"""

import dataclasses
import importlib
import math
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vqgan_jax import convert_taming, losses, torch_checkpoint
from vqgan_jax.models import lpips

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL_TOL = 1e-4
# XLA:CPU compiles these one-off programs about twice as fast without LLVM's optimisations;
# the arithmetic is the same (no fast-math either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _find(name, modules):
  """`name` from the first of `modules` that has it (modules are being reorganised)."""
  for module in modules:
    try:
      mod = importlib.import_module(module)
    except ModuleNotFoundError:
      continue
    if hasattr(mod, name):
      return getattr(mod, name)
  raise ImportError(f"{name} is in none of {modules}")


def _stage1():
  try:
    from vqgan_jax.training import stage1  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError:
    from vqgan_jax import stage1_trainer as stage1  # pylint: disable=g-import-not-at-top
  return stage1


def _reference_python():
  return os.environ.get("VQGAN_TAMING_PYTHON") or os.path.join(REPO, ".venv-taming", "bin",
                                                                 "python")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  python = _reference_python()
  if not os.path.exists(python):
    pytest.skip(f"no taming-transformers reference interpreter at {python} (run `make "
                "taming-reference` or set VQGAN_TAMING_PYTHON)")
  out = str(tmp_path_factory.mktemp("loss_ref"))
  proc = subprocess.run([python, os.path.join(REPO, "tests", "taming_reference.py"), "--loss",
                         out], capture_output=True, text=True, timeout=600, check=False)
  if proc.returncode == 3:
    pytest.skip(f"the reference venv at {python} is incomplete: {proc.stdout.strip()[-300:]}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  data = dict(np.load(os.path.join(out, "loss_reference.npz")))
  data["dir"] = out
  return data


def rel_err(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs| (the absolute difference where theirs is all 0)."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  diff = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
  scale = float(np.max(np.abs(theirs))) if theirs.size else 0.0
  return diff / scale if scale > 0 else diff


def tree_rel_errs(ours, theirs, zero_level=1e-6):
  """Per-tensor relative errors, and the tensors whose reference gradient is zero up to
  round-off (max |g| < zero_level x the largest entry of any tensor): there a relative
  error measures noise, so both sides must just be that small. In these models they are
  exact zeros of the calculus: biases of attention keys (softmax ignores a shift of a row)
  and of convolutions right before a GroupNorm with one channel per group (32 channels)."""
  a = traverse_util.flatten_dict(jax.device_get(ours), sep="/")
  b = traverse_util.flatten_dict(jax.device_get(theirs), sep="/")
  assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
  scale = max(float(np.max(np.abs(v))) for v in b.values())
  errs, zeros = {}, {}  # zeros: ours' largest entry relative to the scale
  for k in a:
    if float(np.max(np.abs(b[k]))) < zero_level * scale:
      zeros[k] = float(np.max(np.abs(a[k]))) / scale
    else:
      errs[k] = rel_err(a[k], b[k])
  return errs, zeros, zero_level * scale


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def lpips_params_from_torch(state):
  """taming's LPIPS state dict -> our LPIPS params (VGG convs in slice order, lin layers)."""
  convs = sorted((k for k in state if k.startswith("net.slice") and k.endswith(".weight")),
                 key=lambda k: int(k.split(".")[2]))
  names = [f"conv{s + 1}_{c + 1}" for s, stage in enumerate(lpips.VGG16_STAGES)
           for c in range(len(stage))]
  assert len(convs) == len(names)
  params = {"vgg": {}}
  for name, key in zip(names, convs):
    params["vgg"][name] = {"kernel": jnp.asarray(state[key].transpose(2, 3, 1, 0)),
                           "bias": jnp.asarray(state[key[:-len("weight")] + "bias"])}
  for i in range(len(lpips.LPIPS_CHANNELS)):
    params[f"lin_{i}"] = {"kernel": jnp.asarray(state[f"lin{i}.model.1.weight"].transpose(2, 3, 1, 0))}
  return params


@pytest.fixture(scope="module")
def ours(ref):
  """Our Stage1Setup with the reference's weights, and its outputs at both steps."""
  stage1 = _stage1()
  d = ref["dir"]
  ckpt = os.path.join(d, "vqgan_loss.ckpt")
  model_cfg = convert_taming.read_yaml(os.path.join(d, "vqgan_loss.yaml"))
  config = convert_taming.vqgan_config(model_cfg, "vqgan_loss.yaml")
  state, _ = torch_checkpoint.load_state_dict(ckpt)
  g_params, disc, _ = convert_taming.convert_vqgan(state, "", config, ckpt,
                                                   keep_discriminator=True)
  lpips_state = dict(np.load(os.path.join(d, "lpips.npz")))
  setup = stage1.Stage1Setup(config)
  fields = [f.name for f in dataclasses.fields(stage1.TrainerState)]
  trainer = stage1.TrainerState(**{**{f: None for f in fields},
                                   "d_params": disc["params"],
                                   "d_batch_stats": disc["batch_stats"]})
  x = nhwc(ref["x"])
  lpips_params = lpips_params_from_torch(lpips_state)

  @jax.jit
  def run(g_params, trainer):
    # Both generator passes (without and with the GAN terms) and the discriminator pass in
    # one program: one compilation.
    out = {}
    for tag, use_gan in (("before", False), ("after", True)):
      grads, x_rec, _, metrics = setup.generator_gradients(
          g_params, trainer, x, lpips_params, jax.random.PRNGKey(0), use_gan)
      out[tag] = {"g_grads": grads, "x_rec": x_rec, "metrics": metrics}
    d_grads, d_stats, d_metrics = setup.discriminator_gradients(trainer, x,
                                                                out["after"]["x_rec"])
    out["after"].update(d_grads=d_grads, d_stats=d_stats, d_metrics=d_metrics)
    return out

  compiled = run.lower(g_params, trainer).compile(compiler_options=FAST_COMPILE)
  results = jax.device_get(compiled(g_params, trainer))
  return {"config": config, "state": state, "disc": disc, "lpips_state": lpips_state,
          "results": results, "stage1": stage1, "ckpt": ckpt}


def reference_grads(ref, ours, tag):
  """The reference's gradients (state-dict names) in our trees, through the converter."""
  prefix = f"{tag}:g:"
  grad_state = {k[len(prefix):]: ref[k] for k in ref if k.startswith(prefix)}
  assert sorted(grad_state) == sorted(k for k in ours["state"] if not k.startswith("loss."))
  for k, v in ours["state"].items():  # the discriminator: gradients of its parameters,
    if k.startswith("loss.discriminator."):  # its BatchNorm buffers as they are
      local = k[len("loss.discriminator."):]
      grad_state[k] = ref.get(f"{tag}:d:{local}", torch_checkpoint.to_numpy(v))
  g, d, _ = convert_taming.convert_vqgan(grad_state, "", ours["config"], "gradients",
                                         keep_discriminator=True)
  return g, d["params"]


# ----------------------------------------------------------------------------- stage 1


def test_setup_matches_the_reference_loss_config(ref, ours):
  cfg = ours["config"].loss
  assert (cfg.disc_start, cfg.disc_weight, cfg.codebook_weight, cfg.perceptual_weight,
          cfg.disc_factor, cfg.disc_loss, cfg.pixel_loss) == (
              int(ref["disc_start"]), 0.8, 1.0, 1.0, 1.0, "hinge", "l1")
  assert cfg.adaptive_weight and ours["config"].compute_dtype == "float32"
  stage1 = ours["stage1"]
  assert not stage1.gan_active(ours["config"], int(ref["disc_start"]) - 1)
  assert stage1.gan_active(ours["config"], int(ref["disc_start"]))
  # The code assignment must not sit on a tie (latents agree to ~1e-6), or gradients
  # would differ for that reason.
  assert float(ref["gap"]) > 1e-5
  # LPIPS input scaling: the reference's constants are ours.
  np.testing.assert_allclose(ours["lpips_state"]["scaling_layer.shift"].ravel(), lpips._SHIFT,  # pylint: disable=protected-access
                             rtol=1e-6)
  np.testing.assert_allclose(ours["lpips_state"]["scaling_layer.scale"].ravel(), lpips._SCALE,  # pylint: disable=protected-access
                             rtol=1e-6)


@pytest.mark.parametrize("tag", ["before", "after"])
def test_generator_losses_and_d_weight(ref, ours, tag):
  """Losses of the generator pass, one step before disc_start and at it. d_weight does not
  depend on the step: the reference computes it at both (multiplied by disc_factor=0
  before), ours only once the GAN is on, so ours is the use_gan=True pass at both."""
  use_gan = tag == "after"
  m = ours["results"][tag]["metrics"]
  gan = ours["results"]["after"]["metrics"]
  errs = {
      "x_rec": rel_err(ours["results"][tag]["x_rec"], nhwc(ref[f"{tag}:xrec"])),
      "total_loss": rel_err(m["total_loss"], ref[f"{tag}:total_loss"]),
      "nll_loss": rel_err(m["nll_loss"], ref[f"{tag}:nll_loss"]),
      "l1": rel_err(m["rec_loss"], ref[f"{tag}:nll_loss"] - ref[f"{tag}:p_loss"]),
      "p_loss": rel_err(m["perceptual_loss"], ref[f"{tag}:p_loss"]),
      "q_loss": rel_err(m["q_loss"], ref[f"{tag}:quant_loss"]),
      "g_loss": rel_err(gan["g_loss"], ref[f"{tag}:g_loss"]),
      "d_weight": rel_err(gan["d_weight"], ref[f"{tag}:d_weight"]),
  }
  print(f"{tag} disc_start: generator relative errors", errs,
        "d_weight ours/ref", float(gan["d_weight"]), float(ref[f"{tag}:d_weight"]))
  assert max(errs.values()) < REL_TOL, errs
  assert float(ref[f"{tag}:disc_factor"]) == float(use_gan)
  if not use_gan:  # the reference's total carries d_weight * 0 * g_loss
    assert "g_loss" not in m and "d_weight" not in m


@pytest.mark.parametrize("tag", ["before", "after"])
def test_generator_gradients(ref, ours, tag):
  ref_g, _ = reference_grads(ref, ours, tag)
  errs, zeros, floor = tree_rel_errs(ours["results"][tag]["g_grads"], ref_g)
  worst = max(errs, key=errs.get)
  print(f"{tag} disc_start: generator gradients, {len(errs)} tensors, worst relative "
        f"error {errs[worst]:.2e} at {worst}; {len(zeros)} tensors zero up to round-off "
        f"(|g| < {floor:.1e}) on both sides: {sorted(zeros)}")
  assert errs[worst] < REL_TOL, {k: v for k, v in errs.items() if v >= REL_TOL}
  assert all(v < 1e-6 for v in zeros.values()), zeros
  assert len(zeros) < len(errs) / 4


def test_discriminator_loss_and_gradients_after_disc_start(ref, ours):
  out = ours["results"]["after"]
  m = out["d_metrics"]
  errs = {"d_loss": rel_err(m["d_loss"], ref["after:disc_loss"]),
          "logits_real": rel_err(m["logits_real"], ref["after:logits_real"]),
          "logits_fake": rel_err(m["logits_fake"], ref["after:logits_fake"])}
  _, ref_d = reference_grads(ref, ours, "after")
  grad_errs, zeros, _ = tree_rel_errs(out["d_grads"], ref_d)
  print("discriminator relative errors", errs, "gradients", grad_errs, "zero", zeros)
  assert max(errs.values()) < REL_TOL, errs
  assert max(grad_errs.values()) < REL_TOL, grad_errs
  # The last convolution's bias: the hinge loss' gradient is 0.5 (share of fake logits
  # above -1 - share of real logits below 1), 0 when all are inside the margin.
  assert all(v < 1e-6 for v in zeros.values()), zeros


def test_before_disc_start_the_reference_discriminator_loss_is_zero(ref, ours):
  """The reference's discriminator pass before disc_start: disc_factor 0, so loss 0 and all
  gradients 0 (Adam still steps, with zero gradients). Our trainer runs no discriminator
  pass at all there (gan_active is False, checked above): the same parameters result,
  but our discriminator's Adam starts counting steps at disc_start, the reference's at
  step 0 (its first real update is (1 - b1) / sqrt(1 - b2) = 1.58x ours with b1=0.5,
  b2=0.9, the gap fading as both bias corrections go to 1)."""
  assert float(ref["before:disc_loss"]) == 0.0
  assert float(ref["before:disc_factor"]) == 0.0
  grads = [ref[k] for k in ref if k.startswith("before:d:")]
  assert grads and all(not np.any(g) for g in grads)
  # The same pass with disc_factor 1 (at disc_start) gives the loss ours computes.
  assert float(ref["after:disc_loss"]) > 0.0


def _bn_sizes(config, height, width, batch):
  """Elements per channel each BatchNorm of our discriminator normalises (k4, pad 1)."""
  sizes, h, w = {}, height, width
  h, w = (h + 2 - 4) // 2 + 1, (w + 2 - 4) // 2 + 1  # conv_0, stride 2
  n = config.loss.disc_num_layers
  for i in range(1, n + 1):
    stride = 2 if i < n else 1
    h, w = (h + 2 - 4) // stride + 1, (w + 2 - 4) // stride + 1
    sizes[f"norm_{i}"] = batch * h * w
  return sizes


def test_batchnorm_statistics_differ_only_by_the_unbiased_variance(ref, ours):
  """The discriminator pass (real batch, then fake batch) from the same statistics.

  Running means agree. Running variances do not: torch mixes in the unbiased batch variance
  (x n/(n-1)), flax the biased one. With momentum m=0.1 (flax 0.9) and two updates,
  v_ref - 0.81 v0 = n/(n-1) (v_ours - 0.81 v0) per channel, n = B*H*W at that layer
  (here 32 and 18; at 256x256 with the default 3 layers and batch 12, n >= 12*31*31, a
  factor below 1.0001). Pinned exactly; the reference's generator pass adds a third
  update (reported)."""
  stats = ours["results"]["after"]["d_stats"]
  v0_all = ours["disc"]["batch_stats"]
  x = ref["x"]
  sizes = _bn_sizes(ours["config"], x.shape[2], x.shape[3], x.shape[0])
  n_layers = ours["config"].loss.disc_num_layers
  index = {f"norm_{i}": 3 * i for i in range(1, n_layers + 1)}  # torch main.<index>
  report = {}
  for name, i in index.items():
    mean_ref = ref[f"after:stats_d:main.{i}.running_mean"]
    var_ref = ref[f"after:stats_d:main.{i}.running_var"]
    v0 = np.asarray(v0_all[name]["var"], np.float64)
    n = sizes[name]
    ours_var = np.asarray(stats[name]["var"], np.float64)
    corrected = 0.81 * v0 + n / (n - 1) * (ours_var - 0.81 * v0)
    report[name] = {"n": n, "mean": rel_err(stats[name]["mean"], mean_ref),
                    "var_as_is": rel_err(ours_var, var_ref),
                    "var_unbiased": rel_err(corrected, var_ref),
                    "generator_pass_update": rel_err(
                        ref[f"after:stats_gd:main.{i}.running_var"], var_ref)}
    assert report[name]["mean"] < REL_TOL
    assert report[name]["var_unbiased"] < REL_TOL
    assert report[name]["var_as_is"] > 10 * REL_TOL  # the difference is real at this size
  print("BatchNorm running statistics (relative errors):", report)


# ----------------------------------------------------------------------------- stage 2


def _loss_mask(prefix_len, n):
  return _find("loss_mask", ["vqgan_jax.conditioning", "vqgan_jax.training.stage2",
                             "vqgan_jax.stage2_trainer"])(prefix_len, n)


def test_cross_entropy_equals_reference_on_identical_logits(ref):
  """pkeep=1: F.cross_entropy over (B*N, V) logits = our masked token cross-entropy."""
  logits, target = ref["ce_logits"], ref["ce_target"]
  loss, count = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(target),
                                           jnp.ones(target.shape, bool))
  err = rel_err(loss, ref["ce_loss"])
  # The model's own logits, placed in our sequence layout: one start token (P=1) whose
  # prediction of image token 0 is position 0; the prefix positions' logits are masked.
  b, n, v = ref["s2_logits"].shape
  p = 1
  full = np.concatenate([np.full((b, p - 1, v), 50.0, np.float32), ref["s2_logits"]], axis=1)
  mask = jnp.broadcast_to(_loss_mask(p, n)[None], (b, p + n - 1))
  model_loss, model_count = losses.token_cross_entropy(jnp.asarray(full),
                                                       jnp.asarray(ref["s2_target"]), mask)
  model_err = rel_err(model_loss, ref["s2_loss"])
  print(f"cross-entropy relative errors: random logits {err:.2e}, model logits "
        f"{model_err:.2e}")
  assert int(count) == target.size and int(model_count) == b * n
  assert err < 1e-6 and model_err < 1e-6


def test_converted_gpt_loss_and_the_extra_vocabulary_rows(ref, tmp_path):
  """Through a converted Net2NetTransformer: our logits over the image codes give the
  reference's loss. Our softmax also covers the ids that are not image codes (here the
  start id, whose converted head row is the reference's row sos_token=0, i.e. code 0's), so
  the loss of a converted model over our whole vocabulary is higher by
  mean log(1 + p_ref(code 0)); a model trained here learns to give those ids no mass."""
  load_stage2 = _find("load_stage2", ["vqgan_jax.handoff", "vqgan_jax.training.stage2",
                                      "vqgan_jax.stage2_trainer"])
  d = ref["dir"]
  out = str(tmp_path / "uncond")
  convert_taming.convert(os.path.join(d, "uncond.ckpt"), os.path.join(d, "uncond.yaml"), out)
  loaded = load_stage2(out)
  layout = loaded.layout
  target = jnp.asarray(ref["s2_target"], jnp.int32)
  b, n = target.shape
  seq = jnp.concatenate([jnp.full((b, 1), layout.start_id, jnp.int32), target], axis=1)
  variables = {"params": loaded.params}
  logits = jax.jit(loaded.model.apply).lower(variables, seq[:, :-1]).compile(
      compiler_options=FAST_COMPILE)(variables, seq[:, :-1])
  mask = jnp.ones((b, n), bool)
  codes_only, _ = losses.token_cross_entropy(logits[..., :layout.n_codes], target, mask)
  whole, _ = losses.token_cross_entropy(logits, target, mask)
  ref_logits = ref["s2_logits"].astype(np.float64)
  p0 = np.exp(ref_logits[..., 0] - np.log(np.sum(np.exp(ref_logits), -1)))
  expected_gap = float(np.mean(np.log1p(p0)))
  print(f"converted GPT loss: image codes {float(codes_only):.6f}, whole vocabulary "
        f"{float(whole):.6f}, reference {float(ref['s2_loss']):.6f} (expected gap "
        f"{expected_gap:.6f})")
  assert layout.vocab_size == layout.n_codes + 1
  assert rel_err(codes_only, ref["s2_loss"]) < REL_TOL
  assert abs(float(whole) - float(ref["s2_loss"]) - expected_gap) < 1e-4


def _corruption_stats(inputs, z, n_codes):
  """inputs (R, B, 1 + N - 1): [condition, corrupted image tokens 0..N-2] as the GPT reads
  them; z (B, N) the clean codes. Share of changed tokens, values of the changed ones."""
  image = inputs[..., 1:]
  clean = np.broadcast_to(z[None, :, :image.shape[-1]], image.shape)
  changed = image != clean
  values = image[changed]
  return {"share_changed": float(np.mean(changed)), "count": int(changed.size),
          "min": int(values.min()), "max": int(values.max()),
          "hist": np.bincount(values, minlength=n_codes), "condition": inputs[..., 0]}


def test_corruption_statistics_match_the_reference_rule(ref):
  """pkeep < 1: the reference draws mask ~ Bernoulli(pkeep) and replacements uniform in
  [0, vocab_size) (the transformer's vocab_size, = n_codes in taming's configs and here),
  so a share (1 - pkeep)(1 - 1/n_codes) of the input tokens changes. Ours draws from
  [0, n_codes). Condition tokens and targets are never corrupted on either side."""
  corrupt = _find("corrupt_image_tokens", ["vqgan_jax.conditioning",
                                           "vqgan_jax.training.stage2",
                                           "vqgan_jax.stage2_trainer"])
  pkeep, n_codes = float(ref["corrupt_pkeep"]), int(ref["corrupt_vocab"])
  z, theirs = ref["corrupt_z"], ref["corrupt_inputs"]
  rounds, batch, _ = theirs.shape
  start = n_codes  # our start id (first id after the image codes)
  tokens = jnp.concatenate([jnp.full((batch, 1), start, jnp.int32),
                            jnp.asarray(z, jnp.int32)], axis=1)
  fn = jax.jit(lambda t, k: corrupt(t, 1, n_codes, pkeep, k)[:, :-1])
  mine = np.stack([np.asarray(fn(tokens, jax.random.PRNGKey(r))) for r in range(rounds)])
  s_ref = _corruption_stats(theirs, z, n_codes)
  s_ours = _corruption_stats(mine, z, n_codes)
  expected = (1.0 - pkeep) * (1.0 - 1.0 / n_codes)
  sigma = math.sqrt(expected * (1 - expected) / s_ref["count"])
  print(f"share of changed input tokens: expected {expected:.4f} (replaced {1 - pkeep}), "
        f"reference {s_ref['share_changed']:.4f}, ours {s_ours['share_changed']:.4f} "
        f"(sigma {sigma:.4f}); replacement ranges reference [{s_ref['min']}, "
        f"{s_ref['max']}], ours [{s_ours['min']}, {s_ours['max']}]")
  for s in (s_ref, s_ours):
    assert abs(s["share_changed"] - expected) < 5 * sigma
    assert (s["min"], s["max"]) == (0, n_codes - 1)
    hist = s["hist"]
    mean = hist.sum() / n_codes
    assert np.all(np.abs(hist - mean) < 6 * math.sqrt(mean)), hist  # ~uniform
  assert abs(s_ref["share_changed"] - s_ours["share_changed"]) < 5 * math.sqrt(2) * sigma
  assert np.all(s_ref["condition"] == int(ref["corrupt_sos"]))
  assert np.all(s_ours["condition"] == start)
  assert int(ref["corrupt_vocab"]) == n_codes
