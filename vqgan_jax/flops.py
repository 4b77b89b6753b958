"""Analytic FLOP counts of the models, for MFU figures and sanity checks.

Convention: one multiply-add is 2 FLOPs. Only the contractions are counted (convolutions,
dense layers, attention's QK^T and AV, the quantizer's distance matmul, the GPT head);
elementwise work (norms, activations, softmax, bias adds, losses, the optimiser update) is
left out. On the models here that is a few per cent of the total; `tests/test_flops.py`
checks the counts against XLA's own `cost_analysis()` (which counts every op) within 10%.

Attention is counted as executed: the full T x T score matrix, masked or not (both this
project and the reference compute all of it), not the causal-optimal half.

Training steps use the usual rule "backward = 2 x forward" (one product for the gradient
of the input, one for the gradient of the weights) with the exact exceptions spelled out
in `stage1_train_step_flops` and `gpt_train_step_flops`.

Every function takes plain ints/sequences, so counts are available without building a
model; `vqgan_forward_flops_from_config` / `stage1_step_flops_from_config` read a
`config.model` / full stage-1 config.
"""

from typing import Dict, Optional, Sequence, Tuple


# ---------------------------------------------------------------------------- primitives


def conv_flops(batch: int, out_h: int, out_w: int, kh: int, kw: int, cin: int, cout: int) -> int:
  """A dense convolution: every output position is a (kh*kw*cin) x cout matvec."""
  return 2 * batch * out_h * out_w * kh * kw * cin * cout


def dense_flops(rows: int, fan_in: int, fan_out: int) -> int:
  return 2 * rows * fan_in * fan_out


def attention_flops(batch: int, q_len: int, k_len: int, width: int) -> int:
  """QK^T and AV over all heads (width = heads * head_dim): 2 x (2 * Tq * Tk * width)."""
  return 4 * batch * q_len * k_len * width


# ---------------------------------------------------------------------------- VQGAN


def _resnet_block(batch, h, w, cin, cout) -> int:
  flops = conv_flops(batch, h, w, 3, 3, cin, cout) + conv_flops(batch, h, w, 3, 3, cout, cout)
  if cin != cout:
    flops += conv_flops(batch, h, w, 1, 1, cin, cout)  # nin_shortcut
  return flops


def _attn_block(batch, h, w, c) -> int:
  n = h * w
  return 4 * dense_flops(batch * n, c, c) + attention_flops(batch, n, n, c)  # q, k, v, proj


