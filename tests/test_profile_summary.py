"""bigjax/profile_summary.py: XLA ops' time from a real jax.profiler trace, by kind."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import profile_summary

SCAN_LENGTH, STEPS = 4, 3


def _scanned_grad():
  """The gradient of a 4-step scan of tanh(c @ w): 3 matmuls an iteration (the forward
  product, and the backward pass's two), so 12 matmul executions a call."""
  def f(x, w):
    def body(c, _):
      return jnp.tanh(c @ w), None
    return jax.lax.scan(body, x, None, length=SCAN_LENGTH)[0].sum()
  return jax.jit(jax.grad(f, argnums=1)), jnp.ones((128, 256)), jnp.full((256, 256), 0.01)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
  step, x, w = _scanned_grad()
  infos = profile_summary.describe_ops(step.lower(x, w).compile().as_text())
  step(x, w).block_until_ready()
  trace_dir = str(tmp_path_factory.mktemp("trace"))
  jax.profiler.start_trace(trace_dir)
  for _ in range(STEPS):
    step(x, w).block_until_ready()
  jax.profiler.stop_trace()
  return trace_dir, infos


def test_every_matmul_execution_is_counted_once_and_named_from_the_compiled_module(traced):
  trace_dir, infos = traced
  kinds = {name: info.kind for name, info in infos.items()}
  ops = [op for op in profile_summary.op_times(profile_summary.newest_trace(trace_dir))
         if op.module == "jit_f"]
  assert ops and all(op.name in kinds for op in ops), [op.name for op in ops]
  matmuls = [op for op in ops if kinds[op.name] == "matmul"]
  assert sum(op.count for op in matmuls) == STEPS * SCAN_LENGTH * 3
  # Each names the JAX operation it came from: the scan body's (a fusion, its root's).
  sources = {infos[op.name].source for op in matmuls}
  assert all("/while/body/eval_jaxpr/" in s for s in sources), sources
  assert {"jvp()/while/body/eval_jaxpr/dot_general",
          "transpose(jvp())/while/body/eval_jaxpr/dot_general"} <= sources, sources
  # The while loops' own events enclose their bodies' ops, which keep the time: the
  # loops' self time is their overhead, a small part.
  loops = sum(op.self_ns for op in ops if kinds[op.name] == "control")
  assert 0 <= loops < 0.1 * sum(op.self_ns for op in ops)


def test_the_summary_gives_time_per_step_by_kind_and_the_longest_ops(traced, capsys):
  trace_dir, infos = traced
  ops = profile_summary.op_times(profile_summary.newest_trace(trace_dir))
  text = profile_summary.summary(ops, infos, steps=STEPS, top=3)
  lines = text.splitlines()
  assert lines[0].startswith("jit_f: ") and f"({STEPS} step(s) traced)" in lines[0]
  shares = [float(l.split()[-1].rstrip("%")) for l in lines[2:] if l.split()[0] in
            {"matmul", "copy/move", "elementwise/reduce", "control", "collective"}]
  assert abs(sum(shares) - 100) < 0.5, text
  assert len(lines) == 2 + len(shares) + 1 + 3
  # The command line reads the folder's newest trace; without the HLO kinds are "?".
  profile_summary.main([trace_dir, f"--steps={STEPS}", "--top=2"])
  out = capsys.readouterr().out
  assert out.startswith("jit_f: ") and "\n  ?  " in out


def test_the_named_program_is_summarized_when_another_takes_longer(tmp_path, capsys):
  """As in a multi-process job, where a program that waits for the other processes
  can outlast the train step: the train step's HLO names its ops' module."""
  def small(x):
    return jnp.tanh(x @ x)

  def big(x):
    return jnp.tanh(x @ x @ x @ x)
  small, big = jax.jit(small), jax.jit(big)
  x, y = jnp.ones((64, 64)), jnp.ones((512, 512))
  hlo = small.lower(x).compile().as_text()
  small(x).block_until_ready(), big(y).block_until_ready()
  jax.profiler.start_trace(str(tmp_path))
  small(x).block_until_ready(), big(y).block_until_ready()
  jax.profiler.stop_trace()
  ops = profile_summary.op_times(profile_summary.newest_trace(str(tmp_path)))
  name = profile_summary.module_name(hlo)
  assert name == "jit_small" and not profile_summary.summary(ops).startswith(name + ": ")
  assert profile_summary.summary(ops, module=name).startswith(name + ": ")
  assert profile_summary.summary(ops, module="jit_other").startswith(
      "No op of jit_other in the trace; its modules: ")
  (tmp_path / "small.txt").write_text(hlo)  # --hlo picks its module, and gives kinds.
  profile_summary.main([str(tmp_path), f"--hlo={tmp_path / 'small.txt'}"])
  out = capsys.readouterr().out
  assert out.startswith(name + ": ") and "\n  matmul " in out and "?" not in out, out


def test_kinds_from_a_compiled_module_with_a_collective():
  # Each device multiplies its slice of the contracted dimension; a psum adds them.
  mesh = jax.make_mesh((8,), ("data",))
  cols, rows = jax.sharding.PartitionSpec(None, "data"), jax.sharding.PartitionSpec("data")
  step = jax.jit(jax.shard_map(lambda a, b: jax.lax.psum(a @ b, "data"), mesh=mesh,
                               in_specs=(cols, rows), out_specs=jax.sharding.PartitionSpec()))
  a = jax.device_put(jnp.ones((16, 64)), jax.sharding.NamedSharding(mesh, cols))
  b = jax.device_put(jnp.ones((64, 32)), jax.sharding.NamedSharding(mesh, rows))
  text = step.lower(a, b).compile().as_text()
  kinds = {n: info.kind for n, info in profile_summary.describe_ops(text).items()}
  assert "collective" in kinds.values() and "matmul" in kinds.values(), kinds


def test_kinds_of_gpu_attention_and_gemm_custom_calls_and_nested_fusions():
  # The shapes of XLA:GPU's optimized HLO: cuDNN attention and cuBLAS as custom calls,
  # a Triton GEMM fusion whose dot sits one computation down.
  hlo = """HloModule jit_step
%inner (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
%outer (q0: bf16[8,8], q1: bf16[8,8]) -> bf16[8,8] {
  %q0 = bf16[8,8]{1,0} parameter(0)
  %q1 = bf16[8,8]{1,0} parameter(1)
  ROOT %call.1 = bf16[8,8]{1,0} call(%q0, %q1), to_apply=%inner
}
%fused_add (r0: f32[8]) -> f32[8] {
  %r0 = f32[8]{0} parameter(0)
  ROOT %add.1 = f32[8]{0} add(%r0, %r0)
}
ENTRY %main (a: bf16[8,8], b: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  %gemm_fusion_dot.3 = bf16[8,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%outer
  %custom-call.7 = (bf16[8,8]{1,0}, s8[16]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"
  %custom-call.9 = (bf16[8,8]{1,0}, u8[0]{0}) custom-call(%a, %b, %b), custom_call_target="__cudnn$fmhaSoftmax"
  %loop_add_fusion = f32[8]{0} fusion(%c), kind=kLoop, calls=%fused_add
  %all-reduce-start.2 = bf16[8,8]{1,0} all-reduce-start(%a), replica_groups={}, to_apply=%fused_add
  ROOT %copy.4 = bf16[8,8]{1,0} copy(%gemm_fusion_dot.3)
}
"""
  kinds = {n: info.kind for n, info in profile_summary.describe_ops(hlo).items()}
  assert {name: kinds[name] for name in ("gemm_fusion_dot.3", "custom-call.7", "custom-call.9",
                                         "loop_add_fusion", "all-reduce-start.2", "copy.4",
                                         "call.1", "dot.1")} == {
      "gemm_fusion_dot.3": "matmul", "custom-call.7": "matmul", "custom-call.9": "attention",
      "loop_add_fusion": "elementwise/reduce", "all-reduce-start.2": "collective",
      "copy.4": "copy/move", "call.1": "control", "dot.1": "matmul"}


def test_nested_events_keep_only_their_self_time():
  # An outer op of 100 ns holding two of 30 and 20 (one of them holding one of 5).
  events = [(0, 100, "m", "while"), (10, 30, "m", "a"), (12, 5, "m", "b"),
            (50, 20, "m", "c"), (200, 7, "m", "d")]
  times = {op: t for _, op, t in profile_summary._self_times(events)}
  np.testing.assert_equal(times, {"while": 50, "a": 25, "b": 5, "c": 20, "d": 7})


def test_a_folder_without_a_trace_says_how_to_make_one(tmp_path):
  with pytest.raises(FileNotFoundError, match="profile_steps"):
    profile_summary.newest_trace(str(tmp_path))
  with pytest.raises(SystemExit):
    profile_summary.main([str(tmp_path), "--steps=0"])
