"""What the library imports at module level is what a fresh install gets: every third-party package imported at
the top of an `llm_jax` module is pinned in requirements.txt (README's first command installs only that) and
named in setup.cfg's install_requires."""

import ast
import configparser
import importlib.metadata
import os
import pathlib
import re
import sys

from conftest import REPO


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _top_level_imports() -> dict[str, str]:
  """{third-party top-level module: one file importing it at module level}."""
  found = {}
  for path in sorted(pathlib.Path(REPO, "llm_jax").rglob("*.py")):
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
      if isinstance(node, ast.Import):
        names = [a.name.split(".")[0] for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module.split(".")[0]]
      else:
        continue
      for name in names:
        if name not in sys.stdlib_module_names and name not in ("llm_jax", "__future__"):
          found.setdefault(name, os.path.relpath(path, REPO))
  return found


def _pinned() -> set[str]:
  with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
    return {_normalise(line.split("==")[0]) for line in f if line.strip() and not line.startswith("#")}


def _install_requires() -> set[str]:
  parser = configparser.ConfigParser()
  parser.read(os.path.join(REPO, "setup.cfg"))
  return {_normalise(line.strip()) for line in parser["options"]["install_requires"].splitlines() if line.strip()}


def test_every_module_level_import_is_installed_by_the_main_requirements():
  distributions = importlib.metadata.packages_distributions()
  pinned, required = _pinned(), _install_requires()
  imports = _top_level_imports()
  assert {"jax", "flax", "jinja2"} <= set(imports)  # the scan sees the library's imports
  for module, where in imports.items():
    dists = {_normalise(d) for d in distributions.get(module, [])}
    assert dists, f"{module} (imported by {where}) is not installed here"
    assert dists & pinned, f"{module} (imported by {where}) comes from {sorted(dists)}, not in requirements.txt"
    assert dists & required, f"{module} (imported by {where}) comes from {sorted(dists)}, not in setup.cfg"