def encoder_flops(batch: int, height: int, width: int, *, ch: int, ch_mult: Sequence[int],
                  num_res_blocks: int, attn_resolutions: Sequence[int], resolution: int,
                  in_channels: int, z_channels: int, double_z: bool = False) -> int:
  """`vqgan.Encoder` on (batch, height, width, in_channels) images. `resolution` is the
  model's nominal resolution, which decides where the attention blocks sit."""
  h, w, res = height, width, resolution
  flops = conv_flops(batch, h, w, 3, 3, in_channels, ch)  # conv_in
  c = ch
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      flops += _resnet_block(batch, h, w, c, ch * mult)
      c = ch * mult
      if res in attn_resolutions:
        flops += _attn_block(batch, h, w, c)
    if level != len(ch_mult) - 1:
      # pad right/bottom by one, 3x3 stride 2 VALID: (h + 1 - 3) // 2 + 1 = h // 2 (h even)
      h, w = (h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1
      flops += conv_flops(batch, h, w, 3, 3, c, c)
      res //= 2
  flops += 2 * _resnet_block(batch, h, w, c, c) + _attn_block(batch, h, w, c)  # mid
  out = 2 * z_channels if double_z else z_channels
  return flops + conv_flops(batch, h, w, 3, 3, c, out)


def decoder_flops(batch: int, latent_h: int, latent_w: int, *, ch: int, ch_mult: Sequence[int],
                  num_res_blocks: int, attn_resolutions: Sequence[int], resolution: int,
                  out_ch: int, z_channels: int) -> int:
  """`vqgan.Decoder` from a (batch, latent_h, latent_w, z_channels) map."""
  levels = len(ch_mult)
  h, w = latent_h, latent_w
  res = resolution // 2 ** (levels - 1)
  c = ch * ch_mult[-1]
  flops = conv_flops(batch, h, w, 3, 3, z_channels, c)  # conv_in
  flops += 2 * _resnet_block(batch, h, w, c, c) + _attn_block(batch, h, w, c)  # mid
  for level in reversed(range(levels)):
    for _ in range(num_res_blocks + 1):
      flops += _resnet_block(batch, h, w, c, ch * ch_mult[level])
      c = ch * ch_mult[level]
      if res in attn_resolutions:
        flops += _attn_block(batch, h, w, c)
    if level != 0:
      h, w, res = 2 * h, 2 * w, 2 * res
      flops += conv_flops(batch, h, w, 3, 3, c, c)  # upsample conv
  return flops + conv_flops(batch, h, w, 3, 3, c, out_ch)  # conv_out


def quantizer_flops(positions: int, *, embed_dim: int, n_embed: int,
                    codebook_dim: int = 0) -> Dict[str, int]:
  """The lookup: optional in/out projections and the (N, K) distance matmul 2 N K d."""
  d = codebook_dim or embed_dim
  parts = {"distance": dense_flops(positions, d, n_embed)}
  if codebook_dim:
    parts["projections"] = dense_flops(positions, embed_dim, d) + dense_flops(positions, d, embed_dim)
  return parts


def vqgan_forward_breakdown(batch: int, height: int, width: Optional[int] = None, *, ch: int,
                            ch_mult: Sequence[int], num_res_blocks: int,
                            attn_resolutions: Sequence[int], resolution: int, in_channels: int = 3,
                            out_ch: int = 3, z_channels: int, embed_dim: int, n_embed: int,
                            codebook_dim: int = 0, **unused) -> Dict[str, int]:
  """Per-part FLOPs of `VQModel.__call__` (encoder, 1x1 quant convs, quantizer, decoder)."""
  del unused
  width = height if width is None else width
  arch = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
              attn_resolutions=tuple(attn_resolutions), resolution=resolution,
              z_channels=z_channels)
  factor = 2 ** (len(ch_mult) - 1)
  lh, lw = height // factor, width // factor
  n = batch * lh * lw
  q = quantizer_flops(n, embed_dim=embed_dim, n_embed=n_embed, codebook_dim=codebook_dim)
  return {
      "encoder": encoder_flops(batch, height, width, in_channels=in_channels, **arch),
      "quant_convs": dense_flops(n, z_channels, embed_dim) + dense_flops(n, embed_dim, z_channels),
      "quantizer_distance": q["distance"],
      "quantizer_projections": q.get("projections", 0),
      "decoder": decoder_flops(batch, lh, lw, out_ch=out_ch, **arch),
  }


def vqgan_forward_flops(*args, **kwargs) -> int:
  """Total FLOPs of one `VQModel` forward (arguments as `vqgan_forward_breakdown`)."""
  return sum(vqgan_forward_breakdown(*args, **kwargs).values())


def model_kwargs(model_config) -> Dict:
  """The VQGAN shape keys of a `config.model` that the FLOP counts take."""
  keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "in_channels",
          "out_ch", "z_channels", "embed_dim", "n_embed", "codebook_dim")
  return {k: model_config[k] for k in keys}


def vqgan_forward_flops_from_config(model_config, batch: int, image_size: int) -> int:
  return vqgan_forward_flops(batch, image_size, **model_kwargs(model_config))


# ---------------------------------------------------------------------------- LPIPS / D

