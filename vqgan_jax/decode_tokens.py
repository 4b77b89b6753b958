"""Decode exported stage-1 tokens back to images (one PNG per record).

  python -m vqgan_jax.decode_tokens --tokens runs/demo/tokens --split validation \\
      --output runs/demo/decoded [--workdir STAGE1_DIR] [--step N] [--limit 16]

writes OUTPUT/<index:06d>.png for each record (index = position in the token source;
segmentation VQGANs show the argmax map in colour). The stage-1 workdir and step default
to the ones named in the export's metadata.
"""

import logging
import os
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from vqgan_jax import checkpointing, cli, visualize
from vqgan_jax.data import tokens as tokens_lib
from vqgan_jax.models import vqgan


def make_decode_fn(frozen):
  """jitted (params, (B, h, w) int32 indices) -> images in [-1, 1] (clipped)."""
  model = frozen.model

  @jax.jit
  def decode(params, indices):
    images = model.apply(vqgan.as_variables(params), indices,
                         method=vqgan.VQModel.decode_indices)
    return jnp.clip(images, -1.0, 1.0)

  return decode


def decode_to_images(tokens: np.ndarray, frozen, batch_size: int = 16, decode_fn=None):
  """(N, h, w) indices -> (N, H, W, C) float32 images in [-1, 1], in fixed-size batches.

  The last batch is padded with code 0 so there is a single compiled shape.
  """
  tokens = np.asarray(tokens, np.int32)
  decode_fn = decode_fn or make_decode_fn(frozen)
  out = []
  for start in range(0, len(tokens), batch_size):
    chunk = tokens[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.int32)])
    out.append(np.asarray(decode_fn(frozen.params, chunk))[:n])
  if not out:
    return np.zeros((0,), np.float32)
  return np.concatenate(out)


def decode_command(tokens_dir: str, output: str, workdir: Optional[str] = None,
                   split: Optional[str] = None, step: Optional[int] = None,
                   limit: int = 0, batch_size: int = 16) -> List[str]:
  """Decodes exported tokens to PNG_DIR/<index:06d>.png; returns the written paths."""
  source = tokens_lib.TokenSource(tokens_dir, split)
  meta = source.metadata
  stage1_meta = meta.get("stage1", {})
  workdir = workdir or stage1_meta.get("workdir")
  if not workdir:
    raise tokens_lib.TokenFormatError(f"{source.directory}: no --workdir given and the metadata names "
                           "no stage-1 workdir")
  if step is None and stage1_meta.get("workdir") and \
      os.path.abspath(workdir) == os.path.abspath(stage1_meta["workdir"]):
    step = stage1_meta.get("step")
  frozen = checkpointing.load_stage1(workdir, step)
  if frozen.n_embed != source.codebook_size:
    raise tokens_lib.TokenFormatError(
        f"{source.directory}: tokens index a codebook of {source.codebook_size} codes, but "
        f"{workdir} step {frozen.step} has {frozen.n_embed}")
  if stage1_meta.get("step") is not None and stage1_meta.get("step") != frozen.step:
    logging.warning("decoding with %s step %d; the tokens were exported with step %s",
                    workdir, frozen.step, stage1_meta.get("step"))
  n = len(source) if not limit else min(limit, len(source))
  tokens = np.stack([source[i]["tokens"] for i in range(n)]) if n else \
      np.zeros((0, *source.grid_shape), np.int32)
  images = decode_to_images(tokens, frozen, batch_size)
  os.makedirs(output, exist_ok=True)
  paths = []
  for i in range(n):
    image = visualize.to_uint8(visualize.displayable(images[i]))
    paths.append(visualize.save_png(os.path.join(output, f"{i:06d}.png"), image))
  return paths


FLAGS = flags.FLAGS
flags.DEFINE_string("tokens", None, "The exporter's --output folder (or one split folder in it).")
flags.DEFINE_string("split", None, "train or validation (default: the only one exported).")
flags.DEFINE_string("workdir", None, "Stage-1 workdir (default: the one the metadata names).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the exported step, else the "
                     "latest).")
flags.DEFINE_string("output", None, "Folder for the <index:06d>.png files.")
flags.DEFINE_integer("limit", 0, "Decode only the first N records (0: all).")
flags.DEFINE_integer("batch_size", 16, "Records decoded per call.")


def main(argv):
  cli.no_positional_args(argv)
  cli.require_flags("tokens", "output")
  paths = decode_command(FLAGS.tokens, FLAGS.output, workdir=FLAGS.workdir, split=FLAGS.split,
                         step=FLAGS.step, limit=FLAGS.limit, batch_size=FLAGS.batch_size)
  print(f"wrote {len(paths)} PNG files to {FLAGS.output}")


if __name__ == "__main__":
  cli.run(main)
