"""The multi-process plumbing without processes: launcher env and argument checks,
and bigjax.distributed's reading of the BIGJAX_* variables (the 2-process job
itself runs in test_survival_runs.py)."""
import os

import pytest

from bigjax import distributed
from experiments import launch_multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_child_env():
  base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "PATH": "/bin"}
  env = launch_multihost.child_env(base, process_id=1, num_processes=2,
                                   coordinator="127.0.0.1:1234", devices_per_process=4)
  assert env["BIGJAX_COORDINATOR"] == "127.0.0.1:1234"
  assert (env["BIGJAX_NUM_PROCESSES"], env["BIGJAX_PROCESS_ID"]) == ("2", "1")
  assert env["XLA_FLAGS"].split() == ["--xla_foo=1",
                                      "--xla_force_host_platform_device_count=4"]
  assert env["JAX_PLATFORMS"] == "cpu" and ROOT in env["PYTHONPATH"].split(os.pathsep)
  real = launch_multihost.child_env(base, process_id=0, num_processes=2,
                                    coordinator="10.0.0.1:1234", devices_per_process=None)
  assert real["XLA_FLAGS"] == base["XLA_FLAGS"] and "JAX_PLATFORMS" not in real
  assert 0 < launch_multihost.free_port() < 65536


def test_launcher_needs_main_flags(capsys):
  with pytest.raises(SystemExit):
    launch_multihost.main(["--num_processes=2"])
  assert "after `--`" in capsys.readouterr().err


def test_distributed_env_checks():
  assert distributed.initialize_from_env({}) is False
  assert distributed.initialize_from_env({"BIGJAX_DISTRIBUTED": "0"}) is False
  with pytest.raises(ValueError, match="BIGJAX_NUM_PROCESSES must be an integer"):
    distributed.initialize_from_env({"BIGJAX_COORDINATOR": "127.0.0.1:1"})
  with pytest.raises(ValueError, match=r"BIGJAX_PROCESS_ID=2 must be in \[0, "):
    distributed.initialize_from_env({"BIGJAX_COORDINATOR": "127.0.0.1:1",
                                     "BIGJAX_NUM_PROCESSES": "2", "BIGJAX_PROCESS_ID": "2"})
  with pytest.raises(ValueError, match="BIGJAX_DISTRIBUTED='maybe'"):
    distributed.initialize_from_env({"BIGJAX_DISTRIBUTED": "maybe"})