VGG16_STAGES: Tuple[Tuple[int, ...], ...] = (
    (64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16_features_flops(batch: int, height: int, width: Optional[int] = None) -> int:
  """The 13 3x3 convs of VGG16's feature stack (2x2 max-pools floor odd sizes)."""
  width = height if width is None else width
  h, w, cin, flops = height, width, 3, 0
  for s, stage in enumerate(VGG16_STAGES):
    if s > 0:
      h, w = h // 2, w // 2
    for cout in stage:
      flops += conv_flops(batch, h, w, 3, 3, cin, cout)
      cin = cout
  return flops


def lpips_forward_flops(batch: int, height: int, width: Optional[int] = None) -> int:
  """`lpips.LPIPS` on two batches of `batch` images: VGG on the 2*batch concatenation plus
  the five 1x1 "lin" convs (C -> 1) on the squared feature differences."""
  width = height if width is None else width
  flops = vgg16_features_flops(2 * batch, height, width)
  h, w = height, width
  for s, stage in enumerate(VGG16_STAGES):
    if s > 0:
      h, w = h // 2, w // 2
    flops += conv_flops(batch, h, w, 1, 1, stage[-1], 1)
  return flops


def discriminator_layers(height: int, width: Optional[int] = None, ndf: int = 64,
                         n_layers: int = 3, in_channels: int = 3):
  """(out_h, out_w, cin, cout) of each 4x4 conv of the PatchGAN (padding 1)."""
  width = height if width is None else width
  layers = []
  h, w, cin = height, width, in_channels

  def add(cout, stride):
    nonlocal h, w, cin
    h, w = (h + 2 - 4) // stride + 1, (w + 2 - 4) // stride + 1
    layers.append((h, w, cin, cout))
    cin = cout

  add(ndf, 2)
  for n in range(1, n_layers + 1):
    add(ndf * min(2 ** n, 8), 2 if n < n_layers else 1)
  add(1, 1)
  return layers


def discriminator_forward_flops(batch: int, height: int, width: Optional[int] = None,
                                ndf: int = 64, n_layers: int = 3, in_channels: int = 3) -> int:
  return sum(conv_flops(batch, h, w, 4, 4, cin, cout)
             for h, w, cin, cout in discriminator_layers(height, width, ndf, n_layers, in_channels))


# ---------------------------------------------------------------------------- stage-1 step


def stage1_train_step_breakdown(batch: int, image_size: int, model_kwargs: Dict, *,
                                perceptual: bool = True, use_gan: bool = False,
                                disc_ndf: int = 64, disc_layers: int = 3) -> Dict[str, int]:
  """FLOPs of one `Stage1Setup.train_step`, by part.

  generator: 3 x forward (forward, input gradients, weight gradients), except
    - the quantizer's distance matmul runs forward only (argmin has no gradient),
    - the encoder's conv_in needs no input gradient (the images are data): - 1 x conv_in.
  lpips (perceptual_weight > 0): the frozen VGG runs forward on [x; x_rec] (2B images) and
    back for the input gradient only (no weight gradients), over the whole 2B batch as
    the concatenated forward is differentiated as one op: 2 x forward(2B).
  gan (use_gan): generator's adversarial term: D forward on x_rec + input gradient
    (2 x D(B)); adaptive weight: two weight gradients of the decoder's conv_out
    (2 x conv_out); discriminator update: D on x and x_rec, forward + weight gradients +
    input gradients except the first layer's (3 x D(2B) - D.conv_0(2B)).
  The optimiser update (~10 FLOPs per parameter) and losses are not counted.
  """
  fwd = vqgan_forward_breakdown(batch, image_size, **model_kwargs)
  in_ch = model_kwargs.get("in_channels", 3)
  conv_in = conv_flops(batch, image_size, image_size, 3, 3, in_ch, model_kwargs["ch"])
  trainable = sum(v for k, v in fwd.items() if k != "quantizer_distance")
  parts = {"generator": 3 * trainable - conv_in + fwd["quantizer_distance"]}
  if perceptual:
    parts["lpips"] = 2 * lpips_forward_flops(batch, image_size)
  if use_gan:
    d_layers = discriminator_layers(image_size, image_size, disc_ndf, disc_layers, in_ch)
    d_b = discriminator_forward_flops(batch, image_size, None, disc_ndf, disc_layers, in_ch)
    h0, w0, c0, o0 = d_layers[0]
    conv_out = conv_flops(batch, image_size, image_size, 3, 3,
                          model_kwargs["ch"] * model_kwargs["ch_mult"][0],
                          model_kwargs.get("out_ch", 3))
    parts["gan_generator"] = 2 * d_b + 2 * conv_out
    parts["discriminator"] = 3 * (2 * d_b) - conv_flops(2 * batch, h0, w0, 4, 4, c0, o0)
  return parts


def stage1_step_flops_from_config(config, batch: Optional[int] = None,
                                  use_gan: bool = False) -> int:
  batch = config.batch_size if batch is None else batch
  parts = stage1_train_step_breakdown(
      batch, config.data.image_size, model_kwargs(config.model),
      perceptual=config.loss.perceptual_weight > 0, use_gan=use_gan,
      disc_ndf=config.loss.disc_ndf, disc_layers=config.loss.disc_num_layers)
  return sum(parts.values())


# ---------------------------------------------------------------------------- GPT


def gpt_forward_breakdown(batch: int, seq_len: int, *, vocab_size: int, n_layer: int,
                          n_embd: int, n_head: int = 8, attention: str = "softmax",
                          linear_chunk_size: int = 64, **unused) -> Dict[str, int]:
  """`transformer.GPT.__call__` on (batch, seq_len) tokens.

  Per layer: q, k, v, proj (4 E^2 per token x 2), MLP (8 E^2 per token x 2), and attention:
    softmax: QK^T and AV over the full T x T matrix: 4 B T^2 E;
    linear (chunk c): intra-chunk QK^T and AV 4 B T c E, plus reading the carried state
      (q S) and updating it (k^T v), each 2 B T E D (D = E / n_head); normaliser terms
      are O(B T E) and left out.
  Head: 2 B T E V. The embedding lookups are gathers (0 FLOPs).
  """
  del unused
  tokens = batch * seq_len
  if attention == "softmax":
    attn = attention_flops(batch, seq_len, seq_len, n_embd)
  elif attention == "linear":
    c = max(1, min(linear_chunk_size, seq_len))
    padded = -(-seq_len // c) * c
    head_dim = n_embd // n_head
    attn = 4 * batch * padded * c * n_embd + 2 * (2 * batch * padded * n_embd * head_dim)
  else:
    raise ValueError(f"unknown attention {attention!r}")
  return {
      "qkv_proj": n_layer * 4 * dense_flops(tokens, n_embd, n_embd),
      "mlp": n_layer * 2 * dense_flops(tokens, n_embd, 4 * n_embd),
      "attention": n_layer * attn,
      "head": dense_flops(tokens, n_embd, vocab_size),
  }


def gpt_forward_flops(batch: int, seq_len: int, **kwargs) -> int:
  return sum(gpt_forward_breakdown(batch, seq_len, **kwargs).values())


def gpt_train_step_flops(batch: int, seq_len: int, **kwargs) -> int:
  """3 x forward: every contraction has an input and a weight gradient, the first layer's
  input gradient included (it feeds the embedding gradients). Cross-entropy, LayerNorms
  and Adam are elementwise and not counted."""
  return 3 * gpt_forward_flops(batch, seq_len, **kwargs)


def gpt_decode_step_flops(batch: int, cache_len: int, *, vocab_size: int, n_layer: int,
                          n_embd: int, n_head: int = 8, attention: str = "softmax",
                          **unused) -> int:
  """One `GPT.decode_step` token per sequence. Softmax attention attends over the whole
  cache buffer of `cache_len` slots (masked); linear attention reads and updates its
  (D x D) state per head."""
  del unused
  per_layer = 12 * 2 * batch * n_embd * n_embd
  if attention == "softmax":
    per_layer += attention_flops(batch, 1, cache_len, n_embd)
  else:
    per_layer += 2 * 2 * batch * n_embd * (n_embd // n_head)
  return n_layer * per_layer + dense_flops(batch, n_embd, vocab_size)
