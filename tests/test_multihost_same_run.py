"""Two processes of one job must be given one run: the same config (else each
builds its own model copy: a different seed trains diverging copies silently),
and a workdir that is one directory for both, whatever its name on each (else the
job trains, then hangs at its first checkpoint for orbax's 20-minute timeout).
Both are one line on every process, before anything is compiled. Real 2-process
jobs (gloo)."""
import os
import subprocess
import sys

import pytest

from experiments import launch_multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _two_processes(tmp_path, per_process_flags, cwds=(ROOT, ROOT)):
  """Runs `python -m bigjax.main` as processes 0 and 1 of one job; their outputs."""
  coordinator = f"127.0.0.1:{launch_multihost.free_port()}"
  procs = []
  for i, (flags, cwd) in enumerate(zip(per_process_flags, cwds)):
    env = launch_multihost.child_env(dict(os.environ, BIGJAX_INIT_TIMEOUT="60"), process_id=i,
                                     num_processes=2, coordinator=coordinator,
                                     devices_per_process=1)
    cmd = [sys.executable, "-m", "bigjax.main",
           f"--config={ROOT}/configs/lm.py:runlocal", "--config.mesh.data=2",
           f"--config.data.data_dir={tmp_path / 'data'}", *flags]
    procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=240)
    outs.append((p.returncode, out))
  return outs


def _error_lines(out: str) -> list[str]:
  return [line for line in out.splitlines() if line.startswith("Invalid config:")]


def test_processes_given_other_configs_stop_naming_the_field(tmp_path):
  workdir = f"--workdir={tmp_path / 'run'}"
  outs = _two_processes(tmp_path, [[workdir], [workdir, "--config.seed=1"]])
  for code, out in outs:
    assert code == 1 and "Traceback" not in out, out[-3000:]
  assert _error_lines(outs[0][1]) == [
      "Invalid config: process(es) [1] were given another config than process 0. Run the "
      "same command, with the same --config.* flags, on every process."]
  assert _error_lines(outs[1][1]) == [
      "Invalid config: process(es) [1] were given another config than process 0. Here: "
      "config.seed 1, process 0 0. Run the same command, with the same --config.* flags, on "
      "every process."]
  assert not os.path.exists(tmp_path / "run")  # Nothing written.


def test_a_workdir_that_is_not_shared_stops_before_training(tmp_path):
  # One relative --workdir, two directories: as a local path on each of two hosts.
  cwds = [tmp_path / "host0", tmp_path / "host1"]
  for cwd in cwds:
    cwd.mkdir()
  outs = _two_processes(tmp_path, [["--workdir=run"]] * 2, cwds=cwds)
  for code, out in outs:
    assert code == 1 and "Traceback" not in out, out[-3000:]
    assert _error_lines(out) == [
        "Invalid config: --workdir=run is not one directory shared by the processes: "
        "process(es) [1] cannot see the file process 0 wrote there. Use a filesystem every "
        "host mounts (NFS, ...) or a gs:// bucket."], out[-3000:]
    assert "step 1" not in out
  assert os.listdir(cwds[0] / "run") == ["run.lock"]  # The probe is gone (the lock file stays).
