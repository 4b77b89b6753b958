"""The stage-2 GPT of taming-transformers (Karpathy's minGPT) with a functional KV cache.

Architecture (as the reference `taming/modules/transformer/mingpt.py`):
  tokens -> wte + wpe -> dropout(embd_pdrop)
         -> n_layer x [x + attn(ln1(x)); x + mlp(ln2(x))]
         -> ln_f -> head (no bias) -> logits (float32)
  attn: separate query/key/value Dense (with bias), causal attention over n_head heads,
        dropout(attn_pdrop) on the attention probabilities, proj Dense, dropout(resid_pdrop)
  mlp:  fc (n_embd -> 4 n_embd), exact GELU, proj (-> n_embd), dropout(resid_pdrop)
  LayerNorm eps 1e-5. Init: Dense/Embed weights N(0, 0.02), biases 0, LayerNorm 1/0,
  position embedding zeros.

Parameter tree (PyTorch reference name -> here; Linear weights are transposed):
  tok_emb.weight                 -> wte/embedding                    (vocab, n_embd)
  pos_emb (1, block, n_embd)     -> wpe                              (block, n_embd)
  blocks.{i}.ln1.{weight,bias}   -> blocks_{i}/ln1/{scale,bias}
  blocks.{i}.attn.{key,query,value,proj}.{weight,bias}
                                 -> blocks_{i}/attn/{key,query,value,proj}/{kernel,bias}
  blocks.{i}.ln2.{weight,bias}   -> blocks_{i}/ln2/{scale,bias}
  blocks.{i}.mlp.0.{weight,bias} -> blocks_{i}/mlp/fc/{kernel,bias}
  blocks.{i}.mlp.2.{weight,bias} -> blocks_{i}/mlp/proj/{kernel,bias}
  ln_f.{weight,bias}             -> ln_f/{scale,bias}
  head.weight                    -> head/kernel                      (n_embd, vocab)

Decoding API (explicit, functional caches; no mutable collections):
  cache = model.init_cache(batch_size, max_length)            # no params needed
  logits, cache = model.apply(params, tokens, cache, method=GPT.prefill)
  logits, cache = model.apply(params, token, position, cache, method=GPT.decode_step)
The cache is {"index": int32 scalar (next position to write), "layers": tuple of per-layer
kernel caches} (see `vqgan_jax.models.attention`); with `scan_layers` "layers" is one such
cache whose arrays carry a leading layer axis.

Scale-out switches (the paper configs use them):
  scan_layers   the blocks' parameters stacked on a leading layer axis ("blocks/..." instead
                of "blocks_{i}/...") and run by one `lax.scan`: compile time and program
                size stop growing with depth. `stack_block_params`/`unstack_block_params`
                convert between the two trees; the values are the same.
  remat         "none" | "full" (recompute each block in the backward pass) | "dots" (keep
                the matmul outputs, recompute the rest); True/False mean "full"/"none".
Activations carry logical sharding constraints (`sharding.constrain`): batch over
data x fsdp, heads and MLP units over tensor, logits over tensor by vocabulary. They take
effect when the step is traced under a mesh (`sharding.under_mesh`), and are no-ops otherwise.
"""

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vqgan_jax import sharding
from vqgan_jax.models.attention import SoftmaxAttention, causal_softmax_attention, get_attention

_dense_init = nn.initializers.normal(stddev=0.02)


def _dense(features: int, dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_dense_init, bias_init=nn.initializers.zeros, name=name)


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


