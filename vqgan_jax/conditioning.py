"""The stage-2 vocabulary and sequences: where each kind of condition lives in the GPT's
id space, and how a batch becomes [condition tokens, image tokens].

Vocabulary layout (one id space, disjoint ranges, in this order; unused ranges are empty):
  image       [0, n_codes)                      codes of the stage-1 VQGAN
  start       1 id                              cond.kind="none": the start token
  class       num_classes ids                   cond.kind="class": one id per label
  null_class  1 id if cond.cfg_dropout > 0      "no label" (classifier-free guidance)
  spatial     n_cond_codes ids                  cond.kind="spatial": codes of the
                                                conditioning VQGAN (e.g. segmentations)
  coord       2 * coord_grid ids                cond.kind="coord": coord_grid bins of the
                                                crop origin's row, then of its column
The layout is written to every checkpoint's metadata ("vocab"). Unlike the reference
(where condition ids share the image ids), no condition id can be mistaken for an image
code, and samplers draw image tokens from [0, n_codes) only.

Sequence = [condition tokens (P), image tokens (N, row-major)]; the GPT reads the first
P + N - 1 and the loss covers only the N positions that predict image tokens. P is 1
(start or class), h*w (spatial: the condition's token window) or 2 (coord: row bin,
column bin).
"""

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from vqgan_jax import config_lib

RANGE_ORDER = ("image", "start", "class", "null_class", "spatial", "coord")


@dataclasses.dataclass(frozen=True)
class VocabLayout:
  """Disjoint id ranges of the stage-2 vocabulary (see the module docstring)."""
  kind: str
  sizes: Tuple[Tuple[str, int], ...]   # (range name, size) in RANGE_ORDER
  coord_grid: int = 0

  @classmethod
  def build(cls, kind: str, n_codes: int, num_classes: int = 0, null_class: bool = False,
            n_cond_codes: int = 0, coord_grid: int = 0) -> "VocabLayout":
    if kind not in config_lib.COND_KINDS:
      raise ValueError(f"unknown conditioning kind {kind!r}; one of {config_lib.COND_KINDS}")
    if n_codes < 1:
      raise ValueError(f"n_codes must be >= 1, got {n_codes}")
    sizes = {"image": n_codes, "start": int(kind == "none"),
             "class": num_classes if kind == "class" else 0,
             "null_class": int(kind == "class" and null_class),
             "spatial": n_cond_codes if kind == "spatial" else 0,
             "coord": 2 * coord_grid if kind == "coord" else 0}
    if kind == "class" and num_classes < 1:
      raise ValueError("class conditioning needs num_classes >= 1")
    if kind == "spatial" and n_cond_codes < 1:
      raise ValueError("spatial conditioning needs n_cond_codes >= 1")
    if kind == "coord" and coord_grid < 1:
      raise ValueError("coordinate conditioning needs coord_grid >= 1")
    return cls(kind, tuple((name, int(sizes[name])) for name in RANGE_ORDER),
               int(coord_grid if kind == "coord" else 0))

  def size(self, name: str) -> int:
    return dict(self.sizes)[name]

  def offset(self, name: str) -> int:
    total = 0
    for n, s in self.sizes:
      if n == name:
        return total
      total += s
    raise KeyError(name)

  def range(self, name: str) -> Tuple[int, int]:
    """[start, stop) of a range."""
    return self.offset(name), self.offset(name) + self.size(name)

  @property
  def vocab_size(self) -> int:
    return sum(s for _, s in self.sizes)

  @property
  def n_codes(self) -> int:
    return self.size("image")

  @property
  def num_classes(self) -> int:
    return self.size("class")

  @property
  def has_null_class(self) -> bool:
    return self.size("null_class") > 0

  @property
  def start_id(self) -> int:
    return self.offset("start")

  @property
  def null_id(self) -> int:
    if not self.has_null_class:
      raise ValueError("this model has no null class (trained with cond.cfg_dropout = 0)")
    return self.offset("null_class")

  def prefix_len(self, cond_window: Tuple[int, int] = (0, 0)) -> int:
    if self.kind == "spatial":
      return int(cond_window[0] * cond_window[1])
    return 2 if self.kind == "coord" else 1

  def to_dict(self) -> Dict[str, Any]:
    return {"kind": self.kind, "vocab_size": self.vocab_size, "coord_grid": self.coord_grid,
            "ranges": {n: [self.offset(n), self.offset(n) + s] for n, s in self.sizes}}

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "VocabLayout":
    sizes = tuple((n, int(d["ranges"][n][1] - d["ranges"][n][0])) for n in RANGE_ORDER)
    layout = cls(d["kind"], sizes, int(d.get("coord_grid", 0)))
    if layout.to_dict()["ranges"] != {k: list(v) for k, v in d["ranges"].items()}:
      raise ValueError(f"vocabulary ranges {d['ranges']} are not in the expected order")
    return layout


