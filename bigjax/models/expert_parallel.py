"""Expert-parallel dropless MoE: tokens travel to the shard that holds their expert.

Inside `jax.shard_map` over the mesh, each shard holds the tokens of its slice of
the batch and E/n experts (n = size of the expert mesh axes). Per shard:

  1. its token-choices (token, expert) are sorted by expert, hence by the shard
     that owns the expert (experts are split over shards in contiguous runs);
  2. an exchange over the expert axes sends each run to its owner, which also
     learns how many rows of each of its experts came from each source;
  3. the owner sorts what it received by local expert and runs the grouped FFN
     (`ragged_dot` or sorted blocks) on its own experts only;
  4. the reverse exchange returns the results, which are weighted by their gates
     and summed per token at home.

The buffer a shard receives holds n slots of `cap = t * min(k, E/n)` rows (t
local tokens): all of a source's choices may pick experts of one shard, and a
token picks distinct experts, so nothing is ever dropped. Two exchanges fill it:
  - "ragged": `jax.lax.ragged_all_to_all` sends only the real rows (GPU, TPU);
  - "padded": `jax.lax.all_to_all` of the fixed-size slots, padding included,
    because ragged_all_to_all is unimplemented on CPU. Worst-case sizing makes
    it move n * cap rows where t * k are real: n times the traffic when k <= E/n.
The routing (logits, top-k, losses) is per token and stays outside, so its
metrics are exactly those of the one-device layer; only its top-k runs per shard
(`token_top_k`).
"""
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from bigjax import sharding
from bigjax.errors import ConfigError
from bigjax.models import row_gather

EXCHANGES = ("auto", "ragged", "padded")


def exchange_kind(setting: str, platform: str) -> str:
  """'ragged' or 'padded' for `model.moe.dropless_exchange` on this platform."""
  if setting not in EXCHANGES:
    raise ValueError(f"model.moe.dropless_exchange={setting!r}; choose one of "
                     f"{EXCHANGES}.")
  if setting == "auto":
    return "padded" if platform == "cpu" else "ragged"
  if setting == "ragged" and platform == "cpu":
    raise ConfigError("config.model.moe.dropless_exchange='ragged': "
                     "jax.lax.ragged_all_to_all is unimplemented on CPU; use 'auto' or "
                     "'padded'.")
  return setting


class Layout(NamedTuple):
  """Where tokens and expert weights live on the mesh, for one MoE layer."""
  mesh: jax.sharding.Mesh
  token_spec: PartitionSpec  # of x [B, L, M] (and of the choices [B, L, k])
  expert_axes: tuple  # mesh axes splitting the experts (size > 1)
  hidden_axes: tuple  # mesh axes splitting the FFN hidden dim inside each expert
  exchange: str | None  # "ragged" or "padded"; None on the capacity path (GSPMD's)


