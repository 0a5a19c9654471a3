"""Per-layer bits from measured sensitivity (akv_jax.bit_allocation): the greedy allocation, the plan on caches with
one sensitive layer, the bytes it promises against the arrays compress holds, and every error."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import bit_allocation as ba
from akv_jax.testing import random_kv, random_queries

KIVI = dataclasses.replace(akv.presets.get("kivi2"), recent=16)


def test_allocate_spends_the_budget_where_error_falls_most():
  errors = np.array([[0.50, 0.10, 0.01],    # layer 0: 4 bits buys a lot
                     [0.20, 0.19, 0.18],    # layer 1: barely anything
                     [0.40, 0.05, 0.04]])   # layer 2: 4 bits buys a lot, 8 bits little
  costs = np.array([[10, 20, 40]] * 3)
  assert ba.allocate(errors, costs, 30) == [0, 0, 0]
  assert ba.allocate(errors, costs, 40) == [1, 0, 0]          # 0.40 / 10 beats 0.35 / 10
  assert ba.allocate(errors, costs, 50) == [1, 0, 1]
  assert ba.allocate(errors, costs, 70) == [2, 0, 1]          # layer 0 to 8 bits: 0.09 / 20 beats the rest
  assert ba.allocate(errors, costs, 10_000) == [2, 2, 2]


def test_allocate_never_takes_a_dearer_width_that_is_no_better():
  errors = np.array([[0.3, 0.3, 0.1], [0.3, 0.2, 0.2]])
  costs = np.array([[10, 20, 40], [10, 20, 40]])
  assert ba.allocate(errors, costs, 60) == [2, 1]   # layer 1 never goes to 40 bytes for no gain over 20
  assert ba.allocate(errors, costs, 1000) == [2, 1]
  for budget in range(20, 90, 5):
    pick = ba.allocate(errors, costs, budget)
    assert sum(costs[i, c] for i, c in enumerate(pick)) <= budget


def test_allocate_errors():
  with pytest.raises(ValueError, match=r"a budget of 15 bytes is below the 20 bytes the narrowest widths hold"):
    ba.allocate(np.ones((2, 2)), np.array([[10, 20], [10, 20]]), 15)
  with pytest.raises(ValueError, match=r"errors \(2, 2\) and costs \(2, 3\) must both be \[L, W\]"):
    ba.allocate(np.ones((2, 2)), np.ones((2, 3)), 15)


def _layers(num_layers=4, sensitive=2, s=256):
  """Random caches in which layer `sensitive` has a few large-magnitude key channels and values: what 2-bit
  groups lose most on."""
  kvs, qs = [], []
  for i in range(num_layers):
    kv = random_kv(10 + i, b=2, k=2, s=s, h=32, lengths=(s, s - 40), dtype=jnp.bfloat16)
    if i == sensitive:
      scale = jnp.ones(32).at[:3].set(12.0)
      kv = dataclasses.replace(kv, k=(kv.k * scale).astype(jnp.bfloat16), v=(kv.v * scale).astype(jnp.bfloat16))
    kvs.append(kv)
    qs.append(random_queries(20 + i, b=2, n=4, t=16, h=32, dtype=jnp.bfloat16))
  return kvs, qs


def test_output_error_is_zero_for_the_full_cache_and_grows_with_fewer_bits():
  kvs, qs = _layers(num_layers=1)
  full = akv.compress(kvs[0], akv.presets.get("full"))
  assert float(ba.output_error(kvs[0], full, qs[0])) < 1e-2   # bf16 storage of bf16 inputs: rounding only
  errors, held = ba.measure(KIVI, kvs, qs, widths=(2, 4, 8))
  assert errors[0, 0] > errors[0, 1] > errors[0, 2]
  assert held[0, 0] < held[0, 1] < held[0, 2]


def test_plan_gives_the_sensitive_layer_more_bits_and_holds_what_it_promises():
  kvs, qs = _layers()
  errors, held = ba.measure(KIVI, kvs, qs, widths=(2, 4))
  assert int(np.argmax(errors[:, 0])) == 2   # the construction works: layer 2 loses most at 2 bits
  uniform2 = sum(akv.nbytes(akv.compress(kv, KIVI, queries=q, layer=i, num_layers=4))
                 for i, (kv, q) in enumerate(zip(kvs, qs)))
  assert uniform2 == held[:, 0].sum()
  dense = sum(akv.dense_bf16_bytes(kv) for kv in kvs)
  # Room for exactly one layer at 4 bits (one and a half upgrades' bytes): it goes to the sensitive one.
  target = dense / (uniform2 + 1.5 * (held[2, 1] - held[2, 0]))
  plan = ba.plan_bits(KIVI, kvs, qs, target=target, widths=(2, 4))
  assert plan.widths == (2, 2, 4, 2) and plan.policy.layer_bits == (2, 2, 4, 2)
  held = sum(akv.nbytes(akv.compress(kv, plan.policy, queries=q, layer=i, num_layers=4))
             for i, (kv, q) in enumerate(zip(kvs, qs)))
  assert held == plan.held_bytes <= plan.budget_bytes and plan.ratio >= target
  d = plan.to_dict()
  assert d["widths"] == [2, 2, 4, 2] and d["error_sum"] < errors[:, 0].sum()
  # A generous budget lifts every layer, to bf16 where the budget allows it (all of them would measure < 1x).
  loose = ba.plan_bits(KIVI, kvs, qs, target=1.05, widths=(2, 4, None))
  assert set(loose.widths) == {4, None} and loose.ratio >= 1.05


def test_plan_composes_with_selection():
  kvs, qs = _layers()
  snap = dataclasses.replace(akv.presets.fixed("hybrid_8x"), budget="uniform", keep=0.55, recent=16, window=16,
                             key_group=16, value_group=16)
  plan = ba.plan_bits(snap, kvs, qs, target=3, widths=(2, 4, 8))   # S = 256: 3.5x at 2 bits everywhere
  assert plan.ratio >= 3 and plan.policy.selection == "snapkv" and plan.widths[2] > 2 and 2 in plan.widths


def test_plan_errors():
  kvs, qs = _layers(num_layers=2)
  with pytest.raises(ValueError, match=r"width 5 is not supported; use widths from \(2, 3, 4, 8\) or None for "
                                       r"bf16"):
    ba.plan_bits(KIVI, kvs, qs, target=4, widths=(2, 5))
  with pytest.raises(ValueError, match=r"widths=\[2, 2\] names a width more than once"):
    ba.plan_bits(KIVI, kvs, qs, target=4, widths=(2, 2))
  with pytest.raises(ValueError, match="widths is empty"):
    ba.plan_bits(KIVI, kvs, qs, target=4, widths=())
  with pytest.raises(ValueError, match=r"target=0.5 must be a compression ratio > 1"):
    ba.plan_bits(KIVI, kvs, qs, target=0.5)
  with pytest.raises(ValueError, match=r"target=40x cannot be met with widths \[2, 4\]: the narrowest hold \d+ "
                                       r"bytes \([0-9.]+x\); a target up to [0-9.]+x"):
    ba.plan_bits(KIVI, kvs, qs, target=40, widths=(2, 4))
  with pytest.raises(ValueError, match=r"got 2 layers of kv and 1 of queries"):
    ba.measure(KIVI, kvs, qs[:1])
  with pytest.raises(ValueError, match=r"policy 'hybrid_8x' has target=8x: fix its keep first"):
    ba.measure(akv.presets.get("hybrid_8x"), kvs, qs)
