"""Convert pytorch-fid's Inception weights to an .npz for the Flax `InceptionV3`.

    python -m vqgan_jax.convert_inception \\
        --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.npz

The PyTorch file is read with `torch.load(..., weights_only=True)`, which unpickles
tensors only and never runs code from the file. torch is needed for this one step
only (an optional dependency); everything else, including `load_inception_params`,
works without it.

The output .npz maps flattened Flax parameter paths ('Mixed_5b/branch1x1/conv/kernel',
relative to the 'params' collection) to float32 arrays. The rename table is small
because the Flax module names mirror torchvision's:
  <module>.conv.weight (O, I, H, W)  -> <module>/conv/kernel (H, W, I, O)
  <module>.bn.weight / bias          -> <module>/bn/scale / bias
  <module>.bn.running_mean / _var    -> <module>/bn/mean / var
  <module>.bn.num_batches_tracked    -> dropped (training bookkeeping)
  fc.weight (1008, 2048) / fc.bias   -> fc/kernel (2048, 1008) / fc/bias
Every key must be used and every Flax parameter filled with the right shape;
otherwise the conversion fails listing the offending keys.
"""

import functools
import hashlib
import os
import re
from typing import Dict, Mapping, Optional, Tuple, Union

import jax
import numpy as np
from absl import flags
from flax import traverse_util

from vqgan_jax import cli
from vqgan_jax.models.inception import InceptionV3, param_shapes

PathLike = Union[str, os.PathLike]
SEP = "/"

_BN_RENAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean",
               "running_var": "var"}


@functools.lru_cache(maxsize=4)
def _shapes_for(num_classes: int) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
  # Parameter shapes depend only on the fc width; tracing the network takes about a
  # second, so cache it.
  tree = param_shapes(InceptionV3(num_classes=num_classes))["params"]
  flat = traverse_util.flatten_dict(tree, sep=SEP)
  return tuple((k, tuple(v.shape)) for k, v in flat.items())


def expected_shapes(model: Optional[InceptionV3] = None) -> Dict[str, Tuple[int, ...]]:
  """Flattened 'path/to/param' -> shape of the model's parameters (no compute)."""
  num_classes = model.num_classes if model is not None else InceptionV3().num_classes
  return dict(_shapes_for(num_classes))


def torch_key_to_flax(key: str) -> Optional[Tuple[str, Optional[Tuple[int, ...]]]]:
  """Map one torch state-dict key to (flax path, transpose axes or None).

  Returns None for keys that carry no weights (num_batches_tracked). Raises KeyError
  for keys that do not follow the BasicConv2d / fc naming at all.
  """
  parts = key.split(".")
  if parts == ["fc", "weight"]:
    return "fc/kernel", (1, 0)
  if parts == ["fc", "bias"]:
    return "fc/bias", None
  if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
    return SEP.join(parts[:-1] + ["kernel"]), (2, 3, 1, 0)  # OIHW -> HWIO
  if len(parts) >= 3 and parts[-2] == "bn":
    if parts[-1] == "num_batches_tracked":
      return None
    if parts[-1] in _BN_RENAMES:
      return SEP.join(parts[:-1] + [_BN_RENAMES[parts[-1]]]), None
  raise KeyError(key)


def flax_key_to_torch(path: str) -> str:
  """Inverse of `torch_key_to_flax` for naming parameters in error messages."""
  parts = path.split(SEP)
  if parts[-1] == "kernel":
    return ".".join(parts[:-1] + ["weight"])
  inverse = {v: k for k, v in _BN_RENAMES.items()}
  if len(parts) >= 2 and parts[-2] == "bn":
    return ".".join(parts[:-1] + [inverse[parts[-1]]])
  return ".".join(parts)


def _format_problems(unused, missing, mismatched, limit: int = 20) -> str:
  lines = []

  def block(title, items):
    if items:
      lines.append(f"{title} ({len(items)}):")
      lines.extend(f"  {item}" for item in items[:limit])
      if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")

  block("unused keys", unused)
  block("missing parameters", missing)
  block("shape mismatches", mismatched)
  return "\n".join(lines)


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       model: Optional[InceptionV3] = None) -> Dict[str, np.ndarray]:
  """pytorch-fid state dict (name -> array) -> flattened Flax params (float32).

  Raises ValueError listing every unused torch key, every Flax parameter left
  without a value and every shape mismatch.
  """
  expected = expected_shapes(model)
  out, unused, mismatched, bad_paths = {}, [], [], set()
  for key in sorted(state_dict):
    try:
      mapped = torch_key_to_flax(key)
    except KeyError:
      unused.append(key)
      continue
    if mapped is None:
      continue
    path, axes = mapped
    if path not in expected:
      unused.append(f"{key} (would be {path})")
      continue
    value = np.asarray(state_dict[key], dtype=np.float32)
    want = expected[path]
    if axes is not None:
      # Report shapes on the torch side, where the user's file lives.
      torch_want = [0] * len(want)
      for i, a in enumerate(axes):
        torch_want[a] = want[i]
      if value.shape != tuple(torch_want):
        mismatched.append(f"{key}: expected {tuple(torch_want)}, found {value.shape}")
        bad_paths.add(path)
        continue
      value = np.ascontiguousarray(np.transpose(value, axes))
    elif value.shape != want:
      mismatched.append(f"{key}: expected {want}, found {value.shape}")
      bad_paths.add(path)
      continue
    out[path] = value
  missing = [f"{flax_key_to_torch(p)} (-> {p} {expected[p]})"
             for p in sorted(set(expected) - set(out) - bad_paths)]
  if unused or missing or mismatched:
    raise ValueError("state dict does not match the FID InceptionV3:\n"
                     + _format_problems(unused, missing, mismatched))
  return out


