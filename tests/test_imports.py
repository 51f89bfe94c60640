"""The layering, enforced: a module imports only its own layer or lower ones, as llm_jax.LAYERS declares them (read
from the source, lazy imports included); and the finer rules of the core and the data layer."""

import ast
import os
import subprocess
import sys

import pytest
from conftest import REPO

import llm_jax

PACKAGE = os.path.join(REPO, "llm_jax")
ENTRY_POINTS = {"llm_jax.train", "llm_jax.generate", "llm_jax.evaluate", "llm_jax.convert", "llm_jax.sweep",
                "llm_jax.bench", "llm_jax.inspect", "llm_jax.prepare", "llm_jax.harness", "llm_jax.plan"}
# The model and its step: no experiment-config types, no flags, no data pipeline, no trainer.
CORE = {"llm_jax.model", "llm_jax.attention", "llm_jax.attention_kernels", "llm_jax.steps", "llm_jax.optim",
        "llm_jax.metrics", "llm_jax.sharding", "llm_jax.batch", "llm_jax.target", "llm_jax.tpu", "llm_jax.roofline"}
CORE_MAY_NOT_REACH = ("ml_collections", "absl", "llm_jax.data", "llm_jax.trainer")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel.removesuffix(".__init__")


def _modules() -> dict[str, str]:
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        found[_module_name(os.path.join(root, name))] = os.path.join(root, name)
  return found


MODULES = _modules()


def imports_of(module: str) -> set[str]:
  """Every module `module` imports, anywhere in its source: llm_jax modules by full name, others by top package."""
  with open(MODULES[module], encoding="utf-8") as f:
    tree = ast.parse(f.read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
  return {n if n.startswith("llm_jax") else n.split(".")[0] for n in names} - {module}


def reach(module: str) -> set[str]:
  """The transitive closure of `imports_of` within llm_jax, plus the third-party packages it touches."""
  seen, todo = set(), [module]
  while todo:
    for name in imports_of(todo.pop()):
      if name not in seen:
        seen.add(name)
        if name in MODULES:
          todo.append(name)
  return seen


def layer_of(module: str) -> int:
  """The index in llm_jax.LAYERS of the layer that declares `module` (the package root, which holds the table, is
  below them all); KeyError if none does, ValueError if several do."""
  if module == "llm_jax":
    return -1
  name = module.removeprefix("llm_jax.")
  found = [i for i, (_, names) in enumerate(llm_jax.LAYERS) for pattern in names
           if name == pattern or (pattern.endswith(".*") and (name + ".").startswith(pattern[:-1]))]
  if not found:
    raise KeyError(f"{module} is in no layer of llm_jax.LAYERS; place it there")
  if len(set(found)) > 1:
    raise ValueError(f"{module} is in several layers of llm_jax.LAYERS: {sorted(set(found))}")
  return found[0]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports_only_its_layer_or_lower(module):
  own = layer_of(module)
  bad = sorted(n for n in imports_of(module) if n in MODULES and layer_of(n) > own)
  names = [name for name, _ in llm_jax.LAYERS]
  assert not bad, f"{module} ({names[own]}) imports higher layers: " + ", ".join(f"{n} ({names[layer_of(n)]})"
                                                                             for n in bad)


def test_the_layer_rule_catches_a_wrong_import():
  # The rule's own check, on the graph as it is: a core module that imported the trainer would be refused.
  assert layer_of("llm_jax.trainer") > layer_of("llm_jax.model") > layer_of("llm_jax.paths")
  assert layer_of("llm_jax.data.store") == layer_of("llm_jax.tokenizer") < layer_of("llm_jax.workdir")
  with pytest.raises(KeyError, match="no layer"):
    layer_of("llm_jax.not_declared")


def test_the_rules_see_every_layer():
  assert CORE <= set(MODULES) and ENTRY_POINTS <= set(MODULES)
  assert "llm_jax.model" in reach("llm_jax.steps") and "ml_collections" in reach("llm_jax.trainer")


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_reaches_no_config_flags_data_or_trainer(module):
  bad = sorted(n for n in reach(module) if n.startswith(CORE_MAY_NOT_REACH))
  assert not bad, f"{module} reaches {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("llm_jax.data")))
def test_data_imports_neither_the_model_nor_the_steps(module):
  bad = sorted(n for n in reach(module) if n in ("llm_jax.model", "llm_jax.steps", "llm_jax.trainer")
               or n.startswith(("ml_collections", "absl")))
  assert not bad, f"{module} reaches {bad}"


@pytest.mark.parametrize("module", sorted(set(MODULES) - ENTRY_POINTS - {"llm_jax.launch"}))
def test_library_modules_import_no_entry_point_and_not_launch(module):
  bad = sorted(n for n in imports_of(module) if n in ENTRY_POINTS | {"llm_jax.launch"})
  assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_entry_points_never_import_each_other(module):
  bad = sorted(n for n in imports_of(module) if n in ENTRY_POINTS)
  assert not bad, f"{module} imports {bad}"


@pytest.mark.slow
def test_the_token_store_workers_do_not_load_jax():
  # The store's worker processes import only the store: seconds of JAX start-up each would dominate small shards.
  code = "import sys, llm_jax.data.store; print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
  assert out.stdout.strip() == "[]"


def _top_level_imports(module: str) -> set[str]:
  with open(MODULES[module], encoding="utf-8") as f:
    tree = ast.parse(f.read())
  names = set()
  for node in tree.body:
    if isinstance(node, ast.Import):
      names.update(a.name.split(".")[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module.split(".")[0])
  return names


@pytest.mark.parametrize("module", sorted(MODULES))
def test_lm_eval_stays_optional(module):
  """Only the harness backend and its entry point touch lm_eval (the `eval` extra), and only inside functions."""
  if module in ("llm_jax.evals.harness", "llm_jax.harness"):
    assert "lm_eval" not in _top_level_imports(module)
  else:
    assert "lm_eval" not in imports_of(module)
