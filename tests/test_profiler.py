"""The profiler switch: its range is checked before anything runs, and a 3-step run leaves a trace in tensorboard/."""

import glob
import os

import pytest
from conftest import raises_one_line
from conftest import smoke_config

from llm_jax import config as config_lib
from llm_jax import errors
from llm_jax import profiler
from llm_jax import trainer


@pytest.mark.parametrize("spec, expected", [("", None), ("2,3", (2, 3)), (" 1 , 30 ", (1, 30)), ("(4,9)", (4, 9)),
                                            ((5, 6), (5, 6))])
def test_profile_steps_parse(spec, expected):
  assert profiler.parse_steps(spec, 30) == expected


@pytest.mark.parametrize("spec", ["3,3", "4,2", "0,2", "1,31", "5", "a,b", "1,2,3", "-1,2"])
def test_bad_profile_steps_are_refused_by_validate_in_one_line(spec):
  c = smoke_config(profile_steps=spec)
  with raises_one_line(errors.ConfigError, f"profile_steps={spec!r}", "num_train_steps=30"):
    config_lib.check(c)


@pytest.mark.slow
def test_a_three_step_run_writes_a_trace_of_its_profiled_steps(tmp_path):
  workdir = str(tmp_path)
  c = smoke_config(num_train_steps=3, log_every=1, eval_every=0, checkpoint_every=3, optim={"warmup_steps": 1},
                   profile_steps="2,3")
  trainer.train_and_evaluate(config_lib.resolve(c), workdir)
  traces = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000, traces