def coord_bins(origin, span: int, coord_grid: int):
  """Bin of a crop origin in [0, span] (span = grid - crop): round(origin/span * (G-1))."""
  if coord_grid <= 1 or span <= 0:
    return jnp.zeros_like(jnp.asarray(origin), jnp.int32)
  u = jnp.asarray(origin, jnp.float32) / float(span)
  return jnp.clip(jnp.round(u * (coord_grid - 1)), 0, coord_grid - 1).astype(jnp.int32)


def condition_tokens(layout: VocabLayout, batch_size: int, labels=None, cond_codes=None,
                     origins=None, spans=(0, 0)) -> jax.Array:
  """The (B, P) condition prefix in the model's id space.

  none: the start token. class: labels (B,) (already null-replaced where wanted).
  spatial: cond_codes (B, h, w) of the conditioning VQGAN. coord: origins = (oy, ox)
  (each (B,)) of the crop in a grid where origins range over [0, spans].
  """
  if layout.kind == "none":
    return jnp.full((batch_size, 1), layout.start_id, jnp.int32)
  if layout.kind == "class":
    return (jnp.asarray(labels, jnp.int32) + layout.offset("class"))[:, None]
  if layout.kind == "spatial":
    codes = jnp.asarray(cond_codes, jnp.int32).reshape(batch_size, -1)
    return codes + layout.offset("spatial")
  oy, ox = origins
  g, base = layout.coord_grid, layout.offset("coord")
  by = coord_bins(oy, spans[0], g) + base
  bx = coord_bins(ox, spans[1], g) + base + g
  return jnp.stack([by, bx], axis=1).astype(jnp.int32)


def loss_mask(prefix_len: int, num_image_tokens: int) -> jax.Array:
  """(P + N - 1,) bool over the GPT's input positions: True where the next token is an
  image token (positions P-1 .. P+N-2), False where it is a condition token."""
  return jnp.arange(prefix_len + num_image_tokens - 1) >= prefix_len - 1


def corrupt_image_tokens(tokens: jax.Array, prefix_len: int, n_codes: int, pkeep: float,
                         rng: jax.Array) -> jax.Array:
  """Replaces each image token (positions >= prefix_len) by a random code in [0, n_codes)
  with probability 1 - pkeep (the reference's pkeep); condition tokens are kept."""
  if pkeep >= 1.0:
    return tokens
  keep_key, code_key = jax.random.split(rng)
  keep = jax.random.bernoulli(keep_key, pkeep, tokens.shape)
  keep = keep | (jnp.arange(tokens.shape[1]) < prefix_len)[None, :]
  random_codes = jax.random.randint(code_key, tokens.shape, 0, n_codes, dtype=tokens.dtype)
  return jnp.where(keep, tokens, random_codes)


def crop_grids(grids: Sequence[Optional[jax.Array]], origins, size: Tuple[int, int]):
  """Crops every (B, H, W) grid at per-example origins (oy, ox) to size (h, w)."""
  oy, ox = origins

  def crop(g):
    if g is None:
      return None
    return jax.vmap(lambda x, y0, x0: lax.dynamic_slice(x, (y0, x0), size))(g, oy, ox)

  return [crop(g) for g in grids]


def layout_for(config, n_codes: int, n_cond_codes: int = 0,
               num_classes: Optional[int] = None) -> VocabLayout:
  c = config.cond
  if num_classes is None:
    num_classes = c.num_classes
  return VocabLayout.build(c.kind, n_codes, num_classes=num_classes,
                           null_class=c.cfg_dropout > 0, n_cond_codes=n_cond_codes,
                           coord_grid=c.coord_grid)