def read_torch_state_dict(path: PathLike) -> Dict[str, np.ndarray]:
  """Read a PyTorch state dict as numpy arrays, without executing code from the file."""
  path = os.fspath(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch, an optional dependency used only "
                      "for this conversion (pip install torch)") from e
  if not os.path.exists(path):
    raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
  # weights_only=True: a restricted unpickler that only rebuilds tensors and
  # containers, so a malicious file cannot run code.
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types; all mean "not loadable"
    raise ValueError(f"{path}: could not be read as a PyTorch state dict with "
                     f"weights_only=True: {e}") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict (mapping of name -> tensor), "
                     f"got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not torch.is_tensor(v):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
  return out


def flatten_params(params) -> Dict[str, np.ndarray]:
  """Nested params (or {'params': ...} variables) -> {'a/b/c': np.ndarray}."""
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    params = params["params"]
  flat = traverse_util.flatten_dict(dict(params), sep=SEP)
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def save_params_npz(params, path: PathLike) -> None:
  """Write params (flat 'a/b/c' dict, nested tree or variables) as an .npz.

  Written to a temporary name and renamed, so a crash never leaves a truncated file
  under the final name.
  """
  if all(not isinstance(v, Mapping) for v in params.values()):
    flat = {k: np.asarray(jax.device_get(v)) for k, v in params.items()}  # already flat
  else:
    flat = flatten_params(params)
  path = os.fspath(path)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:  # file object: numpy must not append '.npz'
    np.savez(f, **flat)
  os.replace(tmp, path)


def file_sha256(path: PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def load_inception_params(path: PathLike, expected_sha256: Optional[str] = None,
                          model: Optional[InceptionV3] = None):
  """Load converted weights as variables `{'params': ...}` for `InceptionV3.apply`.

  Reads the .npz with allow_pickle=False, checks the file's SHA-256 first when
  `expected_sha256` is given, and validates every array's shape against the model's
  own parameter shapes. Errors name the file and the offending keys.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"Inception weights not found: {path} (convert pytorch-fid's "
                            "weights with `python -m vqgan_jax.convert_inception`)")
  if expected_sha256 is not None:
    found = file_sha256(path)
    if found.lower() != expected_sha256.lower():
      raise ValueError(f"{path}: SHA-256 mismatch: expected {expected_sha256}, "
                       f"found {found}")
  expected = expected_shapes(model)
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  except ValueError as e:
    raise ValueError(f"{path}: could not read as a weights .npz: {e}") from e
  unused = sorted(set(flat) - set(expected))
  missing = sorted(set(expected) - set(flat))
  mismatched = [f"{k}: expected {expected[k]}, found {tuple(flat[k].shape)}"
                for k in sorted(set(flat) & set(expected))
                if tuple(flat[k].shape) != expected[k]]
  not_float = [f"{k}: dtype {flat[k].dtype}" for k in sorted(flat)
               if k in expected and not np.issubdtype(flat[k].dtype, np.floating)]
  if unused or missing or mismatched or not_float:
    msg = _format_problems(unused, missing, mismatched)
    if not_float:
      msg += "\nnon-float arrays:\n" + "\n".join(f"  {s}" for s in not_float)
    raise ValueError(f"{path}: weights do not match the FID InceptionV3:\n{msg}")
  params = {k: v.astype(np.float32) for k, v in flat.items()}
  return {"params": traverse_util.unflatten_dict(params, sep=SEP)}


def _check_hub_hash(path: str) -> None:
  """torch.hub file names end in -<first hex digits of the SHA-256>.pth; check them."""
  m = re.search(r"-([0-9a-f]{6,64})\.pth?$", os.path.basename(path))
  if m is None:
    return
  prefix = m.group(1)
  digest = file_sha256(path)
  if not digest.startswith(prefix):
    raise ValueError(f"{path}: SHA-256 {digest} does not start with {prefix} from the "
                     "file name; the download is corrupt or not the expected file "
                     "(pass --nocheck_hash to skip)")


def convert_file(input_path: str, output_path: str, check_hash: bool = True) -> str:
  """Converts one pytorch-fid .pth to an .npz; returns a one-line summary."""
  if not os.path.isfile(input_path):
    raise FileNotFoundError(f"--input {input_path}: no such file")
  if check_hash:
    _check_hub_hash(input_path)
  state_dict = read_torch_state_dict(input_path)
  try:
    flat = convert_state_dict(state_dict)
  except ValueError as e:
    raise ValueError(f"{input_path}: {e}") from e
  save_params_npz(flat, output_path)
  n = sum(v.size for v in flat.values())
  return (f"wrote {output_path}: {len(flat)} arrays, {n:,} parameters, "
          f"sha256 {file_sha256(output_path)}")


def _define_flags():
  flags.DEFINE_string("input", None, "pt_inception-2015-12-05-6726825d.pth from pytorch-fid.")
  flags.DEFINE_string("output", None, "Output .npz.")
  flags.DEFINE_bool("check_hash", True,
                    "Check the SHA-256 prefix in the input file name (--nocheck_hash skips).")


def main(argv):
  cli.no_positional_args(argv)
  cli.require_flags("input", "output")
  f = flags.FLAGS
  print(convert_file(f.input, f.output, check_hash=f.check_hash))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