def _axes(entry) -> tuple:
  """The mesh axes of one PartitionSpec entry."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple):
  """One PartitionSpec entry for mesh axes (the inverse of _axes)."""
  return None if not axes else axes[0] if len(axes) == 1 else axes


def layout(token_shape, token_names, expert_weight_names, setting: str | None, *,
           tokens_must_split: bool = True) -> Layout | None:
  """The expert-parallel layout under the mesh and rules in force, or None when no
  mesh is in force or the experts are not split (the one-device path then runs).
  With tokens_must_split=False, also None (rather than an error) when the tokens
  are not split over the expert axes or their second dimension is split at all:
  the capacity path then leaves the exchange to GSPMD.

  token_shape, token_names: shape and logical names of x [B, L, M];
  setting: model.moe.dropless_exchange, or None for the capacity path, which
  exchanges its fixed-size expert slots with its own all-to-all;
  expert_weight_names: those of wi
  [E, M, H]. The embedding dims stay whole inside the map (weights split over it,
  as by fsdp, are gathered on entry); the hidden dim keeps its split where it is
  not taken by the tokens, and partial outputs are summed over it."""
  active = sharding.active_mesh_rules()
  if active is None:
    return None
  mesh, rules = active
  split = lambda axes: tuple(a for a in axes if mesh.shape[a] > 1)
  weight_spec = sharding.logical_to_spec(expert_weight_names, rules, mesh.axis_names)
  expert_axes = split(_axes(weight_spec[0]))
  if not expert_axes:
    return None
  token_spec = sharding.logical_to_spec(tuple(token_names[:-1]) + (None,), rules,
                                        mesh.axis_names)
  token_axes = {a for entry in token_spec for a in _axes(entry)}
  if not tokens_must_split and (not set(expert_axes) <= token_axes or _axes(token_spec[1])):
    return None
  if not set(expert_axes) <= token_axes:  # Raised while tracing: one 'Invalid config' line.
    raise ConfigError(
        f"config.sharding_rules: the experts are split over {expert_axes} but the tokens "
        f"{tuple(token_names)} are not (spec {token_spec}); add {expert_axes} to the "
        f"rule for {token_names[0]!r}, or each expert shard would process every token.")
  for dim, what in ((0, "batch"), (1, "sequence")):
    shards = math.prod(mesh.shape[a] for a in _axes(token_spec[dim]))
    if token_shape[dim] % shards:
      raise ConfigError(f"expert-parallel MoE: a {what} of {token_shape[dim]} does not split "
                       f"over the {shards} shards of mesh axes {token_spec[dim]}; use a "
                       f"config.batch_size (per microbatch) or seq_len divisible by {shards}.")
  hidden_axes = split(tuple(a for a in _axes(weight_spec[2])
                            if a not in token_axes and a not in expert_axes))
  platform = mesh.devices.flat[0].platform
  return Layout(mesh, token_spec, expert_axes, hidden_axes,
                None if setting is None else exchange_kind(setting, platform))


def token_top_k(layout: Layout) -> Callable:
  """jax.lax.top_k over the last axis of per-token values [T, E], per token shard
  (sharding.top_k_per_shard)."""
  tokens = PartitionSpec(_entry(_axes(layout.token_spec[0]) + _axes(layout.token_spec[1])))
  return lambda values, k: sharding.top_k_per_shard(values, k, layout.mesh, tokens)


class _Plan(NamedTuple):
  """Sizes and offsets of one shard's exchange (all int32)."""
  send: jax.Array  # [n] rows sent to each expert shard
  start: jax.Array  # [n] where each shard's run starts in the sorted rows
  recv: jax.Array  # [n, E/n] rows received from each source, per local expert
  cap: int  # rows per slot of the receive buffer


def _send_to_experts(xs, plan: _Plan, axes, exchange: str):
  """Sorted rows [t*k, M] -> receive buffer [n, cap, M], slot i from source i."""
  n, m = plan.send.shape[0], xs.shape[-1]
  if exchange == "ragged":
    me = jax.lax.axis_index(axes)
    out = jax.lax.ragged_all_to_all(
        xs, jnp.zeros((n * plan.cap, m), xs.dtype), plan.start, plan.send,
        jnp.full((n,), me * plan.cap, jnp.int32), jnp.sum(plan.recv, axis=1),
        axis_name=axes)
    return out.reshape(n, plan.cap, m)
  slot = jnp.arange(plan.cap)
  rows = jnp.minimum(plan.start[:, None] + slot, xs.shape[0] - 1)
  buf = jnp.where((slot < plan.send[:, None])[..., None], xs[rows], 0)  # [n, cap, M]
  return jax.lax.all_to_all(buf, axes, 0, 0, tiled=True)


def _return_to_homes(ys, plan: _Plan, axes, exchange: str, rows: int):
  """Results in the receive layout [n, cap, M] -> the sender's sorted rows [rows, M]."""
  n, m = plan.send.shape[0], ys.shape[-1]
  if exchange == "ragged":
    # Where this shard's run starts at each home, in the home's sorted rows.
    start_at_home = jax.lax.all_to_all(plan.start, axes, 0, 0, tiled=True)
    return jax.lax.ragged_all_to_all(
        ys.reshape(n * plan.cap, m), jnp.zeros((rows, m), ys.dtype),
        jnp.arange(n, dtype=jnp.int32) * plan.cap, jnp.sum(plan.recv, axis=1),
        start_at_home, plan.send, axis_name=axes)
  back = jax.lax.all_to_all(ys, axes, 0, 0, tiled=True)  # slot j from expert shard j
  r = jnp.arange(rows)
  shard = jnp.searchsorted(jnp.cumsum(plan.send), r, side="right")
  shard = jnp.minimum(shard, n - 1)
  return back.reshape(n * plan.cap, m)[shard * plan.cap + r - plan.start[shard]]


