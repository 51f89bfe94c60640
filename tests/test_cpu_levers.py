"""experiments/cpu_levers.py --mode=flags: how a flag set is split into XLA flags and start-up environment settings."""

import subprocess
import sys

from conftest import REPO

_SPLIT = """
import sys
sys.path.insert(0, "experiments")
import cpu_levers
for flag_set in sys.argv[1:]:
  try:
    print(cpu_levers.split_flag_set(flag_set))
  except ValueError as e:
    print("ValueError:", e)
"""


def test_a_flag_set_splits_into_xla_flags_and_environment():
  # In a fresh process: cpu_levers defines absl flags that other experiment scripts define too.
  sets = ["--xla_cpu_use_onednn=true JAX_CPU_ENABLE_ASYNC_DISPATCH=false --xla_cpu_enable_fast_math=false",
          "xla_cpu_use_onednn=true"]
  out = subprocess.run([sys.executable, "-c", _SPLIT, *sets], cwd=REPO, capture_output=True, text=True, check=True)
  assert out.stdout.splitlines() == [
      "('--xla_cpu_use_onednn=true --xla_cpu_enable_fast_math=false', {'JAX_CPU_ENABLE_ASYNC_DISPATCH': 'false'})",
      "ValueError: 'xla_cpu_use_onednn=true' in --xla_flags is neither an XLA flag (--name=value) nor an environment "
      "setting (NAME=VALUE)"]
