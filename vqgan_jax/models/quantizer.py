"""Quantizers of stage 1, under one interface.

Every quantizer here is a flax linen module with

  __call__(z, train=False) -> (z_q, q_loss, info)
      z       (..., embed_dim) latents (quant_conv's output)
      z_q     (..., embed_dim) quantized latents with a straight-through gradient, z's dtype
      q_loss  scalar float32 auxiliary loss (the trainer adds codebook_weight * q_loss)
      info    {"indices": (...) int32 in [0, codebook_size),
               "z_lookup": (..., lookup_dim) latents where they are quantized,
               and, for some quantizers, scalar diagnostics (see each class)}
  lookup(indices) -> (..., embed_dim) the quantized latents of integer indices:
      lookup(info["indices"]) equals z_q's forward value
  codebook()      -> (codebook_size, lookup_dim) every code as compared with latents
  codebook_size   number of codes (a Python int)

Kinds (`model.quantizer` in a config; "vq" when the key is absent):

  vq      VectorQuantizer: the paper's VQ (taming's VectorQuantizer2), optional
          low-dimensional l2-normalised lookup. Params: quantize/embedding (+ in_proj,
          out_proj with codebook_dim). Converted taming checkpoints load into it.
  vq_ema  EMAVectorQuantizer: VQ-VAE-2 codebook updated by exponential moving averages
          of the latents assigned to each code; loss = beta * commitment only.
  fsq     FSQ: finite scalar quantization (Mentzer et al. 2023); q_loss = 0.
  lfq     LFQ: lookup-free quantization (MAGVIT-v2); q_loss = commitment + entropy penalty.
  simvq   SimVQ: codebook = frozen random basis @ learned W; VQ's losses.

VARIABLE COLLECTION `vq_stats` (QUANTIZER_STATE): variables of the quantizer that no
gradient trains. Empty for vq, fsq and lfq;
  vq_ema: quantize/embedding (K, D), quantize/cluster_size (K,), quantize/embed_avg (K, D)
          -- updated when called with train=True and the collection mutable;
  simvq:  quantize/basis (K, D) -- the frozen random basis, never updated, but saved so
          that a checkpoint reloads the same codebook.
A trainer keeps `variables.get("vq_stats", {})` from `init` next to the params, passes
it to every apply ({"params": p, "vq_stats": s}: also eval, export and decode_indices),
and in a training forward applies with mutable=["vq_stats"] and keeps the returned
collection (as it does BatchNorm's batch_stats). Checkpoints must save it.
"""

# Over 500 lines on purpose: five quantizers behind one interface, each next to the
# others so their shared contract (indices, lookup, statistics) is read in one place.

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

QUANTIZER_STATE = "vq_stats"  # the flax variable collection of non-gradient quantizer state
QUANTIZERS = ("vq", "vq_ema", "fsq", "lfq", "simvq")


