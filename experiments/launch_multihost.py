r"""Runs one bigjax training job as several JAX processes.

On one machine (CPU, or to rehearse a multi-host job), N local processes with D
simulated CPU devices each, coordinated over 127.0.0.1 on a free port:

  python experiments/launch_multihost.py --num_processes=2 --devices_per_process=4 -- \
      --config=configs/lm.py:runlocal --workdir=/tmp/lm_2proc

Everything after `--` goes to `python -m bigjax.main` unchanged. Each process gets
BIGJAX_COORDINATOR=127.0.0.1:PORT, BIGJAX_NUM_PROCESSES=N, BIGJAX_PROCESS_ID=i, and
`bigjax.train.run` calls jax.distributed.initialize from them (bigjax/distributed.py).
Only process 0 writes metrics.jsonl, config.json and TensorBoard files; every process
writes its shards of each checkpoint (orbax), so WORKDIR must be one shared directory.
The global batch is the same whatever the process count (the data pipeline is
step-indexed), so a 2×4-device job follows the 1×8-device run's losses.

On a Cloud TPU VM slice (one process per host, devices detected by JAX), run the same
command on every worker with `--auto`, which sets BIGJAX_DISTRIBUTED=auto so that
plain `jax.distributed.initialize()` finds the slice by itself:

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd bigjax && \
      python experiments/launch_multihost.py --auto -- \
      --config=configs/lm.py --workdir=gs://BUCKET/lm \
      --config.mesh.data=1 --config.mesh.fsdp=-1"

(equivalently: `BIGJAX_DISTRIBUTED=auto python -m bigjax.main ...` on every worker).
On hosts you address yourself, set the three BIGJAX_* variables per host instead,
with the coordinator at process 0's address.

Signals: SIGTERM or SIGINT (Ctrl-C) to the launcher is forwarded to every process
as SIGTERM; under jax.distributed they all stop at the same step, save a checkpoint
and exit 0, and so does the launcher. The processes ignore SIGINT themselves, so a
Ctrl-C that the terminal sends to the whole process group stops them the same way.
If any process fails, the others are stopped and the launcher exits with the failing
process's code. Rerunning the same command resumes. (With --auto the launcher
becomes bigjax.main itself: send it SIGTERM, as a Ctrl-C stops it without saving.)
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A TCP port that was free a moment ago (the coordinator binds it soon after)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(base: dict, *, process_id: int, num_processes: int, coordinator: str,
              devices_per_process: int | None) -> dict:
  env = dict(base)
  env.update(BIGJAX_COORDINATOR=coordinator, BIGJAX_NUM_PROCESSES=str(num_processes),
             BIGJAX_PROCESS_ID=str(process_id))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  if devices_per_process:  # Simulated CPU devices: one machine rehearsing a pod.
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _stop(procs, sig, grace: float):
  for p in procs:
    if p.poll() is None:
      p.send_signal(sig)
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _ignore_sigint():
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def launch(main_args: list[str], *, num_processes: int, devices_per_process: int | None,
           port: int | None = None, python: str = sys.executable) -> int:
  """Spawns the processes, forwards SIGTERM/SIGINT as SIGTERM, returns the job's exit
  code."""
  coordinator = f"127.0.0.1:{port or free_port()}"
  cmd = [python, "-m", "bigjax.main", *main_args]
  procs, stopping = [], []

  def forward(signum, frame):
    # Always SIGTERM: it is what bigjax.train (through JAX's preemption sync) turns
    # into "save a checkpoint at the same step on every process and exit 0"; a
    # SIGINT would raise KeyboardInterrupt mid-step and save nothing.
    stopping.append(signum)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  # The processes start with SIGINT ignored (set between fork and exec; an ignored
  # signal stays ignored across exec, and Python then installs no KeyboardInterrupt
  # handler): a terminal's Ctrl-C goes to the whole process group, and only the
  # launcher should act on it. They stay in the launcher's process group, so killing
  # the group, closing the terminal or Ctrl-Z still reaches them.
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    for i in range(num_processes):
      if stopping:  # A signal came while the processes were starting: start no more.
        break
      procs.append(subprocess.Popen(cmd, env=child_env(
          os.environ, process_id=i, num_processes=num_processes, coordinator=coordinator,
          devices_per_process=devices_per_process), preexec_fn=_ignore_sigint))
      if stopping:  # Forwarded while Popen ran, before this process was in `procs`.
        procs[-1].send_signal(signal.SIGTERM)
    while True:
      codes = [p.poll() for p in procs]
      if stopping and all(c in (0, -signal.SIGTERM) for c in codes):
        # Stopped as asked: each saved and exited 0, or (still starting up, without
        # a handler yet) died of the SIGTERM.
        whole_job_saved = len(procs) == num_processes and all(c == 0 for c in codes)
        return 0 if whole_job_saved else 128 + stopping[0]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        # One process died: the others would wait for it in a collective.
        _stop(procs, signal.SIGTERM, grace=10.0)
        print(f"launch_multihost: a process exited with code {failed[0]}; stopped the "
              "others.", file=sys.stderr, flush=True)
        return failed[0] if failed[0] > 0 else 128 - failed[0]
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.1)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _stop(procs, signal.SIGKILL, grace=1.0)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    split = argv.index("--")
    own, main_args = argv[:split], argv[split + 1:]
  else:
    own, main_args = argv, []
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="Simulated CPU devices per process (sets XLA_FLAGS and "
                           "JAX_PLATFORMS=cpu); leave unset on real accelerators.")
  parser.add_argument("--port", type=int, default=None, help="Coordinator port (default: free).")
  parser.add_argument("--auto", action="store_true",
                      help="Run one process here with BIGJAX_DISTRIBUTED=auto (TPU VM slices: "
                           "run on every worker).")
  args = parser.parse_args(own)
  if not main_args:
    parser.error("pass bigjax.main's flags after `--`, e.g. -- --config=configs/lm.py:runlocal "
                 "--workdir=/tmp/run")
  if args.auto:
    env = dict(os.environ, BIGJAX_DISTRIBUTED="auto")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    os.execvpe(sys.executable, [sys.executable, "-m", "bigjax.main", *main_args], env)
  if args.num_processes < 1:
    parser.error("--num_processes must be >= 1")
  return launch(main_args, num_processes=args.num_processes,
                devices_per_process=args.devices_per_process, port=args.port)


if __name__ == "__main__":
  sys.exit(main())
