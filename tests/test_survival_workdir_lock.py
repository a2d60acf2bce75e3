"""Two runs on one workdir: the second is refused with a line naming the holder,
touching nothing; a holder whose process is gone is taken over."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bigjax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Holds the workdir's lock as a run would; with "fork", hands the lock on to a
# child (which inherits the open file) and exits, leaving a stale holder.
_HOLDER = textwrap.dedent("""
    import os, sys, time
    from bigjax import workdir_lock
    lock = workdir_lock.LocalWorkdirLock(sys.argv[1])
    lock.acquire()
    if sys.argv[2] == "fork":
      if os.fork() == 0:
        time.sleep(600)
      print(os.getpid(), flush=True)
      os._exit(0)
    print(os.getpid(), flush=True)
    time.sleep(600)
""")


def _hold(workdir, mode="sleep"):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir, mode], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True, start_new_session=True)
  pid = int(proc.stdout.readline())
  return proc, pid


def _stop(proc):
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


def _main(workdir, *flags):
  cmd = [sys.executable, "-m", "bigjax.main", "--config=configs/lm.py:runlocal",
         f"--workdir={workdir}", *flags]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def test_second_run_is_refused_naming_the_holder_and_touches_nothing(tmp_path, corpus_data_dir):
  workdir = str(tmp_path / "run")
  holder, pid = _hold(workdir)
  try:
    proc = _main(workdir, f"--config.data.data_dir={corpus_data_dir}")
    out, err = proc.communicate(timeout=300)
  finally:
    _stop(holder)
  assert proc.returncode == 1, out + err[-3000:]
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and "in use by another run" in lines[0], err
  assert f"pid {pid}" in lines[0] and "kill" in lines[0]
  assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_NAME]


def test_holder_killed_without_releasing_is_noted_and_replaced(tmp_path):
  workdir = str(tmp_path)
  holder, pid = _hold(workdir)
  _stop(holder)  # SIGKILL: the OS drops the lock; the record names the dead run.
  lock = workdir_lock.LocalWorkdirLock(workdir)
  note = lock.acquire()
  assert "ended without releasing" in note and f"pid {pid}" in note
  with open(lock.path) as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()
  again = workdir_lock.LocalWorkdirLock(workdir)
  assert again.acquire() is None  # A clean release leaves no note.
  again.release()


def test_stale_holder_whose_lock_lives_on_in_a_child_is_taken_over(tmp_path):
  workdir = str(tmp_path)
  holder, pid = _hold(workdir, mode="fork")  # Exits; its child keeps the lock.
  try:
    holder.wait(timeout=60)
    lock = workdir_lock.LocalWorkdirLock(workdir)
    note = lock.acquire()
    assert "Took over" in note and f"pid {pid}" in note and "process is gone" in note
    # Now the takeover is the holder, alive: the next run is refused.
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
      workdir_lock.LocalWorkdirLock(workdir).acquire()
    lock.release()
  finally:
    _stop(holder)  # The forked child is in the holder's process group.


@pytest.mark.slow
def test_same_command_twice_half_a_second_apart(tmp_path, corpus_data_dir):
  workdir = str(tmp_path / "run")
  flags = [f"--config.data.data_dir={corpus_data_dir}", "--config.log_every=1"]
  first = _main(workdir, *flags)
  time.sleep(0.5)
  second = _main(workdir, *flags)
  results = [(p, *p.communicate(timeout=600)) for p in (first, second)]
  codes = sorted(p.returncode for p, _, _ in results)
  assert codes == [0, 1], [(p.returncode, err[-2000:]) for p, _, err in results]
  winner = next(p for p, _, _ in results if p.returncode == 0)
  _, _, refused_err = next(r for r in results if r[0].returncode == 1)
  assert f"in use by another run: pid {winner.pid}" in refused_err, refused_err
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [row["step"] for row in rows if "loss" in row]
  assert steps == list(range(1, 21))  # Each step once, in order.


def test_train_prepare_is_refused_while_a_run_holds_the_workdir(tmp_path, corpus_data_dir):
  """A sweep or notebook setting up through train.prepare goes through the same
  lock: it would otherwise remove the running run's save in flight as
  'unfinished'. Released at close(), the workdir can be prepared again."""
  from bigjax import train
  from configs import lm

  workdir = str(tmp_path / "run")
  os.makedirs(os.path.join(workdir, "checkpoints", "7.orbax-checkpoint-tmp"))
  config = lm.get_config("runlocal")
  config.data.data_dir = corpus_data_dir
  holder, pid = _hold(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {pid}"):
      train.prepare(config, workdir)
  finally:
    _stop(holder)
  # The holder's save in flight was left alone.
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "7.orbax-checkpoint-tmp"))
  prepared = train.prepare(config, workdir)  # The holder is gone: taken over.
  prepared.close()
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME)) as f:
    assert f.read() == ""  # Released: a clean end empties the record.


def test_live_holder_in_another_pid_namespace_on_the_same_host_is_not_taken_over(tmp_path):
  # Containers sharing the hostname but not their pids: the holder's pid (1 in its
  # own namespace) means nothing here, so its held lock must be respected.
  workdir = str(tmp_path)
  if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                    capture_output=True).returncode:
    pytest.skip("needs unshare --pid (Linux, privileged)")
  proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                           _HOLDER, workdir, "sleep"], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True, start_new_session=True)
  try:
    assert int(proc.stdout.readline()) == 1  # The first process of its namespace.
    with pytest.raises(workdir_lock.WorkdirBusyError, match="pid 1 "):
      workdir_lock.LocalWorkdirLock(workdir).acquire()
  finally:
    _stop(proc)


def test_a_holder_seen_from_another_pid_namespace_counts_as_alive():
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  here = {**workdir_lock.this_process(), "pid": dead.pid, "process_start": None}
  assert not workdir_lock.alive(here)
  assert workdir_lock.alive({**here, "pid_space": "another boot or pid namespace"})