def _uniform_codebook_init(n_embed: int):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -1.0 / n_embed, 1.0 / n_embed)
  return init


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """||z - e||^2 for every row of z (N, D) against every code (K, D); shape (N, K)."""
  return (jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(codebook * codebook, axis=-1)[None, :]
          - 2.0 * z @ codebook.T)


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest code for each row of z."""
  return jnp.argmin(squared_distances(z, codebook), axis=-1).astype(jnp.int32)


def _straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
  """q's value with x's gradient."""
  return x + jax.lax.stop_gradient(q - x)


# ---------------------------------------------------------------------------- vq
class VectorQuantizer(nn.Module):
  """Maps (..., embed_dim) latents to their nearest codebook entries.

  Two placements of beta, as in taming-transformers' `VectorQuantizer2`:
    legacy=True  (reference default): mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)
    legacy=False (VQ-VAE paper):      beta * mean((sg(z_q) - z)^2) + mean((z_q - sg(z))^2)
  The first term trains the encoder (commitment), the second the codebook.

  Optional modern lookup (ViT-VQGAN / LlamaGen): with `codebook_dim` set, latents are
  projected to a low dimension before the lookup and back afterwards, and with
  `l2_normalize` both latents and codes are compared on the unit sphere.
  """
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True
  codebook_dim: Optional[int] = None  # None or 0: look codes up in embed_dim
  l2_normalize: bool = False

  @property
  def lookup_dim(self) -> int:
    return self.codebook_dim or self.embed_dim

  @property
  def codebook_size(self) -> int:
    return self.n_embed

  def setup(self):
    self.embedding = self.param("embedding", _uniform_codebook_init(self.n_embed),
                                (self.n_embed, self.lookup_dim), jnp.float32)
    self._setup_projections()

  def _setup_projections(self):
    if self.codebook_dim:
      self.in_proj = nn.Dense(self.codebook_dim, name="in_proj")
      self.out_proj = nn.Dense(self.embed_dim, name="out_proj")

  def _codes(self) -> jax.Array:
    """The stored codes, before any normalisation."""
    return self.embedding

  def codebook(self) -> jax.Array:
    """The codes as they are compared with latents (normalised if l2_normalize)."""
    codes = self._codes()
    return _l2_normalize(codes) if self.l2_normalize else codes

  def project_in(self, z: jax.Array) -> jax.Array:
    z = z.astype(jnp.float32)
    if self.codebook_dim:
      z = self.in_proj(z)
    return _l2_normalize(z) if self.l2_normalize else z

  def project_out(self, z_q: jax.Array) -> jax.Array:
    return self.out_proj(z_q) if self.codebook_dim else z_q

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Code vectors (in embed_dim) for integer indices of any shape."""
    return self.project_out(jnp.take(self.codebook(), indices, axis=0))

  def __call__(self, z: jax.Array, train: bool = False
               ) -> Tuple[jax.Array, jax.Array, Dict[str, Any]]:
    """Returns (z_q with straight-through gradient, quantizer loss, info); `train` unused."""
    del train
    z_lookup = self.project_in(z)
    codes = self.codebook()
    flat = z_lookup.reshape(-1, self.lookup_dim)
    indices = nearest_code(flat, codes)
    z_q = jnp.take(codes, indices, axis=0).reshape(z_lookup.shape)
    commitment = jnp.mean((jax.lax.stop_gradient(z_q) - z_lookup) ** 2)
    codebook_term = jnp.mean((z_q - jax.lax.stop_gradient(z_lookup)) ** 2)
    if self.legacy:
      loss = commitment + self.beta * codebook_term
    else:
      loss = self.beta * commitment + codebook_term
    z_q = z_lookup + jax.lax.stop_gradient(z_q - z_lookup)
    info = {
        "indices": indices.reshape(z.shape[:-1]),
        "z_lookup": z_lookup,  # latents in lookup space (used to restart dead codes)
    }
    return self.project_out(z_q).astype(z.dtype), loss, info


# ---------------------------------------------------------------------------- simvq
class SimVQ(VectorQuantizer):
  """SimVQ (Zhu et al. 2024): codebook = B @ W with B a frozen random basis.

  B (n_embed, lookup_dim) is drawn once at init from N(0, 1/lookup_dim) (SimVQ's
  initialisation) and kept in the `vq_stats` collection as `basis`: no gradient reaches
  it, the optimiser never sees it, and a checkpoint that saves the collection reloads
  the same codebook. W is the learned (lookup_dim, lookup_dim) kernel of the Dense
  `codebook_proj` (no bias: the paper's C W). Lookup, straight-through and the two loss
  terms (commitment + codebook, beta placed by `legacy`) are VectorQuantizer's; the
  codebook term's gradient trains W (and so every code at once).
  """

  def setup(self):
    scale = self.lookup_dim ** -0.5
    self.basis = self.variable(
        QUANTIZER_STATE, "basis",
        lambda: scale * jax.random.normal(self.make_rng("params"),
                                          (self.n_embed, self.lookup_dim), jnp.float32))
    self.codebook_proj = nn.Dense(self.lookup_dim, use_bias=False, name="codebook_proj")
    self._setup_projections()

  def _codes(self) -> jax.Array:
    return self.codebook_proj(jax.lax.stop_gradient(self.basis.value))


