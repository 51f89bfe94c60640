"""Stable train/validation splits by document name: a SHA-256 hash per key, independent of order and machine."""

import hashlib
from typing import Sequence

from llm_jax import errors


def _unit_hash(key: str) -> float:
  """Maps `key` to [0, 1) by SHA-256: stable across runs and machines, unlike hash()."""
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def validation_keys(keys: Sequence[str], fraction: float) -> set[str]:
  """Returns the keys whose stable hash falls below `fraction`, but always at least one and never all.

  Clamping moves only the keys nearest the threshold, so each key's side stays a function of the key alone
  except when the clamp applies.
  """
  if not 0.0 < fraction < 1.0:
    raise errors.ConfigError(f"data.validation_fraction={fraction} must be in (0, 1); pass e.g. "
                             "--config.data.validation_fraction=0.05")
  if len(keys) < 2:
    raise errors.DataError(f"cannot split {len(keys)} document(s) into train and validation; add documents")
  ranked = sorted(keys, key=_unit_hash)
  num_validation = sum(_unit_hash(k) < fraction for k in keys)
  num_validation = min(max(num_validation, 1), len(keys) - 1)
  return set(ranked[:num_validation])


def is_validation(key: str, fraction: float) -> bool:
  """The per-record rule for sources too large to rank: a record is held out when its stable hash < fraction."""
  return _unit_hash(key) < fraction
