"""Autoregressive samplers for the stage-2 GPT (pure functions, deterministic given a key).

  filter_logits          top-k / nucleus (top-p) masking of logits
  sample_from_logits     temperature / greedy / filtered categorical draw
  sample                 prefill the KV cache with a prefix, then decode in one compiled scan
  sample_naive           the same, recomputing the full forward pass at every step
  sample_sliding_window  taming's sampler for token grids larger than the trained window

Keying: the token generated at step p (0-based among generated tokens; for grids, the
raster index i * grid_w + j) is drawn with `jax.random.fold_in(key, p)`. All samplers
share this, so they produce the same tokens for the same key wherever their logits agree
(the sliding-window sampler on a grid the size of its window equals `sample`).

Conditioning is given as token prefixes already mapped to their id ranges; the model's
vocabulary covers image codes [0, n_codes) plus conditioning ids above. Pass
`num_image_codes` to restrict sampled tokens to [0, num_image_codes).
"""

import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

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


def _with_uncond(prefix: jax.Array, cfg_scale, uncond_prefix) -> Tuple[jax.Array, bool]:
  """Stack the unconditional prefix under the conditional one when guidance is on."""
  if cfg_scale is None:
    return prefix, False
  if uncond_prefix is None:
    raise ValueError("cfg_scale needs uncond_prefix")
  uncond_prefix = jnp.broadcast_to(uncond_prefix, prefix.shape).astype(prefix.dtype)
  return jnp.concatenate([prefix, uncond_prefix], axis=0), True


def _guide(logits: jax.Array, guided: bool, cfg_scale) -> jax.Array:
  """Mix the doubled batch: uncond + scale * (cond - uncond)."""
  if not guided:
    return logits
  cond, uncond = jnp.split(logits, 2, axis=0)
  return uncond + cfg_scale * (cond - uncond)


def _check_lengths(model: GPT, prefix_len: int, num_tokens: int):
  if prefix_len < 1:
    raise ValueError("sampling needs a prefix of at least one token (e.g. a start token)")
  if num_tokens < 1:
    raise ValueError("num_tokens must be >= 1")
  if prefix_len + num_tokens - 1 > model.block_size:
    raise ValueError(f"prefix {prefix_len} + {num_tokens} tokens exceeds block_size "
                     f"{model.block_size} (the last token is never fed back)")


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "top_k", "num_image_codes"))
def sample(params: Any, model: GPT, prefix_tokens: jax.Array, num_tokens: int, key: jax.Array,
           temperature=1.0, top_k: Optional[int] = None, top_p=None, cfg_scale=None,
           uncond_prefix: Optional[jax.Array] = None,
           num_image_codes: Optional[int] = None) -> jax.Array:
  """Sample num_tokens tokens after prefix_tokens (B, P) with the KV cache -> (B, num_tokens).

  The prefix fills the cache in one parallel pass; the remaining steps run in one lax.scan.
  Classifier-free guidance: with cfg_scale, uncond_prefix ((B, P) or (1, P), same length as
  the prefix) runs as the second half of a doubled batch and logits are mixed as
  uncond + cfg_scale * (cond - uncond); both halves are fed the same sampled token.
  """
  batch, prefix_len = prefix_tokens.shape
  _check_lengths(model, prefix_len, num_tokens)
  tokens, guided = _with_uncond(prefix_tokens.astype(jnp.int32), cfg_scale, uncond_prefix)
  draw = functools.partial(sample_from_logits, temperature=temperature, top_k=top_k,
                           top_p=top_p, num_image_codes=num_image_codes)
  double = (lambda t: jnp.concatenate([t, t], axis=0)) if guided else (lambda t: t)

  # The cache only needs the positions that are fed: the prefix and all but the last token.
  cache = model.init_cache(tokens.shape[0], prefix_len + num_tokens - 1)
  logits, cache = model.apply(params, tokens, cache, method=GPT.prefill)
  first = draw(_guide(logits[:, -1], guided, cfg_scale), jax.random.fold_in(key, 0))

  def body(carry, step):
    token, cache = carry
    logits, cache = model.apply(params, double(token)[:, None], prefix_len + step - 1, cache,
                                method=GPT.decode_step)
    token = draw(_guide(logits, guided, cfg_scale), jax.random.fold_in(key, step))
    return (token, cache), token

  _, rest = lax.scan(body, (first, cache), jnp.arange(1, num_tokens, dtype=jnp.int32))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "top_k", "num_image_codes"))
def sample_naive(params: Any, model: GPT, prefix_tokens: jax.Array, num_tokens: int,
                 key: jax.Array, temperature=1.0, top_k: Optional[int] = None, top_p=None,
                 cfg_scale=None, uncond_prefix: Optional[jax.Array] = None,
                 num_image_codes: Optional[int] = None) -> jax.Array:
  """`sample` without a cache: every step runs the full forward pass (tests, benchmarks).

  The sequence lives in a fixed-length buffer so the loop compiles once; positions after
  the current one hold placeholders that causal attention never lets earlier logits see.
  """
  batch, prefix_len = prefix_tokens.shape
  _check_lengths(model, prefix_len, num_tokens)
  tokens, guided = _with_uncond(prefix_tokens.astype(jnp.int32), cfg_scale, uncond_prefix)
  length = prefix_len + num_tokens - 1
  # One slot more than is ever fed, so the last token is written like the others.
  seq = jnp.pad(tokens, ((0, 0), (0, num_tokens)))

  def body(step, seq):
    logits = model.apply(params, seq[:, :length])
    logits = lax.dynamic_index_in_dim(logits, prefix_len + step - 1, axis=1, keepdims=False)
    token = sample_from_logits(_guide(logits, guided, cfg_scale), jax.random.fold_in(key, step),
                               temperature, top_k, top_p, num_image_codes)
    if guided:
      token = jnp.concatenate([token, token], axis=0)
    return lax.dynamic_update_index_in_dim(seq, token, prefix_len + step, axis=1)

  seq = lax.fori_loop(0, num_tokens, body, seq)
  return seq[:batch, prefix_len:]


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
                          use_cache: bool = True):
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
                             num_image_codes, return_info, use_cache)


def crop_window(x: jax.Array, top, left, window_h: int, window_w: int) -> jax.Array:
  """The window of x (B, H, W) at (top, left), flattened row-major -> (B, wh * ww)."""
  return lax.dynamic_slice(x, (0, top, left), (x.shape[0], window_h, window_w)).reshape(
      x.shape[0], -1)


def sliding_window_loop(params: Any, model: GPT,
                        prefix: Callable[[jax.Array, jax.Array], jax.Array], prefix_len: int, batch: int, grid_h: int, grid_w: int, window_h: int,
                        window_w: int, key: jax.Array, temperature=1.0,
                        top_k: Optional[int] = None, top_p=None,
                        num_image_codes: Optional[int] = None, return_info: bool = False,
                        use_cache: bool = True):
  """The loop of `sample_sliding_window` (traced inside a caller's jit): `prefix(top, left)`
  gives the (B, prefix_len) tokens the model sees before the window at that origin (the
  condition, a cropped spatial condition, or coordinate tokens of the origin); everything
  else is as described there."""
  _check_lengths(model, prefix_len, window_h * window_w)
  length = prefix_len + window_h * window_w - 1
  use_cache = use_cache and model.attention == "softmax"

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
    token = sample_from_logits(logits, jax.random.fold_in(key, p), temperature, top_k, top_p,
                               num_image_codes)
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