class CausalSelfAttention(nn.Module):
  n_head: int
  n_embd: int
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  attention: str = "softmax"
  linear_chunk_size: int = 64
  dtype: Any = jnp.float32

  def setup(self):
    # Created in reference order (key, query, value) so that param ordering matches.
    self.key = _dense(self.n_embd, self.dtype, "key")
    self.query = _dense(self.n_embd, self.dtype, "query")
    self.value = _dense(self.n_embd, self.dtype, "value")
    self.proj = _dense(self.n_embd, self.dtype, "proj")
    self.attn_drop = nn.Dropout(self.attn_pdrop)
    self.resid_drop = nn.Dropout(self.resid_pdrop)

  @property
  def kernel(self):
    return get_attention(self.attention, self.linear_chunk_size)

  def _heads(self, y):
    y = y.reshape(*y.shape[:2], self.n_head, self.n_embd // self.n_head)
    return sharding.constrain(y, "batch", None, "heads", None)

  def _qkv(self, x):
    return self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))

  def _qkv_fused(self, x):
    """`_qkv` as one matmul over the query, key and value kernels side by side (the same
    values). For the decoding step: with one token per sequence each matmul streams its
    whole kernel from memory, and one pass over the concatenation costs less than three
    (`python -m vqgan_jax.bench --task sample`). Inside the sampling loop the concatenation
    is loop-invariant, so XLA computes it once, before the loop."""
    if self.is_initializing():
      return self._qkv(x)
    params = [m.variables["params"] for m in (self.query, self.key, self.value)]
    kernel = jnp.concatenate([p["kernel"] for p in params], axis=1).astype(self.dtype)
    bias = jnp.concatenate([p["bias"] for p in params]).astype(self.dtype)
    y = jnp.dot(x.astype(self.dtype), kernel) + bias
    return tuple(self._heads(part) for part in jnp.split(y, 3, axis=-1))

  def _out(self, y, train: bool):
    b, t = y.shape[:2]
    y = sharding.constrain(y, "batch", None, "heads", None)
    out = self.resid_drop(self.proj(y.reshape(b, t, self.n_embd)), deterministic=not train)
    return sharding.constrain(out, "batch", None, None)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    q, k, v = self._qkv(x)
    if train and self.attn_pdrop > 0.0 and isinstance(self.kernel, SoftmaxAttention):
      # Dropout acts on the attention probabilities, which the fused op does not expose.
      y = causal_softmax_attention(
          q, k, v, dropout=lambda p: self.attn_drop(p, deterministic=False))
    else:
      y = self.kernel.parallel(q, k, v)
    return self._out(y, train)

  def prefill(self, x: jax.Array, cache, start: jax.Array):
    q, k, v = self._qkv(x)
    y, cache = self.kernel.prefill(q, k, v, cache, start)
    return self._out(y, False), cache

  def step(self, x: jax.Array, position: jax.Array, cache):
    q, k, v = self._qkv_fused(x)
    y, cache = self.kernel.step(q, k, v, position, cache)
    return self._out(y, False), cache


class MLP(nn.Module):
  n_embd: int
  resid_pdrop: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = sharding.constrain(_dense(4 * self.n_embd, self.dtype, "fc")(x), "batch", None, "mlp")
    h = nn.gelu(h, approximate=False)  # torch.nn.GELU() default is the exact erf form
    h = _dense(self.n_embd, self.dtype, "proj")(h)
    h = sharding.constrain(h, "batch", None, None)
    return nn.Dropout(self.resid_pdrop)(h, deterministic=not train)


class Block(nn.Module):
  """Pre-LN transformer block."""
  n_head: int
  n_embd: int
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  attention: str = "softmax"
  linear_chunk_size: int = 64
  dtype: Any = jnp.float32

  def setup(self):
    self.ln1 = _layer_norm(self.dtype, "ln1")
    self.attn = CausalSelfAttention(self.n_head, self.n_embd, self.attn_pdrop, self.resid_pdrop,
                                    self.attention, self.linear_chunk_size, self.dtype,
                                    name="attn")
    self.ln2 = _layer_norm(self.dtype, "ln2")
    self.mlp = MLP(self.n_embd, self.resid_pdrop, self.dtype, name="mlp")

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = sharding.constrain(x, "batch", None, None)
    x = x + self.attn(self.ln1(x), train)
    return x + self.mlp(self.ln2(x), train)

  def prefill(self, x: jax.Array, cache, start: jax.Array):
    h, cache = self.attn.prefill(self.ln1(x), cache, start)
    x = x + h
    return x + self.mlp(self.ln2(x)), cache

  def step(self, x: jax.Array, position: jax.Array, cache):
    h, cache = self.attn.step(self.ln1(x), position, cache)
    x = x + h
    return x + self.mlp(self.ln2(x)), cache


