"""Swappable causal attention kernels for the stage-2 GPT.

The GPT's attention layer computes q, k, v projections and hands the head-split tensors
(layout (B, T, H, D)) to one of the kernels here; which one is chosen by `GPT.attention`.
Every kernel has the same four operations:

  init_cache(batch, max_length, n_head, head_dim, dtype) -> cache (dict pytree)
  parallel(q, k, v)                    -> out           causal attention over a whole sequence
  prefill(q, k, v, cache, start)       -> (out, cache)  parallel pass over a chunk whose first
                                                        token sits at position `start` (traced)
  step(q, k, v, position, cache)       -> (out, cache)  one token (T == 1) at `position`

Kernels:
  SoftmaxAttention  scaled dot-product attention (scale D^-0.5, as minGPT). The cache holds
                    the keys and values with batch and heads folded, (B * H, max_length, D).
  LinearAttention   causal linear attention (Katharopoulos et al. 2020) with the feature map
                    phi(x) = elu(x) + 1:
                      out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),
                      S_i = sum_{j<=i} phi(k_j) v_j^T,   z_i = sum_{j<=i} phi(k_j).
                    `parallel`/`prefill` use a chunked form (quadratic masked attention inside
                    a chunk of `chunk_size`, prefix state carried across chunks by lax.scan);
                    `step` is the O(1) recurrence. The cache is the state: S (B, H, D, D) and
                    z (B, H, D), kept in float32 because they are running sums.

`naive_linear_attention` is the O(T^2) masked reference the tests compare against.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from vqgan_jax import sharding

Cache = Dict[str, jax.Array]


# --------------------------------------------------------------------------------------
# Softmax attention
# --------------------------------------------------------------------------------------


def _head_major_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                          mask: jax.Array, dropout=None) -> jax.Array:
  """Softmax attention of q (..., Tq, D) over keys/values (..., Tk, D) with the same leading
  (batch) dimensions, e.g. (B, H) or (B * H,), where query i sees key j iff mask[i, j];
  returns (..., Tq, D). Scores and softmax in float32."""
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  scores = jnp.einsum("...qd,...kd->...qk", q * scale, keys.astype(q.dtype),
                      preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum("...qk,...kd->...qd", probs.astype(q.dtype), values.astype(q.dtype))


def causal_query_blocks(t: int, max_blocks: int = 8, min_size: int = 64):
  """[(start, end)] of the query blocks `causal_softmax_attention` uses for length t: at
  most `max_blocks` blocks of at least `min_size` queries (one block below that)."""
  size = max(min_size, -(-t // max_blocks))
  return [(start, min(start + size, t)) for start in range(0, t, size)]


def causal_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                             dropout: Optional[Callable[[jax.Array], jax.Array]] = None
                             ) -> jax.Array:
  """Causal attention of q, k, v (B, T, H, D) -> (B, T, H, D), computed head-major.

  The same math as jax.nn.dot_product_attention(is_causal=True), faster on XLA:CPU
  (`python -m vqgan_jax.bench --task attention` compares the two). The queries are split
  into blocks (`causal_query_blocks`) and each block attends only to the keys up to its
  last query, so the score entries above the diagonal blocks are never computed (with 4
  blocks, 37.5% fewer); a query's softmax is over the same visible keys as without blocks.
  `dropout`, if given, acts on the attention probabilities (minGPT's attn_drop).
  """
  qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
  outs = []
  for start, end in causal_query_blocks(q.shape[1]):
    mask = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    outs.append(_head_major_attention(qh[:, :, start:end], kh[:, :, :end], vh[:, :, :end],
                                      mask, dropout))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return out.transpose(0, 2, 1, 3)


def _fold_heads(x: jax.Array) -> jax.Array:
  """(B, T, H, D) -> (B * H, T, D), the layout of the softmax cache."""
  b, t, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, t, d)


def _cached_softmax_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                              q_positions: jax.Array) -> jax.Array:
  """Attention of q (B, Tq, H, D) over a cache keys/values (B * H, L, D) whose slot j holds
  position j; slot j is visible to query i iff j <= q_positions[i]. Returns (B, Tq, H, D).

  The matmuls take the cache exactly as stored (one batch dimension), so nothing between
  the cache update and the matmul reshapes it: a reshape there makes XLA:CPU fuse the
  update twice and copy every layer's cache at every decoding step.
  """
  b, t, h, d = q.shape
  mask = jnp.arange(keys.shape[1])[None, :] <= q_positions[:, None]  # (Tq, L)
  out = _head_major_attention(_fold_heads(q), keys, values, mask)
  return out.reshape(b, h, t, d).transpose(0, 2, 1, 3)


@dataclasses.dataclass(frozen=True)
class SoftmaxAttention:
  """Causal softmax attention with a key/value cache of shape (B * H, L, D): batch and
  heads folded into one leading dimension, head-major inside each sequence."""

  def init_cache(self, batch_size: int, max_length: int, n_head: int, head_dim: int,
                 dtype: Any = jnp.float32) -> Cache:
    shape = (batch_size * n_head, max_length, head_dim)
    return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}

  def parallel(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    if sharding.on_platform("cpu"):  # the traced step's target (AOT TPU compiles included)
      return causal_softmax_attention(q, k, v)
    # GPU/TPU: the fused op (cuDNN flash attention where available).
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)

  def prefill(self, q: jax.Array, k: jax.Array, v: jax.Array, cache: Cache,
              start: jax.Array) -> Tuple[jax.Array, Cache]:
    t = q.shape[1]
    if k.shape[0] * k.shape[2] != cache["key"].shape[0]:
      raise ValueError(f"cache holds {cache['key'].shape[0]} batch x head rows, the input "
                       f"{k.shape[0]} x {k.shape[2]}: build it with init_cache for this batch")
    # Writing at a traced offset; out-of-range offsets are clamped by dynamic_update_slice,
    # so callers must keep start + T <= max_length. Only the T new rows are transposed.
    keys = lax.dynamic_update_slice_in_dim(
        cache["key"], _fold_heads(k).astype(cache["key"].dtype), start, 1)
    values = lax.dynamic_update_slice_in_dim(
        cache["value"], _fold_heads(v).astype(cache["value"].dtype), start, 1)
    # Attend over the whole buffer; slots beyond the last written position are masked out.
    out = _cached_softmax_attention(q, keys, values, start + jnp.arange(t))
    return out, {"key": keys, "value": values}

  def step(self, q: jax.Array, k: jax.Array, v: jax.Array, position: jax.Array,
           cache: Cache) -> Tuple[jax.Array, Cache]:
    return self.prefill(q, k, v, cache, position)


# --------------------------------------------------------------------------------------
# Linear attention
# --------------------------------------------------------------------------------------


def elu_feature_map(x: jax.Array) -> jax.Array:
  """phi(x) = elu(x) + 1, positive so the normaliser phi(q)^T z is > 0."""
  return jax.nn.elu(x) + 1.0


def naive_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           eps: float = 1e-6) -> jax.Array:
  """O(T^2) reference: out_i = sum_{j<=i} a_ij v_j / (sum_{j<=i} a_ij + eps),
  with a_ij = phi(q_i) . phi(k_j)."""
  qf = elu_feature_map(q.astype(jnp.float32))
  kf = elu_feature_map(k.astype(jnp.float32))
  t = q.shape[1]
  a = jnp.einsum("bihd,bjhd->bhij", qf, kf) * jnp.tril(jnp.ones((t, t), jnp.float32))
  num = jnp.einsum("bhij,bjhe->bihe", a, v.astype(jnp.float32))
  den = jnp.einsum("bhij->bih", a)[..., None]
  return (num / (den + eps)).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class LinearAttention:
  """Causal linear attention; chunked parallel form + recurrent decoding step."""
  chunk_size: int = 64
  eps: float = 1e-6

  def init_cache(self, batch_size: int, max_length: Optional[int], n_head: int, head_dim: int,
                 dtype: Any = jnp.float32) -> Cache:
    del max_length, dtype  # the state is O(1) in length and kept in float32
    return {"S": jnp.zeros((batch_size, n_head, head_dim, head_dim), jnp.float32),
            "z": jnp.zeros((batch_size, n_head, head_dim), jnp.float32)}

  def chunked(self, q: jax.Array, k: jax.Array, v: jax.Array,
              state: Optional[Cache] = None) -> Tuple[jax.Array, Cache]:
    """Chunked causal linear attention continuing from `state` (zeros if None).

    Returns the output (B, T, H, Dv) in q's dtype and the state after the last token.
    """
    b, t, h, d = q.shape
    dv = v.shape[-1]
    c = max(1, min(self.chunk_size, t))
    n_chunks = -(-t // c)
    pad = n_chunks * c - t
    qf = elu_feature_map(q.astype(jnp.float32))
    kf = elu_feature_map(k.astype(jnp.float32))
    vf = v.astype(jnp.float32)
    if pad:
      # Padded keys must contribute nothing to the carried state (phi(0) = 1 != 0), so their
      # features are zeroed, not just the inputs; padded queries are sliced off at the end.
      widths = ((0, 0), (0, pad), (0, 0), (0, 0))
      qf = jnp.pad(qf, widths)
      kf = jnp.pad(kf, widths)
      vf = jnp.pad(vf, widths)

    def to_chunks(x):  # (B, N*C, H, E) -> (N, B, C, H, E)
      return jnp.moveaxis(x.reshape(b, n_chunks, c, h, x.shape[-1]), 1, 0)

    if state is None:
      state = self.init_cache(b, None, h, d)
    causal = jnp.tril(jnp.ones((c, c), jnp.float32))

    def body(carry, chunk):
      s, z = carry["S"], carry["z"]
      qc, kc, vc = chunk
      a = jnp.einsum("bihd,bjhd->bhij", qc, kc) * causal  # intra-chunk kernel weights
      num = jnp.einsum("bhij,bjhe->bihe", a, vc) + jnp.einsum("bihd,bhde->bihe", qc, s)
      den = jnp.einsum("bhij->bih", a) + jnp.einsum("bihd,bhd->bih", qc, z)
      out = num / (den[..., None] + self.eps)
      new = {"S": s + jnp.einsum("bjhd,bjhe->bhde", kc, vc), "z": z + jnp.sum(kc, axis=1)}
      return new, out

    state, out = lax.scan(body, state, (to_chunks(qf), to_chunks(kf), to_chunks(vf)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * c, h, dv)[:, :t]
    return out.astype(q.dtype), state

  def parallel(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return self.chunked(q, k, v)[0]

  def prefill(self, q: jax.Array, k: jax.Array, v: jax.Array, cache: Cache,
              start: jax.Array) -> Tuple[jax.Array, Cache]:
    del start  # the state already summarises every earlier position
    return self.chunked(q, k, v, cache)

  def step(self, q: jax.Array, k: jax.Array, v: jax.Array, position: jax.Array,
           cache: Cache) -> Tuple[jax.Array, Cache]:
    """One token: q, k, v (B, 1, H, D). The state includes the current key (j <= i)."""
    del position
    qf = elu_feature_map(q[:, 0].astype(jnp.float32))
    kf = elu_feature_map(k[:, 0].astype(jnp.float32))
    s = cache["S"] + jnp.einsum("bhd,bhe->bhde", kf, v[:, 0].astype(jnp.float32))
    z = cache["z"] + kf
    num = jnp.einsum("bhd,bhde->bhe", qf, s)
    den = jnp.einsum("bhd,bhd->bh", qf, z)
    out = num / (den[..., None] + self.eps)
    return out[:, None].astype(q.dtype), {"S": s, "z": z}


def recurrent_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = 1e-6,
                               state: Optional[Cache] = None) -> Tuple[jax.Array, Cache]:
  """Token-by-token linear attention (lax.scan over `LinearAttention.step`)."""
  kernel = LinearAttention(eps=eps)
  if state is None:
    state = kernel.init_cache(q.shape[0], None, q.shape[2], q.shape[3])

  def body(carry, x):
    qt, kt, vt = (y[:, None] for y in x)
    out, carry = kernel.step(qt, kt, vt, jnp.zeros((), jnp.int32), carry)
    return carry, out[:, 0]

  state, out = lax.scan(body, state, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v)))
  return jnp.moveaxis(out, 0, 1), state


def get_attention(kind: str, linear_chunk_size: int = 64):
  """The kernel for `GPT.attention`: "softmax" or "linear"."""
  if kind == "softmax":
    return SoftmaxAttention()
  if kind == "linear":
    return LinearAttention(chunk_size=linear_chunk_size)
  raise ValueError(f"unknown attention kind {kind!r}; expected 'softmax' or 'linear'")