def _local(x, experts, gates, weights, *, ffn, num_experts, block, layout: Layout):
  """One shard's part: x [b, l, M], experts/gates [b, l, k] -> y [b, l, M]."""
  b, length, m = x.shape
  k = experts.shape[-1]
  axes = layout.expert_axes
  n = math.prod(layout.mesh.shape[a] for a in axes)
  local_experts = num_experts // n
  t = b * length
  eo = row_gather.expert_order(experts.reshape(t, k), num_experts)
  xs = row_gather.to_experts(x.reshape(t, m), eo)  # [t*k, M], grouped by expert
  sizes = eo.sizes.reshape(n, local_experts)  # [destination shard, its local expert]
  send = jnp.sum(sizes, axis=1)
  plan = _Plan(send, jnp.cumsum(send) - send,
               jax.lax.all_to_all(sizes, axes, 0, 0, tiled=True),
               cap=t * min(k, local_experts))
  received = _send_to_experts(xs, plan, axes, layout.exchange)  # [n, cap, M]
  # Local expert of each received row (local_experts for the padding after a
  # source's rows), then rows grouped by local expert, padding last.
  ends = jnp.cumsum(plan.recv, axis=1)  # [n, E/n]
  slot = jnp.arange(plan.cap)
  row_expert = jnp.sum(slot[None, :, None] >= ends[:, None, :], axis=-1).reshape(-1)
  by_expert = row_gather.expert_order(row_expert[:, None], local_experts + 1, block)
  rows = row_gather.to_experts(received.reshape(n * plan.cap, m), by_expert)
  out = ffn(rows, by_expert.lengths[:local_experts], weights)  # padding rows: never read
  if layout.hidden_axes:
    out = jax.lax.psum(out, layout.hidden_axes)
  out = row_gather.from_rows(out, by_expert)
  ys = _return_to_homes(out.reshape(n, plan.cap, -1), plan, axes, layout.exchange, t * k)
  return row_gather.from_experts(ys, gates.reshape(t, k), eo).reshape(b, length, m)


def dropless(x, experts, gates, weights: dict, ffn: Callable, *, num_experts: int,
             block: int, layout: Layout):
  """Expert-parallel dropless FFN. x [B, L, M]; experts (int) and gates [B, L, k];
  weights: {'wi': [E, M, H], 'wo': [E, H, M], optional 'wi_gate'} already in the
  compute dtype; ffn(rows, lengths, local_weights) -> rows out, the one-device
  grouped FFN over segments of `lengths` rows (multiples of `block`) from row 0 on
  (the rows past them are padding)."""
  mesh, tokens = layout.mesh, layout.token_spec
  n = math.prod(mesh.shape[a] for a in layout.expert_axes)
  if num_experts % n:
    raise ValueError(f"model.moe.num_experts={num_experts} does not split over the "
                     f"{n} expert shards of mesh axes {layout.expert_axes}.")
  expert_dim, hidden = _entry(layout.expert_axes), _entry(layout.hidden_axes)
  weight_specs = {name: (PartitionSpec(expert_dim, hidden, None) if name == "wo"
                         else PartitionSpec(expert_dim, None, hidden)) for name in weights}

  def local(x, experts, gates, weights):
    return _local(x, experts, gates, weights, ffn=ffn, num_experts=num_experts,
                  block=block, layout=layout)

  return jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, weight_specs),
                       out_specs=tokens)(x, experts, gates, weights)


def capacity(xe, weights: dict, ffn: Callable, *, layout: Layout):
  """GShard's exchange for capacity routing. xe [E, G, C, M]: every expert's
  capacity slots of each group, the groups split over the token shards. One
  all-to-all over the expert axes gives each shard its E/n experts' slots of the
  groups of its n peers, [E/n, n*G_local, C, M]; `ffn(xe, weights)` runs them; the
  reverse all-to-all returns [E, G_local, C, M]. Capacity makes the buffers fixed
  in size, so nothing is padded beyond what routing already did."""
  mesh, axes = layout.mesh, layout.expert_axes
  n = math.prod(mesh.shape[a] for a in axes)
  if xe.shape[0] % n:
    raise ValueError(f"model.moe.num_experts={xe.shape[0]} does not split over the "
                     f"{n} expert shards of mesh axes {axes}.")
  groups = PartitionSpec(None, layout.token_spec[0], None, None)
  expert_dim, hidden = _entry(axes), _entry(layout.hidden_axes)
  weight_specs = {name: (PartitionSpec(expert_dim, hidden, None) if name == "wo"
                         else PartitionSpec(expert_dim, None, hidden)) for name in weights}

  def local(xe, weights):
    xe = jax.lax.all_to_all(xe, axes, 0, 1, tiled=True)  # groups -> experts
    ye = ffn(xe, weights)
    if layout.hidden_axes:
      ye = jax.lax.psum(ye, layout.hidden_axes)
    return jax.lax.all_to_all(ye, axes, 1, 0, tiled=True)  # experts -> groups

  return jax.shard_map(local, mesh=mesh, in_specs=(groups, weight_specs),
                       out_specs=groups)(xe, weights)