# ---------------------------------------------------------------------------- vq_ema
class EMAVectorQuantizer(VectorQuantizer):
  """VQ-VAE-2's quantizer: codes are moving averages of the latents assigned to them.

  State (collection `vq_stats`): `embedding` (K, D) the codes, `cluster_size` (K,) EMA of
  assignment counts, `embed_avg` (K, D) EMA of the sums of assigned latents. A call with
  train=True and the collection mutable, with counts n_k and sums s_k of this batch
  (all leading axes flattened), does, in this order and after the lookup (z_q uses the
  codes from before the update):
      cluster_size <- decay * cluster_size + (1 - decay) * n_k
      embed_avg    <- decay * embed_avg    + (1 - decay) * s_k
      n            =  sum_k cluster_size
      smoothed_k   =  (cluster_size_k + eps) / (n + K * eps) * n      (Laplace smoothing)
      embedding_k  <- embed_avg_k / smoothed_k
  cluster_size starts at 1 and embed_avg at the initial codes, so the initial codebook
  is a fixed point and a code that is never assigned keeps its place (its EMAs decay
  together) instead of jumping to embed_avg / eps as with a zero start.
  Loss: beta * mean((z - sg(z_q))^2) only (no codebook term: the EMA moves the codes;
  `legacy` is ignored). With codebook_dim/l2_normalize, the EMA runs on the projected
  (normalised) latents and codes are normalised at lookup.
  The trainer's dead-code restart (params/quantize/embedding) does not apply to it.
  """
  ema_decay: float = 0.99
  ema_eps: float = 1e-5

  def setup(self):
    init = _uniform_codebook_init(self.n_embed)
    shape = (self.n_embed, self.lookup_dim)
    self.embedding = self.variable(QUANTIZER_STATE, "embedding",
                                   lambda: init(self.make_rng("params"), shape))
    self.cluster_size = self.variable(QUANTIZER_STATE, "cluster_size",
                                      lambda: jnp.ones((self.n_embed,), jnp.float32))
    self.embed_avg = self.variable(QUANTIZER_STATE, "embed_avg", lambda: self.embedding.value)
    self._setup_projections()

  def _codes(self) -> jax.Array:
    return jax.lax.stop_gradient(self.embedding.value)

  def __call__(self, z: jax.Array, train: bool = False
               ) -> Tuple[jax.Array, jax.Array, Dict[str, Any]]:
    z_lookup = self.project_in(z)
    codes = self.codebook()
    flat = z_lookup.reshape(-1, self.lookup_dim)
    indices = nearest_code(flat, codes)
    z_q = jnp.take(codes, indices, axis=0).reshape(z_lookup.shape)
    loss = self.beta * jnp.mean((z_lookup - jax.lax.stop_gradient(z_q)) ** 2)
    if train and self.is_mutable_collection(QUANTIZER_STATE) and not self.is_initializing():
      self._ema_update(jax.lax.stop_gradient(flat), indices)
    info = {"indices": indices.reshape(z.shape[:-1]), "z_lookup": z_lookup}
    return self.project_out(_straight_through(z_lookup, z_q)).astype(z.dtype), loss, info

  def _ema_update(self, flat: jax.Array, indices: jax.Array) -> None:
    d, k = self.ema_decay, self.n_embed
    counts = jax.ops.segment_sum(jnp.ones_like(indices, jnp.float32), indices, k)
    sums = jax.ops.segment_sum(flat, indices, k)
    cluster_size = d * self.cluster_size.value + (1.0 - d) * counts
    embed_avg = d * self.embed_avg.value + (1.0 - d) * sums
    n = jnp.sum(cluster_size)
    smoothed = (cluster_size + self.ema_eps) / (n + k * self.ema_eps) * n
    self.cluster_size.value = cluster_size
    self.embed_avg.value = embed_avg
    self.embedding.value = embed_avg / smoothed[:, None]


