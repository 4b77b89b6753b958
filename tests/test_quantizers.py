"""The quantizer family (vq, vq_ema, fsq, lfq, simvq) against numpy implementations."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vqgan_jax.models import quantizer as Q
from vqgan_jax.models import vqgan

STATE = Q.QUANTIZER_STATE


# ----------------------------------------------------------------------------- numpy refs
def np_fsq_bound(z, levels, eps=1e-3):
  levels = np.asarray(levels, np.float64)
  half_l = (levels - 1) * (1 + eps) / 2
  offset = np.where(levels % 2 == 0, 0.5, 0.0)
  shift = np.arctanh(offset / half_l)
  return np.tanh(z + shift) * half_l - offset


def np_fsq(z, levels):
  """(normalised codes, mixed-radix indices with the first level least significant)."""
  half_width = np.asarray(levels) // 2
  rounded = np.round(np_fsq_bound(z, levels))
  digits = (rounded + half_width).astype(np.int64)
  place = np.ones(len(levels), np.int64)
  for i in range(1, len(levels)):
    place[i] = place[i - 1] * levels[i - 1]
  return rounded / half_width, (digits * place).sum(-1)


def np_fsq_index_to_code(index, levels):
  code = []
  for level in levels:
    code.append((index % level - level // 2) / (level // 2))
    index //= level
  return code


def np_entropies(z, temperature):
  """(mean per-row entropy, entropy of the mean) of softmax(-||z - c||^2 / t) over all
  +-1 codes c, in float64."""
  codes = np.array(list(itertools.product([-1.0, 1.0], repeat=z.shape[-1])))
  d = ((z[:, None, :].astype(np.float64) - codes[None]) ** 2).sum(-1)
  logits = -d / temperature
  logits -= logits.max(-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(-1, keepdims=True)
  xlogx = lambda x: np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)
  return float(np.mean(-xlogx(p).sum(-1))), float(-xlogx(p.mean(0)).sum())


def np_ema_step(stats, z, decay, eps):
  emb, cs, ea = (np.asarray(stats[k], np.float64) for k in ("embedding", "cluster_size",
                                                            "embed_avg"))
  flat = np.asarray(z, np.float64).reshape(-1, emb.shape[1])
  idx = np.argmin(((flat[:, None] - emb[None]) ** 2).sum(-1), axis=1)
  k = emb.shape[0]
  onehot = np.eye(k)[idx]
  cs = decay * cs + (1 - decay) * onehot.sum(0)
  ea = decay * ea + (1 - decay) * onehot.T @ flat
  n = cs.sum()
  smoothed = (cs + eps) / (n + k * eps) * n
  return idx, {"embedding": ea / smoothed[:, None], "cluster_size": cs, "embed_avg": ea}


def run(module, variables, *args, **static):
  """module.apply(variables, *args, **static), jitted (faster than op by op)."""
  return jax.jit(lambda v, *a: module.apply(v, *a, **static))(variables, *args)


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


# ----------------------------------------------------------------------------- fsq
def test_fsq_bound_and_round_per_level_count():
  levels = (2, 3, 4, 5, 7, 8)  # even and odd
  fsq = Q.FSQ(embed_dim=len(levels), levels=levels)
  grid = np.linspace(-6.0, 6.0, 2001, dtype=np.float32)
  z = np.concatenate([np.repeat(grid[:, None], len(levels), 1),
                      np.asarray(_normal(0, (500, len(levels)), 2.0))]).astype(np.float32)
  np.testing.assert_allclose(run(fsq, {}, jnp.asarray(z), method=Q.FSQ.bound),
                             np_fsq_bound(z.astype(np.float64), levels), atol=1e-5)
  z_q, q_loss, info = run(fsq, {}, jnp.asarray(z))
  codes, indices = np_fsq(z.astype(np.float64), levels)
  np.testing.assert_allclose(z_q, codes, atol=1e-6)
  np.testing.assert_array_equal(info["indices"], indices)
  assert float(q_loss) == 0.0
  for i, level in enumerate(levels):  # every level reachable, no more
    assert len(np.unique(np.asarray(z_q)[:, i])) == level
    assert np.asarray(z_q)[:, i].min() == -1.0


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (3, 4)])
def test_fsq_index_code_bijection(levels):
  size = int(np.prod(levels))
  fsq = Q.FSQ(embed_dim=len(levels), levels=levels)
  assert fsq.codebook_size == size
  all_indices = np.arange(size)
  expected = np.array([np_fsq_index_to_code(int(i), levels) for i in all_indices])
  codes = np.asarray(run(fsq, {}, jnp.asarray(all_indices, jnp.int32), method=Q.FSQ.lookup))
  np.testing.assert_allclose(codes, expected, atol=1e-7)
  assert len({tuple(c) for c in codes}) == size
  np.testing.assert_allclose(run(fsq, {}, method=Q.FSQ.codebook), expected, atol=1e-7)
  np.testing.assert_array_equal(Q.fsq_codes_to_indices(jnp.asarray(codes), levels), all_indices)
  # Latents that bound exactly onto each grid point quantize to that point and index.
  lv = np.asarray(levels, np.float64)
  half_l = (lv - 1) * (1 + 1e-3) / 2
  offset = np.where(lv % 2 == 0, 0.5, 0.0)
  z = np.arctanh((expected * (lv // 2) + offset) / half_l) - np.arctanh(offset / half_l)
  z_q, _, info = run(fsq, {}, jnp.asarray(z, jnp.float32))
  np.testing.assert_array_equal(info["indices"], all_indices)
  np.testing.assert_allclose(z_q, expected, atol=1e-6)


def test_fsq_rounding_passes_gradient_straight_through():
  levels = (3, 4, 8)
  fsq = Q.FSQ(embed_dim=3, levels=levels)
  z = _normal(1, (4, 5, 3))
  grad = np.asarray(jax.grad(lambda z: jnp.sum(run(fsq, {}, z)[0]))(z))
  lv = np.asarray(levels, np.float64)
  half_l = (lv - 1) * (1 + 1e-3) / 2
  shift = np.arctanh(np.where(lv % 2 == 0, 0.5, 0.0) / half_l)
  expected = (1 - np.tanh(np.asarray(z, np.float64) + shift) ** 2) * half_l / (lv // 2)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- lfq
def test_lfq_codes_indices_and_entropies():
  bits, temperature, w_e, w_c = 4, 0.7, 0.3, 0.2
  lfq = Q.LFQ(embed_dim=bits, bits=bits, entropy_weight=w_e, commit_weight=w_c,
              temperature=temperature)
  z = np.array(_normal(2, (3, 5, bits)))
  z[0, 0] = [0.0, -0.5, 0.0, 2.0]  # zero quantizes to +1
  z_q, q_loss, info = run(lfq, {}, jnp.asarray(z))
  signs = np.where(z >= 0, 1.0, -1.0)
  np.testing.assert_array_equal(z_q, signs)
  np.testing.assert_array_equal(np.asarray(z_q)[0, 0], [1, -1, 1, 1])
  place = 2 ** np.arange(bits - 1, -1, -1)
  np.testing.assert_array_equal(info["indices"], ((signs > 0) * place).sum(-1))
  assert int(info["indices"][0, 0]) == 0b1011
  per_sample, codebook = np_entropies(z.reshape(-1, bits), temperature)
  np.testing.assert_allclose(info["per_sample_entropy"], per_sample, rtol=1e-5)
  np.testing.assert_allclose(info["codebook_entropy"], codebook, rtol=1e-5)
  commit = np.mean((z - signs) ** 2)
  np.testing.assert_allclose(info["commit_loss"], commit, rtol=1e-5)
  np.testing.assert_allclose(q_loss, w_c * commit + w_e * (per_sample - codebook),
                             rtol=1e-5, atol=1e-6)
  all_codes = run(lfq, {}, jnp.arange(2 ** bits), method=Q.LFQ.lookup)
  np.testing.assert_array_equal(Q.lfq_codes_to_indices(all_codes), np.arange(2 ** bits))
  assert len({tuple(c) for c in np.asarray(all_codes)}) == 2 ** bits


def test_lfq_grouped_entropy():
  """Groups of bits: per-sample entropy is the full one; codebook entropy is the sum of
  the groups' own."""
  bits, temperature = 6, 0.5
  assert Q.lfq_groups(6, 3) == (3, 3) and Q.lfq_groups(18, 10) == (9, 9)
  assert Q.lfq_groups(7, 3) == (3, 2, 2) and Q.lfq_groups(6, 0) == (6,)
  z = np.asarray(_normal(3, (40, bits), 0.7))
  per_sample, codebook = jax.jit(Q.lfq_entropies, static_argnums=(1, 2))(
      jnp.asarray(z), temperature, 3)
  full_per_sample, _ = np_entropies(z, temperature)
  np.testing.assert_allclose(per_sample, full_per_sample, rtol=1e-5)
  group_cb = np_entropies(z[:, :3], temperature)[1] + np_entropies(z[:, 3:], temperature)[1]
  np.testing.assert_allclose(codebook, group_cb, rtol=1e-5)


