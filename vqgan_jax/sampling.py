"""Autoregressive samplers for the stage-2 GPT (pure functions, deterministic given a key).

  filter_logits          top-k / nucleus (top-p) masking of logits
  sample_from_logits     temperature / greedy / filtered categorical draw
  sample                 prefill the KV cache with a prefix, then decode in one compiled scan
  sample_naive           the same, recomputing the full forward pass at every step
  sample_sliding_window  taming's sampler for token grids larger than the trained window

Keying: every sample (batch row) has a global index n (`first_index` + its row) and its
own key `fold_in(key, n)`; the token it generates at step p (0-based among generated
tokens; for grids, the raster index i * grid_w + j) is drawn with
`fold_in(fold_in(key, n), p)`. A sample's tokens therefore depend on the key, its index and
its prefix only -- not on the batch it was drawn in, nor on how many devices share that
batch. All samplers share this, so they produce the same tokens for the same key wherever
their logits agree (the sliding-window sampler on a grid the size of its window equals
`sample`).

Sharded sampling: `sample(..., mesh=mesh)` with the prefix a global array split over the
mesh's batch axes (data x fsdp; `sharding.batch_sharding`) and the params replicated
draws each device's rows on that device: the per-sample keys, the KV cache (whose leading
B * H dim is the batch) and the tokens stay split over the batch axes, so the compiled
loop needs no communication. The result is the same, token for token, as on one device.

Conditioning is given as token prefixes already mapped to their id ranges; the model's
vocabulary covers image codes [0, n_codes) plus conditioning ids above. Pass
`num_image_codes` to restrict sampled tokens to [0, num_image_codes).
"""

import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from vqgan_jax import sharding
from vqgan_jax.models.transformer import GPT


def filter_logits(logits: jax.Array, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> jax.Array:
  """Set filtered-out entries of logits (..., V) to -inf.

  top_k: keep the k largest (ties with the k-th value are all kept). Static int.
  top_p: keep the smallest set of largest-probability tokens whose total mass is >= top_p
    (the most likely token is always kept; ties with the last kept value are kept).
    Applied after top_k, on the renormalised distribution. May be traced.
  """
  neg_inf = jnp.array(-jnp.inf, logits.dtype)
  if top_k is not None and top_k < logits.shape[-1]:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass strictly before each token: a token is needed while that mass is still < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


def restrict_to_image_codes(logits: jax.Array, num_image_codes: Optional[int]) -> jax.Array:
  """Mask every id >= num_image_codes (conditioning ids) so they are never sampled."""
  if num_image_codes is None or num_image_codes >= logits.shape[-1]:
    return logits
  ids = jnp.arange(logits.shape[-1])
  return jnp.where(ids < num_image_codes, logits, jnp.array(-jnp.inf, logits.dtype))


def sample_from_logits(logits: jax.Array, key: jax.Array, temperature=1.0,
                       top_k: Optional[int] = None, top_p=None,
                       num_image_codes: Optional[int] = None) -> jax.Array:
  """Draw one token per row of logits (B, V) -> (B,) int32. temperature == 0 is greedy
  (argmax); temperature may be traced (both branches are computed and selected)."""
  logits = restrict_to_image_codes(logits.astype(jnp.float32), num_image_codes)
  greedy = jnp.argmax(logits, axis=-1)
  temperature = jnp.asarray(temperature, jnp.float32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  drawn = jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def sample_keys(key: jax.Array, batch: int, first_index=0) -> jax.Array:
  """The keys of samples first_index .. first_index + batch - 1: `fold_in(key, n)` each
  (leading dim = batch; first_index may be traced)."""
  index = jnp.asarray(first_index, jnp.int32) + jnp.arange(batch, dtype=jnp.int32)
  return jax.vmap(lambda n: jax.random.fold_in(key, n))(index)


def draw_rows(logits: jax.Array, keys: jax.Array, step, temperature=1.0,
              top_k: Optional[int] = None, top_p=None,
              num_image_codes: Optional[int] = None) -> jax.Array:
  """`sample_from_logits` row by row: row r of logits (B, V) is drawn with
  `fold_in(keys[r], step)` -> (B,) int32."""
  def one(row, row_key):
    return sample_from_logits(row[None], jax.random.fold_in(row_key, step), temperature,
                              top_k, top_p, num_image_codes)[0]
  return jax.vmap(one)(logits, keys)


def draw_sharded_rows(logits: jax.Array, keys: jax.Array, step, mesh, temperature=1.0,
                      top_k: Optional[int] = None, top_p=None,
                      num_image_codes: Optional[int] = None) -> jax.Array:
  """`draw_rows` with rows split over the mesh's batch axes, each device drawing its own
  rows (a shard_map: the same tokens as `draw_rows`, with no gather of the logits, which
  XLA would insert around a top-k it cannot split by rows). Without a mesh: `draw_rows`."""
  if mesh is None:
    return draw_rows(logits, keys, step, temperature, top_k, top_p, num_image_codes)
  scalars = {"step": jnp.asarray(step, jnp.int32),
             "temperature": jnp.asarray(temperature, jnp.float32)}
  if top_p is not None:
    scalars["top_p"] = jnp.asarray(top_p, jnp.float32)

  def local(logits, keys, scalars):
    return draw_rows(logits, keys, scalars["step"], scalars["temperature"], top_k,
                     scalars.get("top_p"), num_image_codes)

  rows = P(sharding.BATCH_AXES)
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P()), out_specs=rows)(
      logits, keys, scalars)


