"""Opt-in value checks (checkify): NaN/Inf inputs, lengths out of range, a cache that ran out of room.

Off by default so the hot path carries no checks; wrap a function to turn them on:

    attend_checked = akv.checked(akv.attend)
    out = attend_checked(q, ckv)          # raises JaxRuntimeError naming the problem

Static problems (shapes, settings) are ValueErrors at trace time either way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from akv_jax.cache import CompressedKV, DenseKV


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, jnp.ndarray)) or hasattr(x, "__jax_array__")


def _check_dense(kv: DenseKV, where: str) -> None:
  s = kv.k.shape[2]
  lengths = jnp.asarray(kv.lengths)
  checkify.check(jnp.all((lengths >= 0) & (lengths <= s)),
                 f"{where}: lengths must be in [0, {s}], got min {{lo}} max {{hi}}",
                 lo=jnp.min(lengths), hi=jnp.max(lengths))
  valid = kv.valid()[..., None]
  for name, x in (("k", kv.k), ("v", kv.v)):
    bad = jnp.sum(valid & ~jnp.isfinite(x))
    checkify.check(bad == 0, f"{where}: {name} has {{n}} non-finite values in valid tokens", n=bad)


def _check_compressed(ckv: CompressedKV, where: str) -> None:
  dropped = jnp.sum(ckv.dropped)
  checkify.check(dropped == 0, f"{where}: {{n}} tokens found no room in the compressed cache; reserve more "
                 "tokens at compress time", n=dropped)


def _check_tree(tree, where: str) -> None:
  for node in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, (DenseKV, CompressedKV))):
    if isinstance(node, DenseKV):
      _check_dense(node, where)
    elif isinstance(node, CompressedKV):
      _check_compressed(node, where)
    elif _is_array(node) and jnp.issubdtype(node.dtype, jnp.floating):
      bad = jnp.sum(~jnp.isfinite(node))
      checkify.check(bad == 0, f"{where}: an array argument of shape {node.shape} has {{n}} non-finite values",
                     n=bad)


def checked(fn):
  """Wraps fn so that its array inputs and its outputs are value-checked; raises on the first failure.

  Non-array arguments (policies, ints, strings) are passed through as static values.
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dyn = [i for i, x in enumerate(leaves) if _is_array(x)]

    def inner(*dyn_leaves):
      full = list(leaves)
      for i, x in zip(dyn, dyn_leaves):
        full[i] = x
      a, kw = jax.tree_util.tree_unflatten(treedef, full)
      _check_tree((a, kw), f"{fn.__name__} input")
      out = fn(*a, **kw)
      _check_tree(out, f"{fn.__name__} output")
      return out

    err, out = checkify.checkify(inner, errors=checkify.user_checks)(*[leaves[i] for i in dyn])
    err.throw()
    return out

  return wrapper
