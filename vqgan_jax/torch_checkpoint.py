"""Reads PyTorch checkpoint files with numpy only, without running code from the file.

A file written by `torch.save` (PyTorch >= 1.6, the zip format) is a zip archive holding
one pickle (`<name>/data.pkl`) and one raw byte file per tensor storage
(`<name>/data/<key>`). The pickle refers to storages by persistent ids and rebuilds
tensors through a handful of functions in `torch._utils`. `load` unpickles it with an
allow-list:

  - the tensor rebuild functions become numpy constructors (dtype, storage offset,
    shape and strides honoured, bounds checked against the storage size);
  - `torch.*Storage` names become dtypes; `collections.OrderedDict` is itself;
  - any other global (Lightning's hyper-parameter objects, argparse namespaces,
    omegaconf containers, ...) becomes an inert `Opaque` record of its name and
    arguments. No function from the file is ever called.

Storages are read lazily, so a checkpoint's optimiser states cost nothing unless used.
torch is not needed. The legacy (pre-1.6, non-zip) format is not read here; with torch
installed, `load(..., allow_torch=True)` falls back to `torch.load(weights_only=True)`.
"""

import collections
import os
import pickle
import zipfile
from typing import Any, Dict, Tuple

import numpy as np


class TorchCheckpointError(ValueError):
  """A file that is not a readable PyTorch checkpoint; the message names the file."""


def _bfloat16():
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return np.dtype(ml_dtypes.bfloat16)


# torch storage class name -> numpy dtype (little-endian, as torch writes on x86/ARM).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": "bfloat16",
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}


class Opaque:
  """Stand-in for any object the allow-list does not admit: records, never executes."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

  def __setstate__(self, state):
    self.state = state

  def append(self, value):
    self.items.append(value)

  def extend(self, values):
    self.items.extend(values)

  def __setitem__(self, key, value):
    self.items.append((key, value))

  def __repr__(self):
    return f"<opaque {self.name}>"


def _opaque_class(module: str, name: str):
  return type(f"Opaque[{module}.{name}]", (Opaque,), {"name": f"{module}.{name}"})


class _StorageDtype:
  """What `torch.FloatStorage` etc. unpickle to: only a dtype."""

  def __init__(self, name: str):
    self.name = name
    dtype = _STORAGE_DTYPES[name]
    self.dtype = _bfloat16() if dtype == "bfloat16" else dtype


class LazyStorage:
  """One storage of the archive, read on first use."""

  def __init__(self, archive: "_Archive", key: str, dtype: np.dtype, numel: int):
    self.archive, self.key, self.dtype, self.numel = archive, key, dtype, int(numel)
    self._data = None

  def data(self) -> np.ndarray:
    if self._data is None:
      raw = self.archive.read_storage(self.key)
      count = len(raw) // self.dtype.itemsize
      if count < self.numel:
        raise TorchCheckpointError(
            f"{self.archive.path}: storage {self.key} holds {count} elements, the pickle "
            f"says {self.numel}")
      self._data = np.frombuffer(raw, self.dtype, count=self.numel)
    return self._data


class LazyTensor:
  """A tensor of the checkpoint: shape and dtype now, values on `numpy()`."""

  def __init__(self, storage: LazyStorage, offset: int, shape, strides):
    self.storage, self.offset = storage, int(offset)
    self.shape, self.strides = tuple(int(s) for s in shape), tuple(int(s) for s in strides)
    self.dtype = storage.dtype
    if len(self.shape) != len(self.strides):
      raise TorchCheckpointError(f"{storage.archive.path}: tensor with shape {self.shape} "
                                 f"but strides {self.strides}")
    if any(s < 0 for s in self.shape + self.strides) or self.offset < 0:
      raise TorchCheckpointError(f"{storage.archive.path}: negative size, stride or offset")
    if 0 not in self.shape:
      last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.strides))
      if last >= storage.numel:
        raise TorchCheckpointError(
            f"{storage.archive.path}: a tensor of shape {self.shape} at offset {self.offset} "
            f"reaches element {last} of storage {storage.key} ({storage.numel} elements)")

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def numpy(self) -> np.ndarray:
    if 0 in self.shape:
      return np.zeros(self.shape, self.dtype)
    data = self.storage.data()[self.offset:]
    size = self.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data, self.shape, tuple(s * size for s in self.strides), writeable=False)
    return np.array(view)  # a contiguous copy that owns its memory

  def __repr__(self):
    return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  if not isinstance(storage, LazyStorage):
    raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
  return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Archive:
  def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str):
    self.path, self.zf, self.prefix = path, zf, prefix
    names = set(zf.namelist())
    self.names = names
    byteorder = f"{prefix}/byteorder"
    if byteorder in names and zf.read(byteorder).strip() not in (b"little", b""):
      raise TorchCheckpointError(f"{path}: big-endian checkpoints are not supported")

  def read_storage(self, key: str) -> bytes:
    name = f"{self.prefix}/data/{key}"
    if name not in self.names:
      raise TorchCheckpointError(f"{self.path}: storage {name} is missing from the archive")
    return self.zf.read(name)


class _SafeUnpickler(pickle.Unpickler):
  def __init__(self, file, archive: _Archive):
    super().__init__(file)
    self.archive = archive
    self.storages: Dict[str, LazyStorage] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageDtype(name)
    return _opaque_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageDtype):
      raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r:.80}")
    key = str(key)
    if not key.isalnum():
      raise pickle.UnpicklingError(f"bad storage key {key!r:.40}")
    if key not in self.storages:
      dtype = storage_type.dtype
      if storage_type.name == "UntypedStorage":
        numel = int(numel)  # counted in bytes already
      self.storages[key] = LazyStorage(self.archive, key, dtype, numel)
    return self.storages[key]


def _zip_prefix(path: str, zf: zipfile.ZipFile) -> str:
  pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise TorchCheckpointError(f"{path} is a zip file but not a PyTorch checkpoint (no "
                               "single <name>/data.pkl)")
  return pickles[0].split("/")[0]


def load(path: str, allow_torch: bool = False) -> Any:
  """Unpickles a PyTorch checkpoint; tensors come back as `LazyTensor`s.

  allow_torch: for files in the legacy (non-zip) format, use
  `torch.load(weights_only=True)` when torch is installed (tensors then come back as
  numpy arrays).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TorchCheckpointError(f"checkpoint {path} does not exist or is not a file")
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] == b"\x80" and allow_torch:
      return _load_with_torch(path)
    what = ("a legacy (pre-1.6, non-zip) PyTorch file" if head[:1] == b"\x80" else
            "not a PyTorch checkpoint (neither the zip format nor a pickle)")
    raise TorchCheckpointError(
        f"{path} is {what}; only the zip format of torch.save (PyTorch >= 1.6) is read "
        "without torch. Re-save it with torch.save(torch.load(path, weights_only=True), "
        "new_path) or install torch and pass --reader torch.")
  zf = zipfile.ZipFile(path)  # stays open: storages are read on first use
  try:
    prefix = _zip_prefix(path, zf)
    archive = _Archive(path, zf, prefix)
    with zf.open(f"{prefix}/data.pkl") as f:
      return _SafeUnpickler(f, archive).load()
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, TypeError,
          ValueError) as e:
    zf.close()
    if isinstance(e, TorchCheckpointError):
      raise
    raise TorchCheckpointError(f"{path}: cannot read the checkpoint: {e}") from e