def _batch_constraint(x: jax.Array, mesh, dim: int = 0) -> jax.Array:
  """x split over the mesh's batch axes along `dim` (other dims left to the compiler)."""
  if mesh is None:
    return x
  spec = [P.UNCONSTRAINED] * x.ndim
  spec[dim] = sharding.BATCH_AXES
  return lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def cache_shardings(model: GPT, batch: int, max_length: int, mesh) -> Any:
  """NamedShardings of `model.init_cache(batch, max_length)` that split every cache array
  over the mesh's batch axes along its batch dim (found as the dim that grows with the
  batch, whatever the cache layout: (B * H, L, D) keys/values, (B, H, D, D) linear-attention
  states, or layer-stacked arrays); arrays without one (the position index) are replicated."""
  one = jax.eval_shape(lambda: model.init_cache(batch, max_length))
  two = jax.eval_shape(lambda: model.init_cache(2 * batch, max_length))

  def leaf(a, b):
    grown = [d for d, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n]
    if not grown:
      return NamedSharding(mesh, P())
    spec = [P.UNCONSTRAINED] * len(a.shape)
    spec[grown[0]] = sharding.BATCH_AXES
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map(leaf, one, two)


def _cache_constraint(cache: Any, shardings: Any) -> Any:
  if shardings is None:
    return cache
  return jax.tree_util.tree_map(lax.with_sharding_constraint, cache, shardings)


def _with_uncond(prefix: jax.Array, cfg_scale, uncond_prefix) -> Tuple[jax.Array, bool]:
  """With guidance on, a doubled batch: each sample's conditional row followed by its
  unconditional one (rows 2n, 2n + 1), so a batch split over devices keeps both rows of a
  sample on the same device."""
  if cfg_scale is None:
    return prefix, False
  if uncond_prefix is None:
    raise ValueError("cfg_scale needs uncond_prefix")
  uncond_prefix = jnp.broadcast_to(uncond_prefix, prefix.shape).astype(prefix.dtype)
  return jnp.stack([prefix, uncond_prefix], axis=1).reshape(-1, prefix.shape[1]), True


def _guide(logits: jax.Array, guided: bool, cfg_scale) -> jax.Array:
  """Mix the doubled batch: uncond + scale * (cond - uncond)."""
  if not guided:
    return logits
  pairs = logits.reshape(-1, 2, logits.shape[-1])
  cond, uncond = pairs[:, 0], pairs[:, 1]
  return uncond + cfg_scale * (cond - uncond)


def _double(token: jax.Array, guided: bool) -> jax.Array:
  """A sampled token (B,) for both rows of each sample of the doubled batch."""
  return jnp.repeat(token, 2, axis=0) if guided else token