class GPT(nn.Module):
  """minGPT as used by taming-transformers. See the module docstring for names and API.

  `dtype` is the compute dtype (parameters stay float32); logits are always float32.
  `attention="linear"` swaps in causal linear attention (chunked with `linear_chunk_size`);
  attention-probability dropout has no counterpart there, so it requires attn_pdrop == 0.
  `remat` rematerialises blocks in the backward pass (training forward only): "none",
  "full" or "dots" (True/False = "full"/"none"); `scan_layers` stacks the blocks (see the
  module docstring).
  """
  vocab_size: int
  block_size: int
  n_layer: int = 12
  n_head: int = 8
  n_embd: int = 256
  embd_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  attn_pdrop: float = 0.0
  attention: str = "softmax"
  linear_chunk_size: int = 64
  dtype: Any = jnp.float32
  remat: Any = False
  scan_layers: bool = False

  def setup(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
    get_attention(self.attention, self.linear_chunk_size)  # validates the kind
    if self.attention == "linear" and self.attn_pdrop > 0.0:
      raise ValueError("attn_pdrop > 0 is not supported with linear attention")
    self.wte = nn.Embed(self.vocab_size, self.n_embd, dtype=self.dtype,
                        param_dtype=jnp.float32, embedding_init=_dense_init, name="wte")
    self.wpe = self.param("wpe", nn.initializers.zeros, (self.block_size, self.n_embd),
                          jnp.float32)
    self.drop = nn.Dropout(self.embd_pdrop)
    policy = remat_policy(self.remat)
    if self.scan_layers:
      template = self._block_template()
      sample = jnp.zeros((1, 1, self.n_embd), self.dtype)

      def init_stacked(rng):
        keys = jax.random.split(rng, self.n_layer)
        return jax.vmap(lambda k: template.init(k, sample)["params"])(keys)

      self.stacked_blocks = self.param("blocks", init_stacked)
    else:
      # `train` (argument 2 counting self) is a Python bool, so it must be static under remat.
      block_cls = (nn.remat(Block, static_argnums=(2,), policy=_POLICIES[policy])
                   if policy != "none" else Block)
      self.blocks = [
          block_cls(self.n_head, self.n_embd, self.attn_pdrop, self.resid_pdrop, self.attention,
                    self.linear_chunk_size, self.dtype, name=f"blocks_{i}")
          for i in range(self.n_layer)
      ]
    self.ln_f = _layer_norm(self.dtype, "ln_f")
    self.head = _dense(self.vocab_size, self.dtype, "head", use_bias=False)

  def _embed(self, tokens: jax.Array, start, train: bool) -> jax.Array:
    t = tokens.shape[1]
    if t > self.block_size:
      raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
    pos = lax.dynamic_slice_in_dim(self.wpe, start, t, 0)
    x = self.wte(tokens) + pos.astype(self.dtype)[None]
    return self.drop(x, deterministic=not train)

  def _logits(self, x: jax.Array) -> jax.Array:
    logits = self.head(self.ln_f(x)).astype(jnp.float32)
    return sharding.constrain(logits, "batch", None, "vocab")

  def _block_template(self) -> Block:
    """An unbound Block whose parameters come from one layer of the stacked tree."""
    return Block(self.n_head, self.n_embd, self.attn_pdrop, self.resid_pdrop, self.attention,
                 self.linear_chunk_size, self.dtype, parent=None)

  def _scanned(self, x: jax.Array, train: bool) -> jax.Array:
    template = self._block_template()
    dropout = train and max(self.embd_pdrop, self.resid_pdrop, self.attn_pdrop) > 0
    key = self.make_rng("dropout") if dropout else None

    def body(h, layer):
      params, index = layer
      rngs = {"dropout": jax.random.fold_in(key, index)} if dropout else {}
      return template.apply({"params": params}, h, train, rngs=rngs), None

    policy = remat_policy(self.remat)
    if policy != "none":
      body = jax.checkpoint(body, policy=_POLICIES[policy], prevent_cse=False)
    x, _ = lax.scan(body, x, (self.stacked_blocks, jnp.arange(self.n_layer)))
    return x

  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """tokens (B, T) int32 -> logits (B, T, vocab_size) float32."""
    x = sharding.constrain(self._embed(tokens, 0, train), "batch", None, None)
    if self.scan_layers:
      x = self._scanned(x, train)
    else:
      for block in self.blocks:
        x = block(x, train)
    return self._logits(x)

  def _run_cached(self, x: jax.Array, cache, run):
    """x through every block with its layer cache; run(block, x, layer_cache) -> (x,
    layer_cache) is Block.prefill or Block.step with its other arguments bound."""
    if self.scan_layers:
      template = self._block_template()

      def body(h, layer):
        params, layer_cache = layer
        return template.apply({"params": params}, h, layer_cache, method=run)

      return lax.scan(body, x, (self.stacked_blocks, cache["layers"]))
    layers = []
    for block, layer_cache in zip(self.blocks, cache["layers"]):
      x, layer_cache = run(block, x, layer_cache)
      layers.append(layer_cache)
    return x, tuple(layers)

  # ----- decoding --------------------------------------------------------------------

  def init_cache(self, batch_size: int, max_length: Optional[int] = None) -> Dict[str, Any]:
    """Empty cache for `batch_size` sequences of up to `max_length` (default block_size)
    positions. Softmax layers: {"key","value"} (B * H, max_length, D) in `dtype`; linear
    layers: {"S"} (B, H, D, D) and {"z"} (B, H, D) in float32."""
    kernel = get_attention(self.attention, self.linear_chunk_size)
    max_length = self.block_size if max_length is None else max_length
    head_dim = self.n_embd // self.n_head
    layers = tuple(kernel.init_cache(batch_size, max_length, self.n_head, head_dim, self.dtype)
                   for _ in range(self.n_layer))
    if self.scan_layers:
      layers = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
    return {"index": jnp.zeros((), jnp.int32), "layers": layers}

  def prefill(self, tokens: jax.Array, cache: Dict[str, Any]):
    """Run tokens (B, T) in one parallel pass starting at position cache["index"] (0 for a
    fresh cache); returns (logits (B, T, vocab) float32, cache advanced by T)."""
    start = cache["index"]
    x = self._embed(tokens, start, False)
    x, layers = self._run_cached(x, cache, lambda m, h, c: m.prefill(h, c, start))
    new_cache = {"index": start + tokens.shape[1], "layers": layers}
    return self._logits(x), new_cache

  def decode_step(self, tokens: jax.Array, position: jax.Array, cache: Dict[str, Any]):
    """One token per sequence: tokens (B, 1) (or (B,)) at `position` (traced scalar; must be
    < min(block_size, max_length)) -> (logits (B, vocab) float32, cache with index
    position + 1)."""
    tokens = tokens.reshape(tokens.shape[0], 1)
    position = jnp.asarray(position, jnp.int32)
    x = self._embed(tokens, position, False)
    x, layers = self._run_cached(x, cache, lambda m, h, c: m.step(h, position, c))
    return self._logits(x)[:, 0], {"index": position + 1, "layers": layers}


_POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing, recompute the whole block
    # Keep weight matmul outputs; recompute the rest, attention scores included (saving
    # those would keep B x H x T x T per layer).
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat) -> str:
  """Normalises `GPT.remat` (True/False or a policy name) to "none" | "full" | "dots"."""
  text = str(remat).strip().lower() if remat is not None else "none"
  # Booleans and their spellings from the command line (--config.model.remat=True).
  text = {"true": "full", "1": "full", "false": "none", "0": "none", "": "none"}.get(text, text)
  if text not in ("none",) + tuple(_POLICIES):
    raise ValueError(f"model.remat={remat!r}: expected 'none', 'full' or 'dots'")
  return text


def stack_block_params(params, n_layer: int):
  """Unrolled GPT params (blocks_0 ... blocks_{n-1}) -> the `scan_layers` tree ("blocks"
  with a leading layer axis); other entries unchanged."""
  params = dict(params)
  layers = [params.pop(f"blocks_{i}") for i in range(n_layer)]
  params["blocks"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
  return params


def unstack_block_params(params, n_layer: int):
  """The inverse of `stack_block_params`."""
  params = dict(params)
  stacked = params.pop("blocks")
  for i in range(n_layer):
    params[f"blocks_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
  return params


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def gpt_param_count(vocab_size: int, block_size: int, n_layer: int, n_embd: int) -> int:
  """Analytic parameter count of `GPT` (independent of n_head):
  wte + head: 2 V E; wpe: B E; ln_f: 2 E; per block: ln1 + ln2 4 E, q/k/v/proj 4 (E^2 + E),
  mlp (4 E^2 + 4 E) + (4 E^2 + E) = 12 E^2 + 13 E."""
  e = n_embd
  return 2 * vocab_size * e + block_size * e + 2 * e + n_layer * (12 * e * e + 13 * e)
