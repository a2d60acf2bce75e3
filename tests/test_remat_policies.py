"""model.remat_policy: every policy gives the gradients of no remat, in both layouts."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import remat_p  # jax.checkpoint's primitive
from jax._src.ad_checkpoint import saved_residuals  # print_saved_residuals' list

from bigjax import config as config_lib, optim, steps, tasks
from bigjax.config import ConfigError
from bigjax.models import moe as moe_lib, stack, transformer
from configs import lm

BASE = dict(vocab_size=40, num_layers=2, emb_dim=32, num_heads=4, mlp_dim=64, max_len=16,
            init_scale=0.2, dropout_rate=0.1)


@functools.lru_cache  # The no-remat reference is computed once per layout.
def _grads(policy: str, scan: bool):
  cfg = transformer.TransformerConfig(**BASE, remat_policy=policy, scan_layers=scan)
  graphdef, params, rest = nnx.split(transformer.build(cfg, nnx.Rngs(0)), nnx.Param, ...)
  rng = np.random.default_rng(11)
  batch = {"inputs": jnp.asarray(rng.integers(1, 40, (2, 8)), jnp.int32),
           "targets": jnp.asarray(rng.integers(1, 40, (2, 8)), jnp.int32),
           "weights": jnp.ones((2, 8))}

  def loss(p):  # Dropout on: remat must replay the same masks.
    return steps.loss_sums(tasks.get("lm"), nnx.merge(graphdef, p, rest), batch,
                           jax.random.PRNGKey(3))["loss_sum"]

  grads = jax.jit(jax.grad(loss))(nnx.to_pure_dict(params))
  return {optim.path_name(p): np.asarray(g)
          for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("policy", [p for p in stack.REMAT_POLICIES if p != "none"])
def test_every_policy_gives_the_gradients_of_no_remat(policy, scan):
  want, got = _grads("none", scan), _grads(policy, scan)
  assert set(got) == set(want)
  for name, g in want.items():
    np.testing.assert_allclose(got[name], g, rtol=1e-5, atol=1e-6 * np.abs(g).max(),
                               err_msg=name)


def _checkpoint_policies(jaxpr) -> list:
  """The policy of every jax.checkpoint in a jaxpr, nested ones (a scan's body) too."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive is remat_p:
      found.append(eqn.params["policy"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _checkpoint_policies(inner)
  return found


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("policy", stack.REMAT_POLICIES)
def test_each_policy_wraps_every_block_in_its_checkpoint(policy, scan):
  """Equal gradients alone would hold with remat silently off: each block (the
  scanned body once) must run under jax.checkpoint with the named policy."""
  if policy == "offload_dot_with_no_batch_dims":
    pytest.skip("needs host memory (checked by its own test)")
  cfg = transformer.TransformerConfig(**BASE, remat_policy=policy, scan_layers=scan)
  graphdef, params, rest = nnx.split(transformer.build(cfg, nnx.Rngs(0)), nnx.Param, ...)
  batch = {"inputs": jnp.ones((2, 8), jnp.int32), "targets": jnp.ones((2, 8), jnp.int32),
           "weights": jnp.ones((2, 8))}
  jaxpr = jax.make_jaxpr(lambda p: steps.loss_sums(
      tasks.get("lm"), nnx.merge(graphdef, p, rest), batch, jax.random.PRNGKey(3))[
          "loss_sum"])(nnx.to_pure_dict(params))
  found = _checkpoint_policies(jaxpr.jaxpr)
  if policy == "none":
    assert found == []
    return
  want = (jax.checkpoint_policies.nothing_saveable if policy == "full"
          else getattr(jax.checkpoint_policies, policy))
  # Each policy also keeps the MoE router logits (stack._keeping_router_logits).
  assert [p.__wrapped__ for p in found] == [want] * (1 if scan else BASE["num_layers"])


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_every_policy_keeps_the_moe_router_logits(policy):
  """Recomputed from recomputed logits, routing can flip a near tie (seen in
  bfloat16: logits ~5e-4 apart), and the backward pass would then differentiate
  another routing: every policy saves the logits (moe.ROUTER_LOGITS)."""
  cfg = transformer.TransformerConfig(**BASE, remat_policy=policy, moe_every=2,
                                      moe=moe_lib.MoEConfig(num_experts=4, router="dropless"))
  graphdef, params, rest = nnx.split(transformer.build(cfg, nnx.Rngs(0)), nnx.Param, ...)
  batch = {"inputs": jnp.ones((2, 8), jnp.int32), "targets": jnp.ones((2, 8), jnp.int32),
           "weights": jnp.ones((2, 8))}
  saved = saved_residuals(lambda p: steps.loss_sums(
      tasks.get("lm"), nnx.merge(graphdef, p, rest), batch, jax.random.PRNGKey(3))[
          "loss_sum"], nnx.to_pure_dict(params))
  assert [where for _, where in saved if f"named '{moe_lib.ROUTER_LOGITS}'" in where]


@pytest.mark.parametrize("policy", [p for p in stack.REMAT_POLICIES
                                    if p != "offload_dot_with_no_batch_dims"])
def test_two_models_of_one_config_share_a_graphdef(policy):
  """The policy is static model state: a new function per model would make jitted
  loops that take the graphdef as a static argument (decoding's) compile again."""
  cfg = transformer.TransformerConfig(**BASE, remat_policy=policy)
  first, second = (nnx.split(transformer.build(cfg, nnx.Rngs(0)))[0] for _ in range(2))
  assert first == second and hash(first) == hash(second)


def test_remat_policy_is_validated():
  config = lm.get_config("runlocal")
  config.model.remat_policy = "dots"
  with pytest.raises(ConfigError, match=r"config.model.remat_policy: unknown policy 'dots'"):
    config_lib.validate(config, num_devices=1)
  with pytest.raises(ValueError, match=r"model.remat_policy='dots'; choose one of"):
    stack.remat_policy("dots")