def _check_lengths(model: GPT, prefix_len: int, num_tokens: int):
  if prefix_len < 1:
    raise ValueError("sampling needs a prefix of at least one token (e.g. a start token)")
  if num_tokens < 1:
    raise ValueError("num_tokens must be >= 1")
  if prefix_len + num_tokens - 1 > model.block_size:
    raise ValueError(f"prefix {prefix_len} + {num_tokens} tokens exceeds block_size "
                     f"{model.block_size} (the last token is never fed back)")


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "top_k", "num_image_codes",
                                             "mesh"))
def sample(params: Any, model: GPT, prefix_tokens: jax.Array, num_tokens: int, key: jax.Array,
           temperature=1.0, top_k: Optional[int] = None, top_p=None, cfg_scale=None,
           uncond_prefix: Optional[jax.Array] = None,
           num_image_codes: Optional[int] = None, first_index=0, mesh=None) -> jax.Array:
  """Sample num_tokens tokens after prefix_tokens (B, P) with the KV cache -> (B, num_tokens).

  The prefix fills the cache in one parallel pass; the remaining steps run in one lax.scan.
  Row r is sample `first_index + r` (see the module doc for its keys; first_index may be
  traced, so consecutive batches of one run share a compilation).
  Classifier-free guidance: with cfg_scale, uncond_prefix ((B, P) or (1, P), same length as
  the prefix) runs beside each conditional row in a doubled batch and logits are mixed as
  uncond + cfg_scale * (cond - uncond); both rows are fed the same sampled token.
  With `mesh` (static), the batch -- prefix rows, per-sample keys, KV cache, tokens -- is
  kept split over the mesh's batch axes (B must divide evenly); pass the prefix as a
  global array with `sharding.batch_sharding(mesh)` and the params replicated.
  """
  batch, prefix_len = prefix_tokens.shape
  _check_lengths(model, prefix_len, num_tokens)
  prefix_tokens = _batch_constraint(prefix_tokens.astype(jnp.int32), mesh)
  tokens, guided = _with_uncond(prefix_tokens, cfg_scale, uncond_prefix)
  tokens = _batch_constraint(tokens, mesh)
  keys = _batch_constraint(sample_keys(key, batch, first_index), mesh)
  draw = functools.partial(draw_sharded_rows, mesh=mesh, temperature=temperature, top_k=top_k,
                           top_p=top_p, num_image_codes=num_image_codes)

  # The cache only needs the positions that are fed: the prefix and all but the last token.
  length = prefix_len + num_tokens - 1
  shardings = None if mesh is None else cache_shardings(model, tokens.shape[0], length, mesh)
  cache = _cache_constraint(model.init_cache(tokens.shape[0], length), shardings)
  logits, cache = model.apply(params, tokens, cache, method=GPT.prefill)
  cache = _cache_constraint(cache, shardings)
  first = draw(_guide(logits[:, -1], guided, cfg_scale), keys, 0)

  def body(carry, step):
    token, cache = carry
    logits, cache = model.apply(params, _double(token, guided)[:, None], prefix_len + step - 1,
                                cache, method=GPT.decode_step)
    token = draw(_guide(logits, guided, cfg_scale), keys, step)
    return (token, _cache_constraint(cache, shardings)), token

  _, rest = lax.scan(body, (first, cache), jnp.arange(1, num_tokens, dtype=jnp.int32))
  return _batch_constraint(jnp.concatenate([first[:, None], rest.T], axis=1), mesh)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "top_k", "num_image_codes"))
def sample_naive(params: Any, model: GPT, prefix_tokens: jax.Array, num_tokens: int,
                 key: jax.Array, temperature=1.0, top_k: Optional[int] = None, top_p=None,
                 cfg_scale=None, uncond_prefix: Optional[jax.Array] = None,
                 num_image_codes: Optional[int] = None, first_index=0) -> jax.Array:
  """`sample` without a cache: every step runs the full forward pass (tests, benchmarks).

  The sequence lives in a fixed-length buffer so the loop compiles once; positions after
  the current one hold placeholders that causal attention never lets earlier logits see.
  """
  batch, prefix_len = prefix_tokens.shape
  _check_lengths(model, prefix_len, num_tokens)
  tokens, guided = _with_uncond(prefix_tokens.astype(jnp.int32), cfg_scale, uncond_prefix)
  keys = sample_keys(key, batch, first_index)
  length = prefix_len + num_tokens - 1
  # One slot more than is ever fed, so the last token is written like the others.
  seq = jnp.pad(tokens, ((0, 0), (0, num_tokens)))

  def body(step, seq):
    logits = model.apply(params, seq[:, :length])
    logits = lax.dynamic_index_in_dim(logits, prefix_len + step - 1, axis=1, keepdims=False)
    token = draw_rows(_guide(logits, guided, cfg_scale), keys, step, temperature, top_k, top_p,
                      num_image_codes)
    return lax.dynamic_update_index_in_dim(seq, _double(token, guided), prefix_len + step,
                                           axis=1)

  seq = lax.fori_loop(0, num_tokens, body, seq)
  return seq[::2 if guided else 1, prefix_len:]


