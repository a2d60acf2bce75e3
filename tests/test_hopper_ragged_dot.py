"""hopper_ragged_dot (model.moe.dropless_impl='hopper'): its output and the gradients
of rows and weights equal jax.lax.ragged_dot's, padding rows and empty groups
included.

Off a Hopper GPU the Pallas kernels cannot run: the first test swaps in stand-ins
that compute what the kernels compute (and, as the real forward kernel does, leave
padding rows unwritten: NaN here), so the wrapper's gradient wiring and masking are
checked on every machine. The tests after it run the real kernels on an H100/H200:
`JAX_PLATFORMS=cuda pytest tests/test_hopper_ragged_dot.py` (the suite's conftest
otherwise picks the CPU).
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import hopper_ragged_dot, layers, moe

ROWS, K, N, SIZES = 300, 128, 256, (70, 0, 130, 60)  # 40 padding rows, an empty group.


def _inputs(dtype):
  rng = np.random.default_rng(0)
  rows = jnp.asarray(rng.normal(size=(ROWS, K)), dtype)
  weights = jnp.asarray(rng.normal(size=(len(SIZES), K, N)) / np.sqrt(K), dtype)
  upstream = jnp.asarray(rng.normal(size=(ROWS, N)), jnp.float32)
  return rows, weights, jnp.asarray(SIZES, jnp.int32), upstream


def _value_and_grads(fn, rows, weights, sizes, upstream):
  def loss(rows, weights):
    out = fn(rows, weights, sizes)
    return jnp.sum(out.astype(jnp.float32) * upstream), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      rows, weights)
  return [np.asarray(a, np.float32) for a in (out, *grads)]


def _reference(rows, weights, sizes, upstream):
  """jax.lax.ragged_dot in float32; its padding rows come out zero."""
  return _value_and_grads(jax.lax.ragged_dot, rows.astype(jnp.float32),
                          weights.astype(jnp.float32), sizes, upstream)


def _whole_tiles(rows):
  if rows.shape[0] % hopper_ragged_dot.TILE:  # As the real kernels' bulk copies need.
    raise ValueError(f"{rows.shape[0]} rows: not whole tiles")


def _stand_in_kernels():
  def forward(lhs, rhs, *, group_sizes, transpose_rhs=False, **tiles):
    _whole_tiles(lhs)
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    valid = (jnp.arange(lhs.shape[0]) < jnp.sum(group_sizes))[:, None]
    return jnp.where(valid, out, jnp.nan).astype(lhs.dtype)  # Unwritten: garbage.

  def transposed(lhs, rhs, *, group_sizes, block_k, **tiles):
    # As the real kernel: each group's rows are read in whole blocks of block_k
    # rows, the neighbours' rows in them zeroed by multiplying with 0 (so a NaN in
    # a padding row would spread), the other operand's rows not masked at all.
    _whole_tiles(lhs)
    row = jnp.arange(lhs.shape[0])[:, None]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    out = []
    for g in range(group_sizes.shape[0]):
      lo, hi = starts[g] // block_k * block_k, -(-ends[g] // block_k) * block_k
      read = (row >= lo) & (row < hi)
      mine = ((row >= starts[g]) & (row < ends[g])).astype(lhs.dtype)
      out.append(jnp.where(read, lhs * mine, 0).astype(jnp.float32).T @
                 jnp.where(read, rhs, 0).astype(jnp.float32))
    return jnp.stack(out).astype(lhs.dtype)
  return lambda: (forward, transposed)


def test_wrapper_gradients_equal_ragged_dot_with_stand_in_kernels(monkeypatch):
  monkeypatch.setattr(hopper_ragged_dot, "_kernels", _stand_in_kernels())
  rows, weights, sizes, upstream = _inputs(jnp.float32)
  # Garbage (NaN) in the padding rows, as uninitialised buffers may hold: it must
  # not reach the output or any gradient. The reference reads zeros there.
  garbage = rows.at[sum(SIZES):].set(jnp.nan)
  ours = _value_and_grads(hopper_ragged_dot.ragged_dot, garbage, weights, sizes, upstream)
  theirs = _reference(rows.at[sum(SIZES):].set(0), weights, sizes, upstream)
  for name, a, b in zip(("output", "d_rows", "d_weights"), ours, theirs):
    assert np.isfinite(a).all(), name  # The padding rows' garbage is masked.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)
  assert not ours[0][sum(SIZES):].any()
  assert not ours[2][1].any()  # The empty group's weights get no gradient.


def test_dropless_impl_auto_picks_what_the_device_runs_best():
  # tests/test_moe_layer.py checks that the layer runs what it picks on the CPU.
  cpu, tpu = (types.SimpleNamespace(platform=p) for p in ("cpu", "tpu"))
  h100, a100 = (types.SimpleNamespace(platform="gpu", compute_capability=c,
                                      client=types.SimpleNamespace(platform_version="cuda 12"))
                for c in ("9.0", "8.0"))
  bf16, dims = jnp.bfloat16, (256, 512)
  cases = [("auto", cpu, bf16, dims, "sorted_blocks"), ("auto", h100, bf16, dims, "sorted_blocks"),
           ("auto", a100, bf16, dims, "sorted_blocks"), ("auto", tpu, bf16, dims, "ragged_dot"),
           ("ragged_dot", cpu, bf16, dims, "ragged_dot"), ("hopper", h100, bf16, dims, "hopper")]
  for setting, device, dtype, shape, want in cases:
    assert moe.dropless_impl_for(setting, device, dtype, shape) == want, (setting, device)
  for device, dtype, shape, named in ((cpu, bf16, dims, "Hopper GPU"),
                                      (a100, bf16, dims, "Hopper GPU"),
                                      (h100, jnp.float32, dims, "bfloat16 or float16"),
                                      (h100, bf16, (256, 200), "multiples of 128")):
    with pytest.raises(ValueError, match=r"model\.moe\.dropless_impl='hopper' needs .*" + named):
      moe.dropless_impl_for("hopper", device, dtype, shape)


_HOPPER = layers.cuda_capability(layers.default_device()) == (9, 0)
needs_hopper = pytest.mark.skipif(not _HOPPER, reason="the Pallas Mosaic GPU kernels need "
                                  "an H100/H200; the stand-in test checks the wrapper")


@needs_hopper
def test_kernels_equal_ragged_dot_on_a_hopper_gpu():
  inputs = _inputs(jnp.bfloat16)
  ours, theirs = _value_and_grads(hopper_ragged_dot.ragged_dot, *inputs[:3], inputs[3]), \
      _reference(*inputs)
  for name, a, b in zip(("output", "d_rows", "d_weights"), ours, theirs):
    assert np.isfinite(a).all(), name
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(b).max(), err_msg=name)
  assert not ours[0][sum(SIZES):].any()


@needs_hopper
def test_dropless_layer_with_hopper_kernels_equals_ragged_dot_on_a_hopper_gpu():
  cfg = layers.LayerConfig(emb_dim=128, num_heads=1, num_kv_heads=1, head_dim=128,
                           mlp_dim=256, mlp_activation="gelu", dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 128))
  results = {}
  for impl in ("hopper", "ragged_dot"):
    layer = moe.MoEFeedForward(cfg, moe.MoEConfig(num_experts=8, group_size=64,
                                                  router="dropless", top_k=2,
                                                  dropless_impl=impl), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(p, x):
      y = nnx.merge(graphdef, p, rest)(x)
      return jnp.sum(jnp.square(y.astype(jnp.float32))), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
    results[impl] = [np.asarray(a, np.float32) for a in (y, *jax.tree.leaves(grads))]
  for a, b in zip(results["hopper"], results["ragged_dot"]):
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2 * np.abs(b).max())
