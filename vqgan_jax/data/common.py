"""Helpers the image and token pipelines share."""

import hashlib


def derive_seed(*parts) -> int:
  """A 32-bit seed (grain's range) from any ints, e.g. (seed, purpose, process)."""
  digest = hashlib.sha256(repr(parts).encode()).digest()
  return int.from_bytes(digest[:4], "little")


def check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got "
                     f"{process_index}, {process_count}")