def _load_with_torch(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TorchCheckpointError(f"reading {path} with torch needs torch installed") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # weights_only refuses any object outside torch's allow-list, such as the
    # hyper-parameter objects Lightning checkpoints often hold.
    raise TorchCheckpointError(
        f"torch.load(weights_only=True) refuses {path}: {str(e).splitlines()[-1][:300]} "
        "Use the default numpy reader (--reader numpy), which reads such files safely.") from e

  def convert(x):
    if isinstance(x, torch.Tensor):
      return x.detach().float().numpy() if x.dtype == torch.bfloat16 else x.detach().numpy()
    if isinstance(x, dict):
      return type(x)((k, convert(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
      return type(x)(convert(v) for v in x)
    return x
  return convert(obj)


def load_state_dict(path: str, reader: str = "numpy") -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(state_dict, other top-level entries) of a Lightning `.ckpt` or a plain state dict.

  reader: "numpy" (the restricted unpickler above; the default) or "torch"
  (`torch.load(weights_only=True)`, needs torch).
  """
  if reader == "torch":
    obj = _load_with_torch(path)
  elif reader == "numpy":
    obj = load(path, allow_torch=False)
  else:
    raise ValueError(f"reader must be 'numpy' or 'torch', got {reader!r}")
  if not isinstance(obj, dict):
    raise TorchCheckpointError(f"{path} holds a {type(obj).__name__}, not a dict")
  if "state_dict" in obj:
    state, rest = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
  else:
    state, rest = obj, {}
  if not isinstance(state, dict):
    raise TorchCheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a dict")
  bad = [k for k, v in state.items()
         if not isinstance(k, str) or not isinstance(v, (LazyTensor, np.ndarray))]
  if bad:
    raise TorchCheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:10]}")
  return dict(state), rest


def to_numpy(value) -> np.ndarray:
  return value.numpy() if isinstance(value, LazyTensor) else np.asarray(value)
