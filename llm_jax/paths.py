"""Where files live: every file the project reads or writes goes through `etils.epath`, so a local path and an
object-store URL (gs://, s3://) take the same code, and the few operations that differ between them live here.

Paths stay plain strings in the rest of the code (`os.path.join`, `dirname` and `basename` are right for URLs
too); only the I/O goes through `as_path`. A local path keeps the exact behaviour it had with `open`/`os`:
epath hands it to its os backend. Without TensorFlow, epath reaches gs:// through fsspec (gcsfs must be
installed on the machine); orbax reaches it through tensorstore and google-cloud-storage.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import sys
from typing import Iterator

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath

from llm_jax import errors

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_WILDCARD = re.compile(r"[*?\[]")


def _glob_below_literal_path(self: epath.Path, pattern: str) -> Iterator[epath.Path]:
  """`Path.glob` with the path itself taken literally, as pathlib does, and only `pattern` as a pattern.

  etils 1.15 joins the path into the pattern: a local folder named `r[1]` became the character class `r1`, so orbax
  found none of the per-process OCDBT files it lists this way, committed checkpoints without their manifest and
  could not read them back, and a folder with `*` in its name could pick up another run's files. Installed on
  epath's local paths by `_install_literal_glob` (object stores keep etils' own; `checkpoint.check_reachable`
  refuses such characters there).
  """
  if self._backend is not epath_backend.os_backend:  # pylint: disable=protected-access
    yield from _ETILS_GLOB(self, pattern)
    return
  yield from _ETILS_GLOB(type(self)(glob.escape(os.fspath(self))), pattern)


def _install_literal_glob() -> None:
  """Every local epath Path (orbax's included) globs below its own path literally; idempotent."""
  epath_gpath._GPath.glob = _glob_below_literal_path  # pylint: disable=protected-access


# etils' own glob (kept across a reload of this module, which would otherwise wrap the wrapper).
_ETILS_GLOB = getattr(epath_gpath._GPath.glob, "etils_glob", epath_gpath._GPath.glob)  # pylint: disable=protected-access
_glob_below_literal_path.etils_glob = _ETILS_GLOB
_install_literal_glob()


def is_local(location: str) -> bool:
  """False for a URL (gs://, s3://, ...), True for a file-system path."""
  return not _URL_SCHEME.match(os.fspath(location))


def as_path(location: str) -> epath.Path:
  """The epath of `location` (a local path as it is: no `~` expansion, as with `open`)."""
  return epath.Path(os.fspath(location))


def absolute(location: str) -> str:
  """An absolute local path, or the URL unchanged: `os.path.abspath("gs://b/x")` would make it a local folder
  named 'gs:'."""
  location = os.fspath(location)
  return os.path.abspath(location) if is_local(location) else location


def write_atomic(location: str, data: bytes | str) -> None:
  """Writes a whole file so that a reader sees the old content or the new, never a part.

  Locally: a temporary file in the same folder, then `os.replace`. On an object store one object write is
  already atomic (the object appears whole when the upload finishes) and a rename is a copy plus a delete,
  so the object is written directly.
  """
  payload = data.encode("utf-8") if isinstance(data, str) else data
  path = as_path(location)
  if not is_local(location):
    path.write_bytes(payload)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(payload)
  os.replace(tmp, path)


def probe_writable(location: str) -> None:
  """Proves a file can be written at `location` without changing it: an existing file is opened for appending and
  closed, a missing one is created empty and removed again. A probe rather than os.access, which says yes to root on
  read-only mounts. Raises OSError (the caller names the flag and the fix)."""
  path = as_path(location)
  if path.exists():
    with path.open("a"):
      pass
  else:
    path.write_bytes(b"")
    path.unlink()


def makedirs(location: str) -> None:
  """Creates a folder and its parents (on an object store, where folders are only name prefixes, nothing to make
  once the bucket exists)."""
  as_path(location).mkdir(parents=True, exist_ok=True)


def size(location: str) -> int:
  """The file's length in bytes."""
  return os.path.getsize(os.path.expanduser(location)) if is_local(location) else as_path(location).stat().length


def size_and_mtime_ns(location: str) -> tuple[int, int]:
  """The file's length in bytes and modification time in nanoseconds (an object store's has whole seconds), from
  one stat: a corpus's identity stats every file at each start, so this is kept cheap."""
  if is_local(location):
    st = os.stat(os.path.expanduser(location))
    return st.st_size, st.st_mtime_ns
  st = as_path(location).stat()
  return st.length, int(st.mtime) * 10**9


def warn_no_lock(location: str, what: str) -> None:
  """One warning line: an object store has no flock, so one writer per `location` is the user's job."""
  print(f"warning: {location} is on an object store, which has no file locks: {what} is not locked there; run "
        "one job per workdir", file=sys.stderr, flush=True)


def glob_files(pattern: str) -> list[str]:
  """The files (not folders) matched by one glob: through `glob` for a local pattern (`~` expanded, `**`
  recursive), through epath below the pattern's last wildcard-free folder for a URL (where epath refuses `**`)."""
  if is_local(pattern):
    return [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
  if "**" in pattern:
    raise errors.ConfigError(f"{pattern!r}: a recursive ** is not supported on an object store (epath refuses it, as "
                             "it can take thousands of listing requests); name each level with *")
  parts = pattern.split("/")
  first = next((i for i, part in enumerate(parts) if _WILDCARD.search(part)), len(parts))
  root = as_path("/".join(parts[:first]))
  if first == len(parts):
    return [pattern] if root.is_file() else []
  return [os.fspath(p) for p in root.glob("/".join(parts[first:])) if p.is_file()]


def check_local(location: str, what: str) -> None:
  """Refuses a URL for a setting that only local files serve (TFDS data, Hugging Face folders, sweep roots): those
  go through libraries or subprocesses that would quietly make a local folder named 'gs:'."""
  match = _URL_SCHEME.match(location or "")
  if match:
    raise errors.ConfigError(f"{what}={location} is not a local path, and {what} takes only local ones; pass a local "
                             "directory or a mounted bucket (e.g. gcsfuse) instead")


# The fsspec protocol epath uses for each URL scheme when TensorFlow is absent, and the package that provides it.
_FSSPEC = {"gs": ("gcs", "gcsfs"), "s3": ("s3", "s3fs")}


_ONE_SLASH_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def check_reachable(location: str, what: str) -> None:
  """Refuses, in one line naming the package, a URL that epath could not open here, before any work is done; and a
  URL missing a slash (gs:/bucket), which would otherwise become a local folder named 'gs:'."""
  one_slash = _ONE_SLASH_URL.match(location or "")
  if one_slash:
    raise errors.ConfigError(f"{what}={location} is a URL with one slash after {one_slash.group(1)}:, which would "
                             f"make a local folder named '{one_slash.group(1)}:'; write "
                             f"{one_slash.group(1)}://{location[len(one_slash.group(0)):]}")
  match = _URL_SCHEME.match(location or "")
  if not match:
    return
  scheme = match.group(1)
  if scheme not in _FSSPEC:
    raise errors.ConfigError(f"{what}={location}: {scheme}:// is not supported; use a local path, gs:// or s3://")
  if importlib.util.find_spec("tensorflow") is not None:
    return  # epath then goes through tf.io.gfile
  import fsspec  # pylint: disable=import-outside-toplevel  (etils' epath depends on it; only URLs need it here)

  protocol, package = _FSSPEC[scheme]
  try:
    fsspec.get_filesystem_class(protocol)
  except ImportError:
    raise errors.ConfigError(f"{what}={location} needs the {package} package to reach {scheme}:// (or "
                             f"TensorFlow); pip install {package} on every host") from None


def file_sha256(path: str) -> str:
  """The sha256 of a file's bytes, read in 16 MiB blocks: the identity of a tokenizer, a model card or a store shard
  (checkpoints, the token store and its cache key record it)."""
  digest = hashlib.sha256()
  with as_path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()
