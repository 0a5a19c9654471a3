"""The one masked softmax: numpy's softmax over the unmasked entries, exact zeros elsewhere, no NaN."""

import jax.numpy as jnp
import numpy as np

from akv_jax.softmax import masked_softmax


def test_masked_softmax_matches_numpy_over_the_unmasked_entries():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 17)).astype(np.float32) * 4
  mask = rng.random((3, 5, 17)) < 0.6
  mask[0, 0] = False                       # a row that sees nothing
  logits[1, 1, ~mask[1, 1]] = np.nan       # garbage where masked must not leak
  logits[1, 2, ~mask[1, 2]] = np.inf
  got = np.asarray(masked_softmax(jnp.asarray(logits), jnp.asarray(mask)))
  for idx in np.ndindex(3, 5):
    m = mask[idx]
    want = np.zeros(17)
    if m.any():
      e = np.exp(logits[idx][m].astype(np.float64) - logits[idx][m].max())
      want[m] = e / e.sum()
    np.testing.assert_allclose(got[idx], want, rtol=2e-6, atol=1e-7)
  assert np.all(got[~mask] == 0.0) and np.all(np.isfinite(got))
  assert np.all(got[0, 0] == 0.0)


def test_masked_softmax_broadcasts_the_mask():
  logits = jnp.arange(12.0).reshape(2, 2, 3)
  mask = jnp.array([True, False, True])
  got = np.asarray(masked_softmax(logits, mask))
  assert np.all(got[..., 1] == 0.0)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