def window_origin(i, j, grid_h: int, grid_w: int, window_h: int, window_w: int):
  """Top-left corner of the window used to sample grid position (i, j).

  As the reference taming sampler: the target sits at the window centre (wh//2, ww//2) in
  the interior and the window is clamped at the borders. Written as a clip so it stays in
  bounds for odd window sizes too (the reference's piecewise formula overruns by one there):
    top = clip(i - wh//2, 0, H - wh), local_i = i - top  (same for columns).
  """
  top = jnp.clip(i - window_h // 2, 0, grid_h - window_h)
  left = jnp.clip(j - window_w // 2, 0, grid_w - window_w)
  return top, left


@functools.partial(jax.jit, static_argnames=("model", "grid_h", "grid_w", "window_h", "window_w",
                                             "top_k", "num_image_codes", "return_info",
                                             "use_cache"))
def sample_sliding_window(params: Any, model: GPT, cond_tokens: Optional[jax.Array], grid_h: int,
                          grid_w: int, window_h: int, window_w: int, key: jax.Array,
                          temperature=1.0, top_k: Optional[int] = None, top_p=None,
                          spatial_cond: Optional[jax.Array] = None,
                          num_image_codes: Optional[int] = None, return_info: bool = False,
                          use_cache: bool = True, first_index=0):
  """Sample a (B, grid_h, grid_w) token grid with a model trained on window_h x window_w.

  Positions are visited in raster order. For target (i, j) the window at `window_origin`
  is cropped from the current grid (lax.dynamic_slice) and flattened row-major; the model
  sees [cond_tokens (B, Pc), spatial_cond cropped with the same window and flattened
  (B, wh*ww) if given, window tokens] and the target is drawn from the logits at the
  position before its flat index local_i * ww + local_j. Window tokens after the target
  are stale placeholders that causal attention hides. One compiled fori_loop.

  Where a position has the same window origin as the one before (along the clamped
  borders, or everywhere when the grid is the window), the window holds the same tokens up
  to the target, so with `use_cache` (softmax attention only) that position is one KV-cache
  decoding step on the token just sampled; any other position runs the full window forward
  (as the reference does for all of them) and refills the cache. Without `use_cache`, or
  with linear attention (whose state would absorb the stale tokens), every position runs
  the full forward.

  With return_info, also returns {"visits": (H, W) number of times each position was
  sampled, "order": (H, W) the step that sampled it, "top"/"left": (H*W,) window origins,
  "cached": (H, W) whether it was a KV-cache decoding step}.
  """
  if grid_h < window_h or grid_w < window_w:
    raise ValueError("the grid must be at least as large as the window")
  parts = [x for x in (cond_tokens, spatial_cond) if x is not None]
  if not parts:
    raise ValueError("need cond_tokens and/or spatial_cond (at least one prefix token)")
  batch = parts[0].shape[0]
  if cond_tokens is None:
    cond_tokens = jnp.zeros((batch, 0), jnp.int32)
  prefix_len = cond_tokens.shape[1] + (window_h * window_w if spatial_cond is not None else 0)

  def prefix(top, left):
    seq = [cond_tokens.astype(jnp.int32)]
    if spatial_cond is not None:
      seq.append(crop_window(spatial_cond.astype(jnp.int32), top, left, window_h, window_w))
    return jnp.concatenate(seq, axis=1)

  return sliding_window_loop(params, model, prefix, prefix_len, batch, grid_h, grid_w,
                             window_h, window_w, key, temperature, top_k, top_p,
                             num_image_codes, return_info, use_cache, first_index)


def crop_window(x: jax.Array, top, left, window_h: int, window_w: int) -> jax.Array:
  """The window of x (B, H, W) at (top, left), flattened row-major -> (B, wh * ww)."""
  return lax.dynamic_slice(x, (0, top, left), (x.shape[0], window_h, window_w)).reshape(
      x.shape[0], -1)


def sliding_window_loop(params: Any, model: GPT,
                        prefix: Callable[[jax.Array, jax.Array], jax.Array], prefix_len: int, batch: int, grid_h: int, grid_w: int, window_h: int,
                        window_w: int, key: jax.Array, temperature=1.0,
                        top_k: Optional[int] = None, top_p=None,
                        num_image_codes: Optional[int] = None, return_info: bool = False,
                        use_cache: bool = True, first_index=0):
  """The loop of `sample_sliding_window` (traced inside a caller's jit): `prefix(top, left)`
  gives the (B, prefix_len) tokens the model sees before the window at that origin (the
  condition, a cropped spatial condition, or coordinate tokens of the origin); everything
  else is as described there."""
  _check_lengths(model, prefix_len, window_h * window_w)
  length = prefix_len + window_h * window_w - 1
  use_cache = use_cache and model.attention == "softmax"
  keys = sample_keys(key, batch, first_index)

  def window_logits(grid, top, left, flat, with_cache: bool):
    """Full forward over the window: the target's logits, and with_cache a fresh cache
    holding the window (slots after the target hold stale tokens that later steps
    overwrite before they attend to them)."""
    seq = jnp.concatenate([prefix(top, left), crop_window(grid, top, left, window_h, window_w)],
                          axis=1)[:, :length]
    cache = None
    if not with_cache:
      logits = model.apply(params, seq)
    else:
      logits, cache = model.apply(params, seq, model.init_cache(batch, length),
                                  method=GPT.prefill)
    logits = lax.dynamic_index_in_dim(logits, prefix_len + flat - 1, axis=1, keepdims=False)
    return logits, cache

  def body(p, carry):
    grid, info, state = carry
    i, j = p // grid_w, p % grid_w
    top, left = window_origin(i, j, grid_h, grid_w, window_h, window_w)
    flat = (i - top) * window_w + (j - left)
    same = jnp.bool_(False)
    if state is None:
      logits, _ = window_logits(grid, top, left, flat, False)
    else:
      # Same origin as the previous position: that position was flat - 1 in this window,
      # and the cache holds the window up to the token before it.
      same = (p > 0) & (top == state["top"]) & (left == state["left"])
      decode = lambda cache: model.apply(params, state["token"][:, None], prefix_len + flat - 1,
                                         cache, method=GPT.decode_step)
      logits, cache = lax.cond(same, decode,
                               lambda _: window_logits(grid, top, left, flat, True),
                               state["cache"])
    token = draw_rows(logits, keys, p, temperature, top_k, top_p, num_image_codes)
    grid = grid.at[:, i, j].set(token)
    if state is not None:
      state = {"cache": cache, "token": token, "top": top, "left": left}
    if info is not None:
      info = {"visits": info["visits"].at[i, j].add(1), "order": info["order"].at[i, j].set(p),
              "top": info["top"].at[p].set(top), "left": info["left"].at[p].set(left),
              "cached": info["cached"].at[i, j].set(same)}
    return grid, info, state

  n = grid_h * grid_w
  info = None
  if return_info:
    info = {"visits": jnp.zeros((grid_h, grid_w), jnp.int32),
            "order": jnp.full((grid_h, grid_w), -1, jnp.int32),
            "top": jnp.zeros((n,), jnp.int32), "left": jnp.zeros((n,), jnp.int32),
            "cached": jnp.zeros((grid_h, grid_w), bool)}
  state = None
  if use_cache:
    state = {"cache": model.init_cache(batch, length), "token": jnp.zeros((batch,), jnp.int32),
             "top": jnp.int32(-1), "left": jnp.int32(-1)}
  grid = jnp.zeros((batch, grid_h, grid_w), jnp.int32)
  grid, info, _ = lax.fori_loop(0, n, body, (grid, info, state))
  return (grid, info) if return_info else grid
