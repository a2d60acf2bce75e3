"""The multi-process plumbing without processes: launcher env and argument checks,
and bigjax.distributed's reading of the BIGJAX_* variables (the 2-process job
itself runs in test_survival_runs.py)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bigjax import config as config_lib, distributed
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
  with pytest.raises(ValueError, match="BIGJAX_NUM_PROCESSES must be .*it is not set"):
    distributed.initialize_from_env({"BIGJAX_COORDINATOR": "127.0.0.1:1"})
  with pytest.raises(ValueError, match=r"BIGJAX_PROCESS_ID=2 must be in \[0, "):
    distributed.initialize_from_env({"BIGJAX_COORDINATOR": "127.0.0.1:1",
                                     "BIGJAX_NUM_PROCESSES": "2", "BIGJAX_PROCESS_ID": "2"})
  with pytest.raises(ValueError, match="BIGJAX_DISTRIBUTED='maybe'"):
    distributed.initialize_from_env({"BIGJAX_DISTRIBUTED": "maybe"})


def test_auto_without_a_cluster_says_what_to_set():
  """This machine has no TPU slice, SLURM or MPI job to detect. In a fresh process:
  jax.distributed.initialize refuses to run once this one's backend is up."""
  script = ("from bigjax import distributed\n"
            "try:\n"
            "  distributed.initialize_from_env({'BIGJAX_DISTRIBUTED': 'auto'})\n"
            "except distributed.EnvError as e:\n"
            "  print(e)\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith("BIGJAX_DISTRIBUTED=auto: JAX found no cluster to join here ")
  assert ("set BIGJAX_COORDINATOR, BIGJAX_NUM_PROCESSES and BIGJAX_PROCESS_ID instead"
          in r.stdout), r.stdout


COORD = {"BIGJAX_COORDINATOR": "127.0.0.1:1"}


@pytest.mark.parametrize("environ, match", [
    # A process count or index without a coordinator: each host would train alone.
    ({"BIGJAX_NUM_PROCESSES": "2", "BIGJAX_PROCESS_ID": "1"},
     "BIGJAX_NUM_PROCESSES=2 and BIGJAX_PROCESS_ID=1 set without BIGJAX_COORDINATOR: "
     "set BIGJAX_COORDINATOR=HOST:PORT"),
    ({"BIGJAX_PROCESS_ID": "0"}, "BIGJAX_PROCESS_ID=0 set without BIGJAX_COORDINATOR"),
    # auto detects both: explicit ones would be silently overridden.
    ({"BIGJAX_DISTRIBUTED": "auto", "BIGJAX_NUM_PROCESSES": "4"},
     "BIGJAX_NUM_PROCESSES=4 set without BIGJAX_COORDINATOR: unset it, as "
     "BIGJAX_DISTRIBUTED=auto detects"),
    # Every integer names its variable (it was a bare "invalid literal for int()").
    ({"BIGJAX_INIT_TIMEOUT": "5m"}, "BIGJAX_INIT_TIMEOUT must be in seconds, an integer "
     ">= 1 such as 300 \\(no unit\\); got BIGJAX_INIT_TIMEOUT='5m'"),
    ({"BIGJAX_INIT_TIMEOUT": "0"}, "BIGJAX_INIT_TIMEOUT must be in seconds"),
    ({**COORD, "BIGJAX_NUM_PROCESSES": "two", "BIGJAX_PROCESS_ID": "0"},
     "BIGJAX_NUM_PROCESSES must be the number of processes, an integer >= 1; "
     "got BIGJAX_NUM_PROCESSES='two'"),
    ({**COORD, "BIGJAX_NUM_PROCESSES": "0", "BIGJAX_PROCESS_ID": "0"},
     "BIGJAX_NUM_PROCESSES must be the number of processes, an integer >= 1"),
    ({**COORD, "BIGJAX_NUM_PROCESSES": "2", "BIGJAX_PROCESS_ID": "-1"},
     "BIGJAX_PROCESS_ID must be this process's index, an integer >= 0"),
    ({**COORD, "BIGJAX_NUM_PROCESSES": "2", "BIGJAX_PROCESS_ID": "1.0"},
     "got BIGJAX_PROCESS_ID='1.0'"),
    # JAX's own words were an IndexError and a failed RPC server.
    *[({"BIGJAX_COORDINATOR": bad, "BIGJAX_NUM_PROCESSES": "2", "BIGJAX_PROCESS_ID": "1"},
       f"BIGJAX_COORDINATOR='{bad}' must be HOST:PORT") for bad in
      ("127.0.0.1", "127.0.0.1:notaport", ":1234", "127.0.0.1:70000")],
])
def test_distributed_env_errors_name_the_variable(environ, match):
  # ConfigError: what `python -m bigjax.main` prints as one line.
  with pytest.raises(config_lib.ConfigError, match=match):
    distributed.initialize_from_env(environ)


def test_a_coordinator_port_in_use_is_named_before_jax_starts():
  # JAX 0.12's process 0 crashes (SIGSEGV) on a taken port.
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(config_lib.ConfigError, match=f"cannot listen on port {port} "
                       r"\(Address already in use\); pick a free port"):
      distributed.initialize_from_env({"BIGJAX_COORDINATOR": f"127.0.0.1:{port}",
                                       "BIGJAX_NUM_PROCESSES": "2", "BIGJAX_PROCESS_ID": "0"})


def test_cli_reports_env_error_in_one_line(tmp_path):
  env = dict(os.environ, BIGJAX_NUM_PROCESSES="2", BIGJAX_PROCESS_ID="1")
  r = subprocess.run([sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlocal",
                      f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stdout + r.stderr
  lines = [line for line in r.stderr.splitlines() if "BIGJAX_" in line]
  assert lines == ["Invalid config: BIGJAX_NUM_PROCESSES=2 and BIGJAX_PROCESS_ID=1 set "
                   "without BIGJAX_COORDINATOR: set BIGJAX_COORDINATOR=HOST:PORT (process 0's "
                   "address) on every process too (experiments/launch_multihost.py sets all "
                   "three), or unset them to run a single process."], r.stderr
  assert "Traceback" not in r.stderr and not os.listdir(tmp_path)


# Stands in for `python -m bigjax.main`: records the signal that stops it. Python
# turns an inherited SIGINT into KeyboardInterrupt unless the launcher ignored it.
FAKE_CHILD = """#!{python}
import os, signal, sys, time
out = os.path.join({out!r}, str(os.getpid()))
def stop(signum, frame):
  with open(out, "w") as f:
    f.write(signal.Signals(signum).name)
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
try:
  open(out, "w").close()
  time.sleep(60)
except KeyboardInterrupt:
  with open(out, "w") as f:
    f.write("KeyboardInterrupt")
  sys.exit(1)
"""


@pytest.mark.parametrize("how", ["SIGTERM to the launcher", "SIGINT to the launcher",
                                 "Ctrl-C: SIGINT to the process group"])
def test_launcher_stops_processes_with_sigterm(tmp_path, how):
  fake = tmp_path / "fake_python"
  fake.write_text(FAKE_CHILD.format(python=sys.executable, out=str(tmp_path)))
  fake.chmod(0o755)
  script = ("import sys; from experiments import launch_multihost; sys.exit(launch_multihost."
            f"launch(['--x'], num_processes=2, devices_per_process=None, python={str(fake)!r}))")
  # Its own process group, like a job a terminal started: the group is what Ctrl-C hits.
  launcher = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, start_new_session=True,
                              stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 60
    while len([n for n in os.listdir(tmp_path) if n.isdigit()]) < 2:
      assert time.monotonic() < deadline and launcher.poll() is None, launcher.stderr.read()
      time.sleep(0.02)
    if how.startswith("Ctrl-C"):
      os.killpg(launcher.pid, signal.SIGINT)
    else:
      launcher.send_signal(signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT)
    assert launcher.wait(timeout=30) == 0, launcher.stderr.read()
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
      launcher.wait()
  got = [(tmp_path / n).read_text() for n in os.listdir(tmp_path) if n.isdigit()]
  assert got == ["SIGTERM", "SIGTERM"]


_SIGNAL_WHILE_STARTING = """
import os, signal, subprocess, sys
from experiments import launch_multihost
real_popen, started = subprocess.Popen, []

def popen(*args, **kwargs):
  started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            preexec_fn=kwargs["preexec_fn"]))
  if len(started) == 1:
    os.kill(os.getpid(), signal.SIGINT)  # Handled at the next bytecode, in launch.
  return started[-1]

launch_multihost.subprocess.Popen = popen
code = launch_multihost.launch(["--x"], num_processes=3, devices_per_process=None)
print(code, len(started), started[0].wait(timeout=30))
"""


def test_a_signal_while_the_processes_start_stops_the_job_without_a_failure():
  # Ctrl-C as the first process starts: no more are started, and the one started,
  # killed by the SIGTERM before it could handle it, is the stop asked for. (In its
  # own process: the launcher forks, which a test process running JAX should not.)
  r = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_STARTING], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == [str(128 + signal.SIGINT), "1", str(-signal.SIGTERM)], r.stdout
  assert "a process exited" not in r.stderr, r.stderr
