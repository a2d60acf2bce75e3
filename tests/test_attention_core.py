"""attention_core.attention and its hand-written backward pass, against autodiff of
the textbook softmax attention and against finite differences, in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bigjax.models import attention_core


def textbook(q, k, v, mask, bias=None):
  """softmax(q k^T + bias, masked) v, per query head."""
  g = q.shape[2]
  k, v = (jnp.repeat(x[:, :, None], g, axis=2) for x in (k, v))
  scores = jnp.einsum("bkgtd,bkgsd->bkgts", q, k)
  if bias is not None:
    scores = scores + bias
  scores = jnp.where(mask[:, :, None], scores, -1e30)
  return jnp.einsum("bkgts,bkgsd->bkgtd", jax.nn.softmax(scores, axis=-1), v)


def _inputs(seed, b=2, kv=2, g=2, t=8, s=8, d=4, dtype=np.float64):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=shape), dtype)
             for shape in ((b, kv, g, t, d), (b, kv, s, d), (b, kv, s, d)))
  return rng, q, k, v


def _causal_mask_with_padding(b, t):
  mask = np.tril(np.ones((t, t), bool))[None, None].repeat(b, axis=0)
  mask[0, :, :, 5] = False  # A padded key.
  mask[1, :, PADDED_ROW, :] = False  # A query that sees no key (a padded row).
  return jnp.asarray(mask)


# A row with no visible key averages the values of the keys its block scores (an
# output no loss uses: a padded position's). The tests leave it out and check that
# it passes no gradient on.
PADDED_ROW = 3





CASES = {
    # blocks, mask maker
    "causal in 4 blocks": (4, lambda rng, b, t, s: _causal_mask_with_padding(b, t)),
    "causal in 2 blocks": (2, lambda rng, b, t, s: _causal_mask_with_padding(b, t)),
    "random mask, one block": (1, lambda rng, b, t, s: jnp.asarray(
        rng.random((b, 1, t, s)) < 0.7)),
}


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_the_textbook_attention(case):
  blocks, make_mask = CASES[case]
  with jax.enable_x64(True):
    s = 8 if blocks > 1 else 11
    rng, q, k, v = _inputs(0, s=s)
    mask = make_mask(rng, 2, 8, s)
    d_out = np.asarray(rng.normal(size=q.shape))
    d_out[1, :, :, PADDED_ROW] = 0  # Its output is used by no loss.
    d_out = jnp.asarray(d_out)
    ours = lambda q, k, v: attention_core.attention(q, k, v, mask, blocks=blocks)  # noqa: E731
    theirs = lambda q, k, v: textbook(q, k, v, mask)  # noqa: E731
    out, vjp = jax.vjp(ours, q, k, v)
    want, want_vjp = jax.vjp(theirs, q, k, v)
    visible = np.asarray(mask).any(-1)[:, :, None, :, None]  # Rows that see a key.
    np.testing.assert_allclose(np.where(visible, out, 0), np.where(visible, want, 0),
                               rtol=1e-10, atol=1e-12)
    for got, ref in zip(vjp(d_out), want_vjp(d_out)):
      assert np.abs(ref).max() > 1e-3
      np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-11)
    # Even when its output is used, a row with no visible key passes nothing to the
    # queries and keys (the mask stops the gradient).
    d_out = jnp.asarray(rng.normal(size=q.shape))
    (d_q, d_k, _), (_, want_d_k, _) = vjp(d_out), want_vjp(d_out)
    assert np.all(np.asarray(d_q)[~np.broadcast_to(visible[..., 0], d_q.shape[:-1])] == 0)
    np.testing.assert_allclose(d_k, want_d_k, rtol=1e-9, atol=1e-11)


def test_dropout_gradients_match_finite_differences_and_its_mean_the_plain_output():
  with jax.enable_x64(True):
    rng, q, k, v = _inputs(1)
    mask = _causal_mask_with_padding(2, 8)
    key = jax.random.PRNGKey(3)
    dropped = lambda q, k, v: attention_core.attention(  # noqa: E731
        q, k, v, mask, blocks=4, dropout_rate=0.4, rng=key)
    visible = np.asarray(mask).any(-1)[:, :, None, :, None]
    plain = np.where(visible, textbook(q, k, v, mask), 0)
    assert not np.allclose(np.where(visible, dropped(q, k, v), 0), plain)
    for seed in range(3):  # Each check is along one random direction.
      np.random.seed(seed)
      check_grads(dropped, (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    # Inverted dropout is unbiased: the mean over many keys is the plain output.
    keys = jax.random.split(jax.random.PRNGKey(4), 4000)
    mean = jax.vmap(lambda r: attention_core.attention(
        q, k, v, mask, blocks=4, dropout_rate=0.4, rng=r))(keys).mean(0)
    np.testing.assert_allclose(np.where(visible, mean, 0), plain, atol=0.08)


def test_bfloat16_stays_close_to_float32():
  rng, q, k, v = _inputs(2, t=64, s=64, d=16, dtype=np.float32)
  mask = _causal_mask_with_padding(2, 64)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def run(dtype):
    f = lambda q, k, v: attention_core.attention(q, k, v, mask, blocks=4)  # noqa: E731
    args = [x.astype(dtype) for x in (q, k, v)]
    out, vjp = jax.vjp(f, *args)
    assert out.dtype == dtype
    return [np.asarray(x, np.float32) for x in (out, *vjp(d_out.astype(dtype)))]

  for low, high in zip(run(jnp.bfloat16), run(jnp.float32)):
    np.testing.assert_allclose(low, high, atol=0.03 * np.abs(high).max())


def test_bfloat16_is_as_accurate_as_jax_reference_attention():
  """Both implementations get the same bf16 inputs and are measured against float32
  attention of those inputs. Scores rounded to bf16 before the softmax made the
  output's error 1.8x jax's. The gradients may be up to ~2x jax's: the backward pass
  keeps its [t, s] operands (the unnormalised weights) and the rescaled d_out in
  bf16, where jax's autodiff keeps float32 probabilities; more float32 passes over
  [t, s] would cost the float32 CPU step (the peer-parity benchmark) time."""
  b, t, h, d = 2, 64, 4, 64
  rng = np.random.default_rng(0)
  q, k, v, d_out = (rng.normal(size=(b, t, h, d)) * scale for scale in (1.5, 1.5, 1.0, 1.0))
  mask = jnp.asarray(np.tril(np.ones((t, t), bool)))[None, None].repeat(b, axis=0)

  def ours(q, k, v):  # [b, t, h, d] layout, as jax.nn's
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    out = attention_core.attention(heads_major(q * d ** -0.5)[:, :, None], heads_major(k),
                                   heads_major(v), mask, blocks=2)
    return out[:, :, 0].transpose(0, 2, 1, 3)

  def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

  def outputs_and_gradients(f, dtype):
    args = [jnp.asarray(x, jnp.bfloat16).astype(dtype) for x in (q, k, v)]
    out, vjp = jax.vjp(f, *args)
    return [np.asarray(x, np.float32) for x in (out, *vjp(jnp.asarray(d_out, dtype)))]

  truth = outputs_and_gradients(ours, jnp.float32)
  np.testing.assert_allclose(truth[0], outputs_and_gradients(reference, jnp.float32)[0],
                             atol=1e-5)
  for name, mine, theirs, want, bound in zip(("out", "dq", "dk", "dv"),
                                             outputs_and_gradients(ours, jnp.bfloat16),
                                             outputs_and_gradients(reference, jnp.bfloat16),
                                             truth, (1.0, 2.5, 2.5, 2.5)):
    assert np.abs(mine - want).max() <= bound * np.abs(theirs - want).max(), name


@pytest.mark.parametrize("bias_rows", [1, 2], ids=["shared bias", "per-row bias"])
@pytest.mark.parametrize("case", ["causal in 4 blocks", "random mask, one block"])
def test_score_bias_values_and_gradients_match_the_textbook_attention(case, bias_rows):
  """A score bias table[ids] (T5's relative positions: a value per bucket and head),
  the ids shared by the rows or per row: the outputs and the gradients of q, k, v
  and the table, against autodiff of the textbook attention with table[ids] added."""
  blocks, make_mask = CASES[case]
  with jax.enable_x64(True):
    s = 8 if blocks > 1 else 11
    rng, q, k, v = _inputs(4, s=s)
    mask = make_mask(rng, 2, 8, s)
    table = jnp.asarray(rng.normal(size=(5, 2, 2)))  # 5 buckets, [kv, g] heads.
    ids = jnp.asarray(rng.integers(0, 5, (bias_rows, 8, s)))
    d_out = np.asarray(rng.normal(size=q.shape))
    d_out[1, :, :, PADDED_ROW] = 0
    d_out = jnp.asarray(d_out)
    ours = lambda q, k, v, table: attention_core.attention(  # noqa: E731
        q, k, v, mask, blocks=blocks, bias=(table, ids))
    theirs = lambda q, k, v, table: textbook(  # noqa: E731
        q, k, v, mask, table[ids].transpose(0, 3, 4, 1, 2))
    out, vjp = jax.vjp(ours, q, k, v, table)
    want, want_vjp = jax.vjp(theirs, q, k, v, table)
    visible = np.asarray(mask).any(-1)[:, :, None, :, None]
    np.testing.assert_allclose(np.where(visible, out, 0), np.where(visible, want, 0),
                               rtol=1e-10, atol=1e-12)
    assert np.abs(np.asarray(out) - np.asarray(ours(q, k, v, 0 * table))).max() > 0.1
    for got, ref in zip(vjp(d_out), want_vjp(d_out)):
      assert np.abs(ref).max() > 1e-3
      np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("t, s", [(10, 10), (8, 12)])
def test_row_blocks_that_would_drop_rows_are_refused(t, s):
  q = jnp.zeros((1, 1, 1, t, 4))
  k = v = jnp.zeros((1, 1, s, 4))
  mask = jnp.ones((1, 1, 1, t, s), bool)
  with pytest.raises(ValueError, match=f"4 row blocks .* got {t} queries over {s} keys"):
    attention_core.attention(q, k, v, mask, blocks=4)
