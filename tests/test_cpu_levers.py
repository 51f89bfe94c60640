"""tools/cpu_levers.py: how a --mode=flags flag set is split into XLA flags and start-up environment settings,
and the flags each mode would ignore."""

import sys

import pytest
from conftest import REPO

sys.path.insert(0, f"{REPO}/tools")
import cpu_levers  # noqa: E402  pylint: disable=wrong-import-position
import profile_cpu_step  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import  # both in one process


def test_a_flag_set_splits_into_xla_flags_and_environment():
  assert cpu_levers.split_flag_set(
      "--xla_cpu_use_onednn=true JAX_CPU_ENABLE_ASYNC_DISPATCH=false --xla_cpu_enable_fast_math=false") == (
          "--xla_cpu_use_onednn=true --xla_cpu_enable_fast_math=false", {"JAX_CPU_ENABLE_ASYNC_DISPATCH": "false"})
  with pytest.raises(ValueError, match=r"^'xla_cpu_use_onednn=true' in --xla_flags is neither an XLA flag "
                     r"\(--name=value\) nor an environment setting \(NAME=VALUE\)$"):
    cpu_levers.split_flag_set("xla_cpu_use_onednn=true")


@pytest.mark.parametrize("mode, given, message", [
    ("flags", ["compile_options"], r"^--compile_options is read only by --mode=model, not --mode=flags: drop it"),
    ("flags", ["set", "mesh_b"], r"^--set, --mesh_b are read only by --mode=model"),
    ("model", ["rounds"], r"^--rounds is read only by --mode=flags, not --mode=model: drop it or change --mode"),
])
def test_a_flag_the_chosen_mode_ignores_is_refused(mode, given, message):
  with pytest.raises(ValueError, match=message):
    cpu_levers.check_mode_flags(mode, given)
  cpu_levers.check_mode_flags(mode, [])  # nothing given: nothing refused
  cpu_levers.check_mode_flags("model" if mode == "flags" else "flags", given)  # the mode that reads them