# ----------------------------------------------------------------------------- vq_ema
def test_vq_ema_updates_with_a_dead_code():
  decay, eps, beta = 0.9, 1e-5, 0.25
  ema = Q.EMAVectorQuantizer(n_embed=5, embed_dim=3, beta=beta, ema_decay=decay, ema_eps=eps)
  z0 = _normal(4, (2, 4, 3))
  variables = jax.jit(ema.init)(jax.random.PRNGKey(0), z0)
  assert set(variables) == {STATE}  # no gradient-trained params without projections
  init = variables[STATE]
  np.testing.assert_array_equal(init["cluster_size"], np.ones(5))
  np.testing.assert_array_equal(init["embed_avg"], init["embedding"])
  codes = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1], [50, 50, 50]], np.float32)
  stats = {"embedding": codes, "cluster_size": np.ones(5, np.float32), "embed_avg": codes}
  ref = {k: np.asarray(v, np.float64) for k, v in stats.items()}
  step = jax.jit(lambda s, z: ema.apply({STATE: s}, z, train=True, mutable=[STATE]))
  for t in range(4):
    z = _normal(10 + t, (2, 4, 3))
    (z_q, loss, info), updated = step(stats, z)
    idx, ref = np_ema_step(ref, z, decay, eps)
    np.testing.assert_array_equal(np.asarray(info["indices"]).reshape(-1), idx)
    assert 4 not in idx
    q = np.asarray(stats["embedding"])[idx].reshape(z.shape)  # codes before the update
    np.testing.assert_allclose(z_q, q, atol=1e-6)
    np.testing.assert_allclose(loss, beta * np.mean((np.asarray(z) - q) ** 2), rtol=1e-5)
    stats = updated[STATE]
    for k in ("cluster_size", "embed_avg", "embedding"):
      np.testing.assert_allclose(stats[k], ref[k], rtol=1e-5, atol=1e-6)
  # The dead code's EMAs decay together: it stays where it was.
  np.testing.assert_allclose(stats["cluster_size"][4], decay ** 4, rtol=1e-5)
  np.testing.assert_allclose(stats["embedding"][4], codes[4], rtol=1e-3)
  # train=False (or an immutable collection) leaves the statistics alone.
  _, same = run(ema, {STATE: stats}, z0, train=False, mutable=[STATE])
  for k in stats:
    np.testing.assert_array_equal(same[STATE][k], stats[k])
  run(ema, {STATE: stats}, z0, train=True)  # not mutable: no error, no update
  # Loss gradient: only the commitment term, beta * d mean((z - sg(q))^2).
  z = _normal(20, (2, 4, 3))
  g = jax.grad(lambda z: run(ema, {STATE: stats}, z)[1])(z)
  q = np.asarray(run(ema, {STATE: stats}, z)[0])
  np.testing.assert_allclose(g, 2 * beta * (np.asarray(z) - q) / z.size, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- simvq
def test_simvq_codebook_is_basis_times_w_and_basis_is_frozen():
  beta = 0.25
  simvq = Q.SimVQ(n_embed=12, embed_dim=4, beta=beta)
  z = _normal(5, (2, 3, 3, 4))
  variables = jax.jit(simvq.init)(jax.random.PRNGKey(1), z)
  basis = np.asarray(variables[STATE]["basis"])
  kernel = np.asarray(variables["params"]["codebook_proj"]["kernel"])
  assert basis.shape == (12, 4) and kernel.shape == (4, 4)
  codebook = basis @ kernel
  np.testing.assert_allclose(run(simvq, variables, method=Q.SimVQ.codebook), codebook,
                             rtol=1e-5, atol=1e-6)
  z_q, loss, info = run(simvq, variables, z)
  flat = np.asarray(z).reshape(-1, 4)
  idx = np.argmin(((flat[:, None] - codebook[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(np.asarray(info["indices"]).reshape(-1), idx)
  mse = np.mean((flat - codebook[idx]) ** 2)
  np.testing.assert_allclose(loss, (1 + beta) * mse, rtol=1e-4)
  # Gradients of everything the module outputs: W learns, the basis gets exactly zero.
  def total(v):
    z_q, loss, _ = simvq.apply(v, z)
    return loss + jnp.sum(z_q ** 2)
  grads = jax.jit(jax.grad(total))(variables)
  assert not np.any(np.asarray(grads[STATE]["basis"]))
  assert np.any(np.asarray(grads["params"]["codebook_proj"]["kernel"]))
  # The basis comes from the init key (not a fixed seed), so it lives in the variables
  # that a checkpoint saves: another key draws another basis.
  other = jax.jit(simvq.init)(jax.random.PRNGKey(2), z)
  assert not np.allclose(other[STATE]["basis"], basis)


# ----------------------------------------------------------------------------- all
def _quantizers():
  return {
      "vq": Q.build_quantizer("vq", n_embed=16, embed_dim=6),
      "vq_lowdim_l2": Q.build_quantizer("vq", n_embed=16, embed_dim=6, codebook_dim=3,
                                        l2_normalize=True),
      "vq_ema": Q.build_quantizer("vq_ema", n_embed=16, embed_dim=6),
      "vq_ema_lowdim": Q.build_quantizer("vq_ema", n_embed=16, embed_dim=6, codebook_dim=3),
      "simvq": Q.build_quantizer("simvq", n_embed=16, embed_dim=6),
      "simvq_lowdim": Q.build_quantizer("simvq", n_embed=16, embed_dim=6, codebook_dim=3),
      "fsq": Q.build_quantizer("fsq", n_embed=0, embed_dim=4, fsq_levels=(3, 4, 5, 2)),
      "fsq_proj": Q.build_quantizer("fsq", n_embed=0, embed_dim=6, fsq_levels=(8, 5, 5, 5)),
      "lfq": Q.build_quantizer("lfq", n_embed=0, embed_dim=6, lfq_bits=6),
      "lfq_proj_groups": Q.build_quantizer("lfq", n_embed=0, embed_dim=6, lfq_bits=5,
                                           lfq_entropy_group_bits=2),
  }


@pytest.mark.parametrize("name", sorted(_quantizers()))
def test_indices_in_range_and_lookup_decodes(name):
  quantizer = _quantizers()[name]
  dim = quantizer.embed_dim
  z = _normal(6, (2, 3, 5, dim), 1.5)
  variables = jax.jit(quantizer.init)(jax.random.PRNGKey(7), z)
  (z_q, q_loss, info), _ = jax.jit(
      lambda v, z: quantizer.apply(v, z, train=True, mutable=[STATE]))(variables, z)
  indices = np.asarray(info["indices"])
  assert z_q.shape == z.shape and z_q.dtype == z.dtype and q_loss.shape == ()
  assert indices.shape == z.shape[:-1] and indices.dtype == np.int32
  assert indices.min() >= 0 and indices.max() < quantizer.codebook_size
  decoded = jax.jit(lambda v, i: quantizer.apply(v, i, method="lookup"))(variables,
                                                                        info["indices"])
  np.testing.assert_allclose(decoded, z_q, atol=1e-5)
  codebook = np.asarray(run(quantizer, variables, method="codebook"))
  assert codebook.shape[0] == quantizer.codebook_size
  assert codebook.shape[1] == info["z_lookup"].shape[-1]


@pytest.mark.parametrize("name", ["vq", "vq_ema", "simvq", "lfq"])
def test_straight_through_gradient_is_identity(name):
  """d z_q / d z = identity (FSQ: the bound's derivative, see the fsq gradient test)."""
  quantizer = _quantizers()[name]
  z = _normal(8, (2, 3, 3, quantizer.embed_dim))
  variables = jax.jit(quantizer.init)(jax.random.PRNGKey(0), z)
  w = _normal(9, z.shape)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(run(quantizer, variables, z)[0] * w)))(z)
  np.testing.assert_allclose(grad, w, atol=1e-6)


# ----------------------------------------------------------------------------- factory
def _model_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
      resolution=16, in_channels=3, out_ch=3, z_channels=32, embed_dim=8, n_embed=32,
      beta=0.25, legacy_beta=True, codebook_dim=0, l2_normalize=False))
  for k, v in overrides.items():
    c[k] = v
  return c


def test_make_quantizer_from_config():
  assert type(Q.make_quantizer(_model_config())) is Q.VectorQuantizer  # no `quantizer` key
  fsq = Q.make_quantizer(_model_config(quantizer="fsq", fsq_levels=(8, 5, 5, 5), n_embed=1000))
  assert isinstance(fsq, Q.FSQ) and fsq.codebook_size == 1000 and fsq.levels == (8, 5, 5, 5)
  lfq = Q.make_quantizer(_model_config(quantizer="lfq", lfq_bits=5, n_embed=32,
                                       lfq_entropy_weight=0.5), jnp.bfloat16)
  assert isinstance(lfq, Q.LFQ) and lfq.entropy_weight == 0.5 and lfq.codebook_size == 32
  ema = Q.make_quantizer(_model_config(quantizer="vq_ema", ema_decay=0.8))
  assert isinstance(ema, Q.EMAVectorQuantizer) and ema.ema_decay == 0.8
  assert isinstance(Q.make_quantizer(_model_config(quantizer="simvq")), Q.SimVQ)
  with pytest.raises(ValueError, match="n_embed=1000"):
    Q.make_quantizer(_model_config(quantizer="fsq", fsq_levels=(8, 5, 5, 5)))
  with pytest.raises(ValueError, match="model.quantizer"):
    Q.make_quantizer(_model_config(quantizer="rvq"))
  with pytest.raises(ValueError, match="codebook_dim"):
    Q.make_quantizer(_model_config(quantizer="lfq", lfq_bits=5, codebook_dim=4))


def test_vqmodel_carries_vq_ema_stats_and_decodes_indices():
  config = _model_config(quantizer="vq_ema", n_embed=16, ch_mult=(1,), attn_resolutions=(),
                         resolution=8)
  model = vqgan.vqmodel_from_config(config)
  assert model.quantizer == "vq_ema" and model.codebook_size == 16
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3), minval=-1, maxval=1)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  assert "quantize" not in variables["params"]
  assert variables[STATE]["quantize"]["embedding"].shape == (16, 8)
  out, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=[STATE]))(
      variables, x)
  assert not np.allclose(updated[STATE]["quantize"]["cluster_size"], 1.0)
  assert "q_metrics" not in out
  decoded = jax.jit(lambda v, i: model.apply(v, i, method=vqgan.VQModel.decode_indices))(
      variables, out["indices"])
  np.testing.assert_allclose(decoded, out["x_rec"], atol=1e-5)
