"""tools/cpu_levers.py: how a --mode=flags flag set is split into XLA flags and start-up environment settings,
and the flags each mode would ignore."""

import sys

import pytest
from conftest import REPO
from conftest import raises_one_line

from llm_jax import errors

sys.path.insert(0, f"{REPO}/tools")
import cpu_levers  # noqa: E402  pylint: disable=wrong-import-position
import profile_cpu_step  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import  # both in one process


def test_a_flag_set_splits_into_xla_flags_and_environment():
  assert cpu_levers.split_flag_set(
      "--xla_cpu_use_onednn=true JAX_CPU_ENABLE_ASYNC_DISPATCH=false --xla_cpu_enable_fast_math=false") == (
          "--xla_cpu_use_onednn=true --xla_cpu_enable_fast_math=false", {"JAX_CPU_ENABLE_ASYNC_DISPATCH": "false"})
  with raises_one_line(errors.ConfigError, "'xla_cpu_use_onednn=true'", "--xla_flags"):
    cpu_levers.split_flag_set("xla_cpu_use_onednn=true")


@pytest.mark.parametrize("mode, given, fragments", [
    ("flags", ["compile_options"], ("--compile_options", "--mode=model", "--mode=flags")),
    ("flags", ["set", "mesh_b"], ("--set, --mesh_b", "--mode=model", "--mode=flags")),
    ("model", ["rounds"], ("--rounds", "--mode=flags", "--mode=model")),
])
def test_a_flag_the_chosen_mode_ignores_is_refused(mode, given, fragments):
  with raises_one_line(errors.ConfigError, *fragments) as error:
    cpu_levers.check_mode_flags(mode, given)
  assert str(error.value).startswith(fragments[0])  # the flags given, before the mode that reads them
  cpu_levers.check_mode_flags(mode, [])  # nothing given: nothing refused
  cpu_levers.check_mode_flags("model" if mode == "flags" else "flags", given)  # the mode that reads them
