"""jax.lax.ragged_dot's grouped matmul on Hopper GPUs (compute capability 9.0), by
the Pallas Mosaic GPU kernels that JAX ships (jax.experimental.pallas.ops.gpu),
with its gradient.

Why: XLA:GPU computes jax.lax.ragged_dot (JAX 0.11) as if densely, every expert
over every row: on an H200 the 8-expert MoE layer at 65k tokens took 7.8x the time
of the dense MLP of the same active FLOPs and 41 GiB (float32,
experiments/benchmarks/moe.py). These kernels read each expert's rows only.
model.moe.dropless_impl='hopper' picks them. Checked on an H200 only: the dropless
layer with them matched ragged_dot's output and gradients at 512 rows; a 300-row
call failed there (the kernels' bulk copies move whole tiles of rows), hence the
padding below, which has not yet run on a GPU. Their speed is not measured (in
experiments/benchmarks/gpu.py's 1B dropless model they did not finish compiling
and running in the time a run had left), so 'auto' does not pick them.

ragged_dot(rows [R, K], weights [G, K, N], sizes [G]) -> [R, N]: rows are grouped
by expert, the first sizes[0] use weights[0], and so on; rows past sum(sizes) are
padding and come out zero (the kernel leaves them unwritten: they are masked).
The gradient: rows' by the same kernel over the transposed weights, the weights'
by the transposed kernel (per expert, rows^T @ cotangent), both in the inputs'
dtype with float32 accumulation inside the kernel.
"""
import jax
import jax.numpy as jnp

from bigjax.errors import ConfigError

# The kernels' tiles: feature dims must be multiples of TILE; rows are padded to it.
TILE = 128
_FORWARD = dict(block_m=TILE, block_n=TILE, block_k=64, max_concurrent_steps=4,
                grid_block_n=1)
_TRANSPOSED = dict(block_m=TILE, block_n=TILE, block_k=64, max_concurrent_steps=4,
                   grid_block_n=1)
DTYPES = (jnp.bfloat16, jnp.float16)


def unmet_needs(capability, dtype, dims) -> list[str]:
  """What these kernels need and the call lacks: an NVIDIA Hopper GPU (capability
  (9, 0), from layers.cuda_capability), 16-bit inputs, feature dims (the model's
  emb_dim and the expert mlp_dim) that are multiples of TILE."""
  needs = {"an NVIDIA Hopper GPU (compute capability 9.0)": capability == (9, 0),
           "model.dtype bfloat16 or float16": jnp.dtype(dtype) in DTYPES,
           f"model.emb_dim and model.mlp_dim multiples of {TILE}":
               all(d % TILE == 0 for d in dims)}
  return [need for need, ok in needs.items() if not ok]


def _kernels():
  # Imported on first use: the Mosaic GPU modules load CUDA-only lowering rules.
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
  return ragged_dot_mgpu.ragged_dot, transposed_ragged_dot_mgpu.transposed_ragged_dot


def _valid(rows, sizes):
  """[R, 1] mask of the rows that belong to a group (the rest are padding)."""
  return (jnp.arange(rows.shape[0]) < jnp.sum(sizes))[:, None]


def _forward(rows, weights, sizes, transpose_weights=False):
  ragged, _ = _kernels()
  out = ragged(rows, weights, group_sizes=sizes.astype(jnp.int32),
               transpose_rhs=transpose_weights, **_FORWARD)
  return jnp.where(_valid(rows, sizes), out, 0)


def ragged_dot(rows, weights, sizes):
  """rows [R, K] @ weights[g] [K, N] for each group g of rows, in the weights' dtype
  (the kernels take one dtype: rows are cast to it). The kernels' bulk copies move
  whole tiles of rows (300 rows failed on an H200): rows are padded to a multiple
  of TILE, and the padding sliced off."""
  dims = (weights.shape[1], weights.shape[2])
  if any(d % TILE for d in dims):  # Per device: expert parallelism may split the hidden dim.
    raise ConfigError(f"config.model.moe.dropless_impl='hopper': the expert matmul's feature dims "
                     f"{dims} (per device) must be multiples of {TILE}; choose emb_dim, "
                     "mlp_dim and the mesh so they are, or use 'auto'.")
  padded = jnp.pad(rows.astype(weights.dtype), ((0, -rows.shape[0] % TILE), (0, 0)))
  return _ragged_dot(padded, weights, sizes)[:rows.shape[0]]


@jax.custom_vjp
def _ragged_dot(rows, weights, sizes):
  return _forward(rows, weights, sizes)


def _fwd(rows, weights, sizes):
  return _forward(rows, weights, sizes), (rows, weights, sizes)


def _bwd(saved, cotangent):
  rows, weights, sizes = saved
  _, transposed = _kernels()
  valid = _valid(rows, sizes)
  # Zero padding rows: the transposed kernel masks a group's edge rows by
  # multiplying with 0, which would keep a NaN from uninitialised padding.
  cotangent = jnp.where(valid, cotangent, 0)
  d_rows = _forward(cotangent, weights, sizes, transpose_weights=True)
  d_weights = transposed(jnp.where(valid, rows, 0), cotangent,
                         group_sizes=sizes.astype(jnp.int32), **_TRANSPOSED)
  return d_rows, d_weights.astype(weights.dtype), None


_ragged_dot.defvjp(_fwd, _bwd)
