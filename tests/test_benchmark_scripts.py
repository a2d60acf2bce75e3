"""The benchmark scripts still run against the library (smoke sizes, seconds each).

Nothing else imports them, so an API change would otherwise leave a README
command broken until someone re-records its figures. peer.py needs the bench
extra and has its own tests (test_peer_parity, test_hf_equivalence).
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = {
    "depth": (["--depths=2,4", "--emb=32", "--mlp=64", "--seq=16", "--batch=2",
               "--memory_depth=2", "--policies=none,full", "--configs="],
              ["scanned", "unrolled", "full"]),
    "moe": (["--tokens=64", "--emb=16", "--mlp=32", "--experts=4", "--group_size=16",
             "--repeats=1", "--expert_shards=2"],
            ["dropless ragged_dot, 2 expert shards (padded)", "einsum top-2, cf 1.25",
             "gather top-2, cf 1.0"]),
    "decode": (["--new_tokens=4", "--emb=32", "--layers=1", "--repeats=1"], ["cache tok/s"]),
    "gpu": (["--preset=tiny", "--steps=2", "--batch=2", "--remat_policy=full", "--unrolled",
             "--group_size=64", "--capacity_dispatch=gather", "--profile_dir={tmp}/profile"],
            ["MFU", "128, 2) (layers", "remat: full; unrolled blocks; MoE groups of 64 tokens, "
             "dispatch gather", "ms of XLA ops per step (2 step(s) traced)", "\n    matmul "]),
    "optimizer": (["--params_m=1", "--repeats=2"], ["bigjax / optax speed"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_at_smoke_size(script, tmp_path):
  args, expected = SMOKE[script]
  args = [a.format(tmp=tmp_path) for a in args]
  flags = [f for f in os.environ["XLA_FLAGS"].split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=2"]))
  env.pop("PYTHONPATH", None)  # The scripts find the repository themselves.
  done = subprocess.run([sys.executable, f"experiments/benchmarks/{script}.py", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  for text in expected:
    assert text in done.stdout, done.stdout


def test_round_order_puts_every_run_in_every_place_equally_often():
  from experiments.benchmarks import timing
  for n in (2, 3, 4):
    items = [f"run{j}" for j in range(n)]
    rounds = [timing.round_order(items, i) for i in range(2 * n)]
    assert all(sorted(r) == items for r in rounds)
    for place in range(n):
      assert sorted(r[place] for r in rounds) == sorted(items * 2), (n, place)
  assert [timing.round_order("ab", i) for i in range(4)] == [
      ["a", "b"], ["b", "a"], ["b", "a"], ["a", "b"]]


def test_equal_wall_time_reads_the_curve_at_that_time():
  pytest.importorskip("torch")
  from experiments.benchmarks import peer
  curve = [(0, 0.0, 8.0), (250, 12.0, 4.0), (500, 24.0, 3.0)]
  assert peer.at_time(curve, 24.0) == (500, 3.0)
  step, bits = peer.at_time(curve, 18.0)  # Halfway between the evaluations at 250 and 500.
  assert step == pytest.approx(375) and bits == pytest.approx(3.5)


@pytest.mark.parametrize("script, args, message", [
    ("decode", ["--repeats=0"], "--repeats=0: time at least one run"),
    ("moe", ["--tokens=100", "--group_size=64"],
     "--tokens: [100] not a positive multiple of --group_size=64"),
    ("gpu", ["--preset=tiny", "--models=gshard", "--group_size=100"],
     "config.model.moe.group_size: 100 does not divide seq_len=128"),
    ("throughput", ["--workdir=/nonexistent"], "/nonexistent/metrics.jsonl does not exist"),
])
def test_bad_flags_stop_in_one_line_before_any_run(script, args, message):
  done = subprocess.run([sys.executable, f"experiments/benchmarks/{script}.py", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr[-2000:]
  assert message in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]


def test_gpu_suite_writes_its_logs_under_a_relative_logdir(tmp_path):
  # The suite changes to the repository root: a relative LOGDIR must still be the caller's.
  done = subprocess.run(["bash", os.path.join(ROOT, "experiments/benchmarks/gpu_suite.sh"),
                         "logs"], cwd=tmp_path, env=dict(os.environ, PYTHON="/bin/true"),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and "No such file" not in done.stderr, done.stderr
  assert len(os.listdir(tmp_path / "logs")) == 9  # 8 steps' logs and the summary.


def test_gpu_suite_cuts_its_commands_to_its_budget(tmp_path):
  # A command's limit is cut to what is left; one with under 30 s left is not started.
  slow = tmp_path / "slow_python"
  slow.write_text("#!/bin/sh\nsleep 100\n")
  slow.chmod(0o755)
  logs = tmp_path / "logs"
  subprocess.run(["bash", os.path.join(ROOT, "experiments/benchmarks/gpu_suite.sh"), str(logs)],
                 env=dict(os.environ, PYTHON=str(slow), SUITE_SECONDS="30"),
                 capture_output=True, text=True, timeout=120)
  summary = (logs / "summary.txt").read_text()
  assert "(exit 124, cut at 30 s)" in summary, summary
  assert summary.count("left out (suite budget of 30 s spent)") == 7, summary