# ---------------------------------------------------------------------------- fsq
def fsq_basis(levels: Sequence[int]) -> np.ndarray:
  """Mixed-radix place values: index = sum_i digit_i * basis_i (first level least significant)."""
  return np.cumprod([1] + list(levels[:-1])).astype(np.int64)


def fsq_indices_to_codes(indices: jax.Array, levels: Sequence[int]) -> jax.Array:
  """(...) int indices -> (..., len(levels)) normalised codes in [-1, 1]."""
  levels_a = jnp.asarray(levels, jnp.int32)
  half_width = (levels_a // 2).astype(jnp.float32)
  digits = (indices[..., None] // jnp.asarray(fsq_basis(levels), jnp.int32)) % levels_a
  return (digits.astype(jnp.float32) - half_width) / half_width


def fsq_codes_to_indices(codes: jax.Array, levels: Sequence[int]) -> jax.Array:
  """(..., len(levels)) normalised codes -> (...) int32 mixed-radix indices."""
  half_width = jnp.asarray([l // 2 for l in levels], jnp.float32)
  digits = jnp.round(codes * half_width + half_width).astype(jnp.int32)
  return jnp.sum(digits * jnp.asarray(fsq_basis(levels), jnp.int32), axis=-1).astype(jnp.int32)


class FSQ(nn.Module):
  """Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE
  Made Simple"), with the reference implementation's bound.

  Latents go to d = len(levels) channels (Dense `in_proj`/`out_proj` when embed_dim != d).
  Channel i with L = levels[i] levels is bounded, rounded (straight-through) and scaled:
      half_l  = (L - 1) * (1 + eps) / 2
      offset  = 0.5 if L is even else 0
      shift   = atanh(offset / half_l)
      bounded = tanh(z + shift) * half_l - offset       (rounds to L integers)
      code    = round(bounded) / (L // 2)                (in [-1, 1])
  The gradient passes the rounding as identity (d code / d z = d bounded / d z / (L//2)).
  index = sum_i (round(bounded_i) + L_i // 2) * prod_{j<i} L_j: a bijection between
  [0, prod(levels)) and the grid of codes. No parameters besides the projections, no
  codebook loss: q_loss = 0.
  """
  embed_dim: int
  levels: Sequence[int] = (8, 5, 5, 5)
  eps: float = 1e-3

  @property
  def lookup_dim(self) -> int:
    return len(self.levels)

  @property
  def codebook_size(self) -> int:
    return int(np.prod(self.levels))

  @property
  def _projects(self) -> bool:
    return self.embed_dim != self.lookup_dim

  def setup(self):
    if self._projects:
      self.in_proj = nn.Dense(self.lookup_dim, name="in_proj")
      self.out_proj = nn.Dense(self.embed_dim, name="out_proj")

  def project_in(self, z: jax.Array) -> jax.Array:
    z = z.astype(jnp.float32)
    return self.in_proj(z) if self._projects else z

  def project_out(self, codes: jax.Array) -> jax.Array:
    return self.out_proj(codes) if self._projects else codes

  def bound(self, z: jax.Array) -> jax.Array:
    levels = np.asarray(self.levels, np.float64)
    half_l = (levels - 1) * (1 + self.eps) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    shift = np.arctanh(offset / half_l)
    return (jnp.tanh(z + shift.astype(np.float32)) * half_l.astype(np.float32)
            - offset.astype(np.float32))

  def quantize(self, z: jax.Array) -> jax.Array:
    """Normalised codes of lookup-space latents, rounding passed straight through."""
    bounded = self.bound(z)
    half_width = np.asarray([l // 2 for l in self.levels], np.float32)
    return _straight_through(bounded, jnp.round(bounded)) / half_width

  def codebook(self) -> jax.Array:
    return fsq_indices_to_codes(jnp.arange(self.codebook_size, dtype=jnp.int32), self.levels)

  def lookup(self, indices: jax.Array) -> jax.Array:
    return self.project_out(fsq_indices_to_codes(indices, self.levels))

  def __call__(self, z: jax.Array, train: bool = False
               ) -> Tuple[jax.Array, jax.Array, Dict[str, Any]]:
    del train
    z_lookup = self.project_in(z)
    codes = self.quantize(z_lookup)
    indices = fsq_codes_to_indices(jax.lax.stop_gradient(codes), self.levels)
    info = {"indices": indices, "z_lookup": z_lookup}
    return self.project_out(codes).astype(z.dtype), jnp.zeros((), jnp.float32), info


# ---------------------------------------------------------------------------- lfq
def lfq_codes(bits: int) -> np.ndarray:
  """(2**bits, bits) every code in +-1, row k = binary k, most significant bit first."""
  k = np.arange(2 ** bits)[:, None]
  return (2 * ((k >> np.arange(bits - 1, -1, -1)[None, :]) & 1) - 1).astype(np.float32)


def lfq_indices_to_codes(indices: jax.Array, bits: int) -> jax.Array:
  shifts = jnp.arange(bits - 1, -1, -1, dtype=jnp.int32)
  return (2 * ((indices[..., None] >> shifts) & 1) - 1).astype(jnp.float32)


def lfq_codes_to_indices(codes: jax.Array) -> jax.Array:
  bits = codes.shape[-1]
  place = jnp.asarray(2 ** np.arange(bits - 1, -1, -1), jnp.int32)
  return jnp.sum((codes > 0).astype(jnp.int32) * place, axis=-1).astype(jnp.int32)


def lfq_groups(bits: int, group_bits: int) -> Tuple[int, ...]:
  """Sizes of the bit groups the entropy is computed over: as equal as possible, each at
  most group_bits (group_bits <= 0: one group of all bits)."""
  if group_bits <= 0 or group_bits >= bits:
    return (bits,)
  n = -(-bits // group_bits)
  return tuple(bits // n + (1 if i < bits % n else 0) for i in range(n))


def lfq_entropies(z: jax.Array, temperature: float, group_bits: int
                  ) -> Tuple[jax.Array, jax.Array]:
  """(per-sample entropy, codebook entropy) in nats of LFQ's soft assignment.

  z: (N, bits). Each row's distribution over codes is softmax(-||z - c||^2 / temperature).
  The bits are split in groups (`lfq_groups`) of at most group_bits; each group's
  2**g codes get their own softmax, so memory is N * sum_g 2**g instead of N * 2**bits.
  The per-sample entropy is exact for any grouping (the full softmax factorises over
  groups: it is the product of the groups' softmaxes). The codebook entropy, that of
  the batch-mean distribution, is exact with one group; with several it is the sum of
  the groups' codebook entropies (an upper bound of the joint one, as MAGVIT-v2's
  factorised codebooks).
  """
  per_sample = jnp.zeros((), jnp.float32)
  codebook = jnp.zeros((), jnp.float32)
  start = 0
  for g in lfq_groups(z.shape[-1], group_bits):
    zg = z[:, start:start + g]
    start += g
    # -||z - c||^2 = 2 z.c - ||z||^2 - g: the last two do not depend on c.
    logits = 2.0 * zg @ jnp.asarray(lfq_codes(g)).T / temperature
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    per_sample = per_sample + jnp.mean(-jnp.sum(p * log_p, axis=-1))
    avg_p = jnp.mean(p, axis=0)
    codebook = codebook - jnp.sum(avg_p * jnp.log(jnp.maximum(avg_p, 1e-10)))
  return per_sample, codebook


class LFQ(nn.Module):
  """Lookup-free quantization (Yu et al. 2023, MAGVIT-v2).

  Latents go to `bits` channels (Dense `in_proj`/`out_proj` when embed_dim != bits);
  each channel quantizes to its sign, +1 or -1 (0 -> +1), straight-through; the index
  is the binary number of the bits (+1 = 1), first channel most significant.
  q_loss = commit_weight * mean((z - sg(code))^2)
         + entropy_weight * (per-sample entropy - codebook entropy)   (`lfq_entropies`)
  Minimising it makes each latent's assignment confident and the batch use many codes;
  the entropy term can make q_loss negative. info also carries the scalar diagnostics
  "commit_loss", "per_sample_entropy", "codebook_entropy" (nats).
  """
  embed_dim: int
  bits: int = 10
  entropy_weight: float = 0.1
  commit_weight: float = 0.25
  temperature: float = 0.01
  entropy_group_bits: int = 10  # entropy over groups of at most this many bits

  @property
  def lookup_dim(self) -> int:
    return self.bits

  @property
  def codebook_size(self) -> int:
    return 2 ** self.bits

  @property
  def _projects(self) -> bool:
    return self.embed_dim != self.bits

  def setup(self):
    if self._projects:
      self.in_proj = nn.Dense(self.bits, name="in_proj")
      self.out_proj = nn.Dense(self.embed_dim, name="out_proj")

  def project_in(self, z: jax.Array) -> jax.Array:
    z = z.astype(jnp.float32)
    return self.in_proj(z) if self._projects else z

  def project_out(self, codes: jax.Array) -> jax.Array:
    return self.out_proj(codes) if self._projects else codes

  def codebook(self) -> jax.Array:
    return jnp.asarray(lfq_codes(self.bits))

  def lookup(self, indices: jax.Array) -> jax.Array:
    return self.project_out(lfq_indices_to_codes(indices, self.bits))

  def __call__(self, z: jax.Array, train: bool = False
               ) -> Tuple[jax.Array, jax.Array, Dict[str, Any]]:
    del train
    z_lookup = self.project_in(z)
    codes = jnp.where(z_lookup >= 0, 1.0, -1.0).astype(jnp.float32)
    commit = jnp.mean((z_lookup - codes) ** 2)  # codes carry no gradient
    per_sample, codebook = lfq_entropies(z_lookup.reshape(-1, self.bits), self.temperature,
                                         self.entropy_group_bits)
    loss = self.commit_weight * commit + self.entropy_weight * (per_sample - codebook)
    info = {"indices": lfq_codes_to_indices(codes), "z_lookup": z_lookup,
            "commit_loss": commit, "per_sample_entropy": per_sample,
            "codebook_entropy": codebook}
    return self.project_out(_straight_through(z_lookup, codes)).astype(z.dtype), loss, info


# ---------------------------------------------------------------------------- factory
# Config keys (under `config.model`) of the quantizers beyond VQ's n_embed, embed_dim,
# beta, legacy_beta, codebook_dim, l2_normalize; a config without them gets these values.
QUANTIZER_DEFAULTS = {
    "quantizer": "vq",             # one of QUANTIZERS
    "ema_decay": 0.99,             # vq_ema: EMA decay of cluster sizes and embedding sums
    "ema_eps": 1e-5,               # vq_ema: Laplace smoothing of cluster sizes
    "fsq_levels": (8, 5, 5, 5),    # fsq: levels per channel; codebook_size = prod(levels)
    "lfq_bits": 10,                # lfq: channels = bits; codebook_size = 2**bits
    "lfq_entropy_weight": 0.1,     # lfq: weight of (per-sample - codebook) entropy
    "lfq_commit_weight": 0.25,     # lfq: weight of the commitment loss
    "lfq_temperature": 0.01,       # lfq: softmax temperature of the soft assignment
    "lfq_entropy_group_bits": 10,  # lfq: entropy over bit groups of at most this size
}


def quantizer_options(model_config) -> Dict[str, Any]:
  """The QUANTIZER_DEFAULTS keys of a `config.model` (defaults where absent), as VQModel
  field values."""
  opts = {k: model_config.get(k, v) for k, v in QUANTIZER_DEFAULTS.items()}
  opts["fsq_levels"] = tuple(int(l) for l in opts["fsq_levels"])
  return opts


def codebook_size_of(kind: str, n_embed: int, fsq_levels: Sequence[int] = (),
                     lfq_bits: int = 0) -> int:
  """Number of codes of a quantizer kind: n_embed, except prod(fsq_levels) and 2**lfq_bits."""
  if kind == "fsq":
    return int(np.prod(fsq_levels))
  if kind == "lfq":
    return 2 ** int(lfq_bits)
  return int(n_embed)


def build_quantizer(kind: str = "vq", *, n_embed: int, embed_dim: int, beta: float = 0.25,
                    legacy: bool = True, codebook_dim: int = 0, l2_normalize: bool = False,
                    ema_decay: float = 0.99, ema_eps: float = 1e-5,
                    fsq_levels: Sequence[int] = (8, 5, 5, 5), lfq_bits: int = 10,
                    lfq_entropy_weight: float = 0.1, lfq_commit_weight: float = 0.25,
                    lfq_temperature: float = 0.01, lfq_entropy_group_bits: int = 10
                    ) -> nn.Module:
  """The quantizer module of a kind (unnamed: VQModel's setup names it `quantize`)."""
  if kind not in QUANTIZERS:
    raise ValueError(f"model.quantizer={kind!r}: must be one of {QUANTIZERS}")
  if kind == "vq":
    return VectorQuantizer(n_embed, embed_dim, beta, legacy, codebook_dim or None, l2_normalize)
  if kind == "simvq":
    return SimVQ(n_embed, embed_dim, beta, legacy, codebook_dim or None, l2_normalize)
  if kind == "vq_ema":
    if not 0.0 < ema_decay < 1.0:
      raise ValueError(f"model.ema_decay={ema_decay!r}: must be in (0, 1)")
    if ema_eps <= 0:
      raise ValueError(f"model.ema_eps={ema_eps!r}: must be positive")
    return EMAVectorQuantizer(n_embed, embed_dim, beta, legacy, codebook_dim or None,
                              l2_normalize, ema_decay=ema_decay, ema_eps=ema_eps)
  if codebook_dim or l2_normalize:
    raise ValueError(f"model.quantizer={kind!r} has no codebook to look up: "
                     "model.codebook_dim must be 0 and model.l2_normalize False")
  if kind == "fsq":
    levels = tuple(int(l) for l in fsq_levels)
    if not levels or min(levels) < 2:
      raise ValueError(f"model.fsq_levels={fsq_levels!r}: needs at least one level count, "
                       "each >= 2")
    if np.prod(levels, dtype=np.float64) >= 2 ** 31:
      raise ValueError(f"model.fsq_levels={fsq_levels!r}: prod(levels) must be < 2**31")
    return FSQ(embed_dim, levels)
  if not 1 <= lfq_bits <= 30:
    raise ValueError(f"model.lfq_bits={lfq_bits!r}: must be in [1, 30]")
  if lfq_temperature <= 0:
    raise ValueError(f"model.lfq_temperature={lfq_temperature!r}: must be positive")
  return LFQ(embed_dim, int(lfq_bits), lfq_entropy_weight, lfq_commit_weight, lfq_temperature,
             int(lfq_entropy_group_bits))


def make_quantizer(model_config, dtype: Any = None) -> nn.Module:
  """The quantizer of a `config.model` (kind from `model.quantizer`, "vq" if absent).

  Raises ValueError when model.n_embed differs from the kind's codebook size (fsq:
  prod(fsq_levels), lfq: 2**lfq_bits): the trainer, checkpoints and stage 2 size
  everything by model.n_embed. `dtype` is accepted for symmetry with
  vqmodel_from_config and unused: quantizers compute in float32 and return z's dtype.
  """
  del dtype
  c, opts = model_config, quantizer_options(model_config)
  kind = opts.pop("quantizer")
  size = codebook_size_of(kind, c.n_embed, opts["fsq_levels"], opts["lfq_bits"])
  if int(c.n_embed) != size:
    raise ValueError(f"model.n_embed={c.n_embed!r}: model.quantizer={kind!r} with these "
                     f"levels/bits has {size} codes; set model.n_embed={size}")
  return build_quantizer(kind, n_embed=c.n_embed, embed_dim=c.embed_dim, beta=c.beta,
                         legacy=c.legacy_beta, codebook_dim=c.codebook_dim,
                         l2_normalize=c.l2_normalize, **opts)
