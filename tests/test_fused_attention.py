"""model.attention_impl: when cuDNN's fused attention is chosen, and that the call
bigjax makes to it (jax.nn.dot_product_attention: layout, scale, mask, grouped
heads, causal flag) computes bigjax's own attention.

There is no GPU here: the routing test stands in for one (a fake H100 as the
device judged) and runs the same call with implementation="xla", JAX's reference
for what the cuDNN kernel computes. What only a GPU can show (the kernel's own
limits, speed) is gpu.py's to find out. On a GPU, the last test runs the kernel:
`JAX_PLATFORMS=cuda pytest tests/test_fused_attention.py` (the suite's conftest
otherwise picks the CPU).
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.models import attention, layers


def _device(platform="gpu", version="cuda 12.8", capability="9.0"):
  return types.SimpleNamespace(platform=platform, compute_capability=capability,
                               client=types.SimpleNamespace(platform_version=version))


H100, A100, V100, ROCM, CPU = (_device(), _device(capability="8.0"),
                               _device(capability="7.0"), _device(version="rocm 6.2"),
                               _device("cpu", "", ""))


def _cfg(**kw):
  args = dict(emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
              init_scale=0.3, dtype=jnp.bfloat16)
  return layers.LayerConfig(**{**args, **kw})


@pytest.mark.parametrize("setting,device,kw,dropout,lengths,want", [
    ("auto", CPU, {}, False, (16, 16), "xla"),
    ("auto", H100, {}, False, (16, 16), "cudnn"),
    ("auto", A100, {}, False, (16, 16), "cudnn"),
    ("auto", V100, {}, False, (16, 16), "xla"),
    ("auto", ROCM, {}, False, (16, 16), "xla"),
    ("auto", H100, dict(dtype=jnp.float32), False, (16, 16), "xla"),
    ("auto", H100, dict(head_dim=12), False, (16, 16), "xla"),
    ("auto", H100, dict(head_dim=256), False, (16, 16), "cudnn"),
    ("auto", A100, dict(head_dim=256), False, (16, 16), "xla"),
    ("auto", H100, {}, False, (15, 15), "xla"),
    ("auto", H100, {}, True, (16, 16), "xla"),
    ("xla", H100, {}, False, (16, 16), "xla"),
    ("cudnn", H100, dict(dtype=jnp.float16), False, (16, 16), "cudnn"),
])
def test_auto_picks_cudnn_only_where_it_applies(setting, device, kw, dropout, lengths, want):
  cfg = _cfg(attention_impl=setting, **kw)
  assert attention.attention_impl_for(cfg, device, dropout, lengths) == want


@pytest.mark.parametrize("device,kw,dropout,named", [
    (CPU, {}, False, "an NVIDIA GPU"),
    (ROCM, {}, False, "an NVIDIA GPU"),
    (H100, dict(dtype=jnp.float32), False, "bfloat16 or float16"),
    (H100, {}, True, "dropout_rate=0"),
])
def test_explicit_cudnn_where_it_cannot_run_is_an_error_naming_the_setting(
    device, kw, dropout, named):
  with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' needs .*" + named):
    attention.attention_impl_for(_cfg(attention_impl="cudnn", **kw), device, dropout, (16, 16))


def _attention_and_grads(impl, causal):
  """bigjax's Attention (bf16, grouped heads, rotary, padded keys) with
  model.attention_impl=impl: its output and gradients, jitted."""
  b, t = 2, 16
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, t, 32)), jnp.bfloat16)
  pos = jnp.asarray(np.stack([np.arange(t), np.arange(t) + 3]), jnp.int32)
  mask = attention.causal_mask(pos, pos) if causal else jnp.ones((b, 1, t, t), bool)
  mask = mask & jnp.asarray(np.arange(t) % 5 != 2)[None, None, None, :]  # Padded keys.
  mask = mask.at[..., 0].set(True)
  upstream = jnp.asarray(rng.normal(size=(b, t, 32)), jnp.float32)
  attn = attention.Attention(_cfg(attention_impl=impl), rotary_positions=True, causal=causal,
                             rngs=nnx.Rngs(0))

  @nnx.jit
  def run(module, x):
    def loss(module, x):
      y = module(x, x, mask, pos, pos)
      return jnp.sum(y.astype(jnp.float32) * upstream), y
    return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(module, x)

  (_, y), grads = run(attn, x)
  return y, grads


def _assert_same(a, b):
  (y_a, g_a), (y_b, g_b) = a, b
  np.testing.assert_allclose(np.asarray(y_a, np.float32), np.asarray(y_b, np.float32),
                             rtol=3e-2, atol=3e-2)
  for u, v in zip(*map(jax.tree.leaves, (g_a, g_b))):
    u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
    np.testing.assert_allclose(u, v, rtol=5e-2, atol=5e-2 * np.abs(v).max())


@pytest.mark.parametrize("causal", [True, False])
def test_the_fused_call_computes_bigjax_attention(causal, monkeypatch):
  calls = []
  reference = jax.nn.dot_product_attention

  def as_xla(*args, implementation=None, **kw):
    calls.append((implementation, kw["is_causal"]))
    return reference(*args, implementation="xla", **kw)

  monkeypatch.setattr(layers, "default_device", lambda: H100)
  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  monkeypatch.setattr(attention, "CAUSAL_BLOCK_ROWS", 4)  # bigjax's own: in row blocks.
  fused, own = _attention_and_grads("cudnn", causal), _attention_and_grads("xla", causal)
  assert calls == [("cudnn", causal)] * len(calls) and calls  # Only the fused run calls it.
  _assert_same(fused, own)
  # Cached decoding keeps bigjax's own attention.
  calls.clear()
  attn = attention.Attention(_cfg(attention_impl="cudnn"), rotary_positions=True, causal=True,
                             rngs=nnx.Rngs(0))
  x = jnp.zeros((2, 1, 32), jnp.bfloat16)
  pos = jnp.zeros((2, 1), jnp.int32)
  attn(x, None, jnp.ones((2, 1, 1, 16), bool), pos, cache=attn.init_cache(2, 16))
  assert not calls


_capability = layers.cuda_capability(layers.default_device())


@pytest.mark.skipif(_capability is None or _capability < (8, 0),
                    reason="cuDNN's fused attention needs an NVIDIA GPU (compute capability "
                           ">= 8.0); on CPU the test above checks the same call")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_on_a_gpu_computes_bigjax_attention(causal):
  _assert_same(_attention_and_grads("cudnn", causal), _attention_and_grads("xla", causal))
