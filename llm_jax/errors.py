"""The user-error family: what a user can fix (a config value, a data file, a mesh, a checkpoint, a run's state).

The entry points print a `UserError` as one line naming the problem and the fix, with exit status 2; any other
exception is a bug of ours or of a library and keeps its traceback. Each kind also derives from the builtin error
it stands for, so code that catches ValueError, RuntimeError or FileNotFoundError keeps catching it. The config
sections' `check()`s are written in the three helpers at the end (`require`, `require_choice`, `refuse_ignored`).
"""

from __future__ import annotations


class UserError(Exception):
  """A problem in what the user gave or in a run's files; the message names it and how to fix it."""


class ConfigError(UserError, ValueError):
  """A config key, flag or value that cannot work, or that the chosen mode would silently ignore."""


class DataError(UserError, ValueError):
  """A corpus, data file, token store, tokenizer or evaluation file that cannot be used as given."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the user named (or a run needs) that does not exist."""


class MeshError(UserError, ValueError):
  """A mesh that does not fit the devices or the model."""


class CheckpointError(UserError, RuntimeError):
  """No usable checkpoint where one was required, or one that does not match the run."""


class RunError(UserError, RuntimeError):
  """A run that must stop (a busy workdir, a lost peer, storage); the message says why and what to do."""


# The checks every config section's `check()` is written in: each failure is one ConfigError line.
def require(ok: bool, message: str) -> None:
  """Raises ConfigError(`message`) unless `ok`."""
  if not ok:
    raise ConfigError(message)


def require_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
  """Refuses a `key` whose `value` is not one of `allowed`."""
  require(value in allowed, f"{key}={value!r} is not one of {', '.join(allowed)}; pass --config.{key}=<one of them>")


def refuse_ignored(key: str, value: object, default: object, chooser: str, reader: str) -> None:
  """Refuses `key` set away from its `default` when the choice `chooser` ('data.corpus=...') never reads it; the fix
  names the choice that would (`reader`) or clearing it."""
  blank = default in ("", False)
  require(value == default, f"{key} is set but {chooser} ignores it; pass --config.{reader} (or "
          f"{'clear' if blank else 'restore'} {key}{'' if blank else f'={default}'})")
