"""Fused quantize-and-pack kernel: bit-identical to its reference, which equals akv_jax.quant.quantize.

On a GPU the kernels run compiled by Triton; elsewhere in the Pallas interpreter, plus a cross-lowering check that
builds the Triton IR for CUDA on the CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import lowering
from pallas_kernels import quantize as qp

_quantize_pack = qp.quantize_pack

INTERPRET = jax.default_backend() != "gpu"


def _bits16(a):
  return np.asarray(a).view(np.uint16)


def _assert_same(out, ref):
  codes, scale, zero = out
  rcodes, rscale, rzero = ref
  assert codes.dtype == np.uint8 and scale.dtype == np.float16 and zero.dtype == np.float16
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(rcodes))
  np.testing.assert_array_equal(_bits16(scale), _bits16(rscale))
  np.testing.assert_array_equal(_bits16(zero), _bits16(rzero))


# ---------------------------------------------------------------------------------------------------------------
# The exact float16 helpers, run inside a Pallas kernel so a GPU run checks them as Triton compiles them.


def _elementwise_kernel(fn, x, out_dtype, block=1024):
  """Applies fn to a 1-D array (size a multiple of `block`) inside pallas_call."""

  def kernel(x_ref, o_ref):
    o_ref[...] = fn(x_ref[...])

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype),
      grid=(x.shape[0] // block,),
      in_specs=[pl.BlockSpec((block,), lambda i: (i,))],
      out_specs=pl.BlockSpec((block,), lambda i: (i,)),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=INTERPRET,
  )(x)


def _all_f16(finite_only=True):
  """Every float16 bit pattern (NaNs dropped; infinities kept unless finite_only)."""
  v = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
  keep = np.isfinite(v) if finite_only else ~np.isnan(v)
  return v[keep]


def _pad_to(a, block=1024):
  pad = (-a.shape[0]) % block
  return np.concatenate([a, np.repeat(a[-1:], pad)])


@pytest.mark.parametrize("up", [False, True])
def test_next_f16_is_nextafter_on_every_float16(up):
  v = _pad_to(_all_f16(finite_only=False))
  got = _elementwise_kernel(lambda a: qp._next_f16(a, up=up), jnp.asarray(v), jnp.float16)
  want = jnp.nextafter(jnp.asarray(v), jnp.float16(np.inf if up else -np.inf))
  np.testing.assert_array_equal(_bits16(got), _bits16(want))


def _no_f32_subnormals(v):
  # Whether f32 subnormals flush to zero differs between XLA:CPU, XLA:GPU and Triton; the module docstring
  # leaves them out of the bit-for-bit claim.
  return v[(v == 0) | ~(np.abs(v) < np.finfo(np.float32).tiny)]


def _f32_around(v16):
  """f32 values on every float16 grid point and one f32 ulp either side of it."""
  g = v16.astype(np.float32)
  v = np.concatenate([g, np.nextafter(g, np.float32(np.inf)), np.nextafter(g, np.float32(-np.inf))])
  return _no_f32_subnormals(v)


def _round_toward(c, v, up):
  """akv_jax.quant's rule, as XLA computes it: step c (float16) one ulp toward v where the cast went past v."""
  past = (c.astype(jnp.float32) < v) if up else (c.astype(jnp.float32) > v)
  return jnp.where(past, jnp.nextafter(c, jnp.float16(np.inf if up else -np.inf)), c)


@pytest.mark.parametrize("up", [False, True])
def test_round_f16_equals_cast_then_nextafter(up):
  v = _f32_around(_all_f16())
  rng = np.random.default_rng(0)
  v = _pad_to(np.concatenate([v, rng.normal(0, 300, 30000).astype(np.float32), [np.float32(0), -np.float32(0)]]))
  got = _elementwise_kernel(lambda a: qp._round_f16(a, up=up), jnp.asarray(v), jnp.float16)
  want = _round_toward(jnp.asarray(v).astype(jnp.float16), jnp.asarray(v), up=up)
  np.testing.assert_array_equal(_bits16(got), _bits16(want))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_scale_f16_equals_xla_dividing_by_levels(bits):
  levels = (1 << bits) - 1
  g = _all_f16()
  g = g[g >= 0].astype(np.float32)
  # Ranges t on and next to levels * g, where the quotient lands on or just beside a float16 grid point.
  p = (g * np.float32(levels)).astype(np.float32)
  t = _no_f32_subnormals(np.concatenate([p, np.nextafter(p, np.float32(np.inf)), np.nextafter(p, np.float32(0))]))
  rng = np.random.default_rng(bits)
  t = _pad_to(np.concatenate([t, np.abs(rng.normal(0, 100, 30000)).astype(np.float32), [np.float32(np.inf)]]))
  got = _elementwise_kernel(lambda a: qp._scale_f16(a, levels), jnp.asarray(t), jnp.float16)
  q = jax.jit(lambda t: t / levels)(jnp.asarray(t))  # the reference's expression, compiled by XLA
  want = _round_toward(q.astype(jnp.float16), q, up=True)
  np.testing.assert_array_equal(_bits16(got), _bits16(want))


def test_recip_f16_is_the_f32_reciprocal_of_every_float16():
  s = _all_f16(finite_only=False)
  s = _pad_to(s[~np.signbit(s)])  # +0 .. +inf
  # IEEE division on the host: XLA's own f32 division is approximate on a GPU (div.full.f32), which is why the
  # references call recip_f16 instead of dividing.
  sf = s.astype(np.float32)
  with np.errstate(divide="ignore"):
    ieee = np.where((sf > 0) & np.isfinite(sf), np.float32(1) / sf, np.float32(0)).astype(np.float32)
  in_kernel = np.asarray(_elementwise_kernel(qp.recip_f16, jnp.asarray(s), jnp.float32))
  np.testing.assert_array_equal(in_kernel.view(np.uint32), ieee.view(np.uint32))
  in_xla = np.asarray(jax.jit(qp.recip_f16)(jnp.asarray(s)))  # as the references run it
  np.testing.assert_array_equal(in_xla.view(np.uint32), ieee.view(np.uint32))


# ---------------------------------------------------------------------------------------------------------------
# Kernel vs reference.


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _make_x(key, shape, axis, group, dtype):
  """Normal data with outlier channels and tokens, constant groups, exact float16 grid values and zeros."""
  b, k, s, h = shape
  k1, k2, k3 = jax.random.split(key, 3)
  x = jax.random.normal(k1, shape) * 3.0 + jax.random.normal(k2, (b, k, 1, h))
  x = x.at[..., 3].multiply(40.0)  # outlier channel
  x = x.at[..., 1, :].multiply(-25.0)  # outlier token
  # Constant groups: a whole (channel) or (token) group of one value; one of them exactly 0.
  if axis == "channel":
    x = x.at[:, :, :group, 5].set(1.7)
    x = x.at[:, :, :group, 6].set(0.0)
  else:
    x = x.at[:, :, 2, :group].set(-0.3)
    x = x.at[:, :, 4, :group].set(0.0)
  # Exact float16 grid values (including negatives) for a quarter of the tokens.
  grid = jax.random.bernoulli(k3, 0.25, (b, k, s, 1))
  x = jnp.where(grid, x.astype(jnp.float16).astype(jnp.float32), x)
  return x.astype(dtype)


def _lengths(spec, b, k):
  return jnp.asarray(np.asarray(spec, np.int32).reshape(b, k))


# (bits, axis, H, group, dtype, S, lengths [B*K], block_tokens). Every (bits, axis, H) appears; lengths include 0,
# full, beyond S and values that are not multiples of the group or the block; S overhangs the last block.
CASES = [
    (2, "channel", 64, 32, jnp.float32, 160, [0, 160, 37, 100], None),
    (4, "channel", 64, 16, jnp.bfloat16, 80, [80, 17, 64, 3], None),
    (8, "channel", 64, 32, jnp.float32, 192, [191, 250, 5, 0], None),
    (2, "channel", 128, 64, jnp.bfloat16, 128, [128, 65], None),
    (4, "channel", 128, 32, jnp.float32, 96, [96, 33, 64, 1], None),
    (8, "channel", 128, 32, jnp.bfloat16, 64, [64, 31], 32),
    (2, "token", 64, 32, jnp.bfloat16, 77, [77, 0, 40, 13], None),
    (4, "token", 64, 32, jnp.float32, 200, [200, 129, 64, 65], None),
    (8, "token", 64, 32, jnp.float32, 130, [130, 1], None),
    (2, "token", 128, 64, jnp.float32, 64, [64, 63, 0, 20], None),
    (4, "token", 128, 32, jnp.bfloat16, 50, [50, 7], 16),
    (8, "token", 128, 32, jnp.float32, 99, [99, 98, 33, 200], None),
    (3, "channel", 64, 32, jnp.float32, 160, [0, 160, 37, 100], None),
    (3, "token", 128, 32, jnp.bfloat16, 77, [77, 0, 40, 13], None),
]


def _case_id(c):
  bits, axis, h, group, dtype, s, _, bt = c
  return f"{axis}-{bits}b-H{h}-g{group}-{jnp.dtype(dtype).name}-S{s}" + (f"-T{bt}" if bt else "")


def _poison(ref):
  """Outputs to write into, each element the bitwise complement of the expected one: an unwritten element fails."""
  codes, scale, zero = (np.asarray(a) for a in ref)
  flip16 = lambda a: (~a.view(np.uint16)).view(np.float16)
  return jnp.asarray(~codes), jnp.asarray(flip16(scale)), jnp.asarray(flip16(zero))


def _run_case(x, lengths, bits, axis, group, block_tokens):
  kw = dict(bits=bits, group=group, axis=axis)
  ref = qp.quantize_pack_reference(x, lengths, **kw)
  out = qp._quantize_pack_into(x, lengths, _poison(ref), block_tokens=block_tokens, interpret=INTERPRET, **kw)
  _assert_same(out, ref)
  return ref


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference_bit_for_bit(case):
  bits, axis, h, group, dtype, s, lens, block_tokens = case
  b, k = (2, 2) if len(lens) == 4 else (1, 2)
  x = _make_x(jax.random.key(bits * 1000 + h + s), (b, k, s, h), axis, group, dtype)
  _run_case(x, _lengths(lens, b, k), bits, axis, group, block_tokens)


@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=_case_id)
def test_public_entry_point_matches_reference(case):
  bits, axis, h, group, dtype, s, lens, block_tokens = case
  b, k = 2, 2
  x = _make_x(jax.random.key(7), (b, k, s, h), axis, group, dtype)
  lengths = _lengths(lens, b, k)
  kw = dict(bits=bits, group=group, axis=axis)
  out = qp.quantize_pack(x, lengths, block_tokens=block_tokens, interpret=INTERPRET, **kw)
  _assert_same(out, qp.quantize_pack_reference(x, lengths, **kw))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _half_step_values(x, lengths, bits, axis, group, key):
  """Moves interior elements onto zero + (j + 1/2) * scale: the rounding ties of floor(y + 0.5).

  At these points the code depends on whether (x - zero) * inv + 0.5 is rounded once (fma) or twice, so they
  catch a kernel that computes the code differently from the reference.
  """
  b, k, s, h = x.shape
  levels = (1 << bits) - 1
  _, scale, zero = qp.quantize_pack_reference(x, lengths, bits=bits, group=group, axis=axis)
  red = 3 if axis == "channel" else 4
  view = (b, k, s // group, group, h) if axis == "channel" else (b, k, s, h // group, group)
  rep = lambda a: jnp.repeat(a.astype(jnp.float32), group, axis=red - 1).reshape(x.shape)
  z, sc = rep(zero), rep(scale)
  g = x.reshape(view)
  is_extreme = (g == g.min(axis=red, keepdims=True)) | (g == g.max(axis=red, keepdims=True))
  is_extreme = jnp.broadcast_to(is_extreme, view).reshape(x.shape)
  k1, k2 = jax.random.split(key)
  j = jax.random.randint(k1, x.shape, 1, max(levels - 1, 2)).astype(jnp.float32)
  pick = jax.random.bernoulli(k2, 0.5, x.shape) & ~is_extreme & (sc > 0)
  # Min and max of every group are untouched and the new values lie strictly inside, so scale and zero stay.
  return jnp.where(pick, z + (j + 0.5) * sc, x)


def _contraction_sensitive(x, zero, scale, axis, group):
  """How many elements get a different code from floor(fl(fl(d * inv) + 0.5)) than from floor(fl(d * inv + 0.5))."""
  red = 3 if axis == "channel" else 4
  rep = lambda a: np.repeat(np.asarray(a, np.float32), group, axis=red - 1).reshape(x.shape)
  z, sc = rep(zero), rep(scale)
  inv = np.where(sc > 0, np.float32(1) / np.where(sc > 0, sc, np.float32(1)), np.float32(0)).astype(np.float32)
  d = (np.asarray(x, np.float32) - z).astype(np.float32)
  p = d.astype(np.float64) * inv.astype(np.float64)  # exact: 24 + 24 significant bits
  twice = np.floor(p.astype(np.float32) + np.float32(0.5))
  once = np.floor((p + 0.5).astype(np.float32))
  return int(np.sum(twice != once))


@pytest.mark.parametrize("bits,axis,h", [(8, "channel", 64), (4, "token", 128), (2, "channel", 128)])
def test_kernel_matches_reference_on_rounding_ties(bits, axis, h):
  b, k, s, group = 2, 2, 96, 32
  lengths = _lengths([96, 70, 33, 95], b, k)
  x = _make_x(jax.random.key(bits + h), (b, k, s, h), axis, group, jnp.float32)
  x = _half_step_values(x, lengths, bits, axis, group, jax.random.key(bits))
  _, scale, zero = _run_case(x, lengths, bits, axis, group, None)
  if bits == 8:
    # The data must actually reach the fma-sensitive ties, or this test proves nothing about them.
    assert _contraction_sensitive(x, zero, scale, axis, group) > 0


def test_reference_equals_akv_jax_quantize():
  quant = pytest.importorskip("akv_jax.quant", reason="akv_jax (flax and friends) not installed")
  b, k, s, h = 2, 2, 96, 64
  lengths = _lengths([96, 0, 45, 70], b, k)
  cases = [(2, "channel", 32, jnp.float32), (4, "channel", 16, jnp.bfloat16), (8, "channel", 32, jnp.float32),
           (2, "token", 64, jnp.bfloat16), (4, "token", 32, jnp.float32), (8, "token", 32, jnp.float32)]
  # One program per side keeps compiles few; the two sides stay separate programs so that XLA cannot merge the
  # reference's arithmetic with akv_jax's.
  xs = jax.jit(lambda: [
      _half_step_values(_make_x(jax.random.key(bits), (b, k, s, h), axis, group, jnp.float32), lengths, bits, axis,
                        group, jax.random.key(3)).astype(dtype)
      for bits, axis, group, dtype in cases])()
  valid = jnp.arange(s) < lengths[..., None]
  theirs = jax.jit(lambda xs: [
      quant.quantize(x, quant.QuantSpec(bits=bits, group=group, axis=axis), valid)
      for x, (bits, axis, group, _) in zip(xs, cases)])(xs)
  ours = jax.jit(lambda xs: [
      qp.quantize_pack_reference(x, lengths, bits=bits, group=group, axis=axis)
      for x, (bits, axis, group, _) in zip(xs, cases)])(xs)
  for case, qt, out in zip(cases, theirs, ours):
    assert qt.bits == case[0] and qt.axis == case[1]
    _assert_same(out, (qt.codes, qt.scale, qt.zero))


# ---------------------------------------------------------------------------------------------------------------
# Triton lowering (no GPU needed) and static validation.


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lowers_to_triton_for_cuda(bits, h, axis):
  x = jax.ShapeDtypeStruct((2, 2, 96, h), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((2, 2), jnp.int32)
  f = functools.partial(qp.quantize_pack, bits=bits, group=32, axis=axis)
  text = lowering.lower_for_cuda(f, x, lengths)   # also runs the MLIR verifier on the Triton module
  assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("shape,dtype,lshape,kwargs,match", [
    ((2, 64, 64), jnp.float32, (2, 2), {}, r"4-D .*\(2, 64, 64\)"),
    ((2, 2, 64, 64), jnp.int32, (2, 2), {}, "float array, got dtype int32"),
    ((2, 2, 64, 64), jnp.float32, (2,), {}, r"lengths must have shape .*got \(2,\)"),
    ((2, 2, 64, 64), jnp.float32, (2, 2), dict(bits=5), "bits=5 is not supported"),
    ((2, 2, 64, 4), jnp.float32, (2, 2), dict(bits=3, group=1), "H=4 must be a multiple of 8 to pack 3-bit codes"),
    ((2, 2, 64, 64), jnp.float32, (2, 2), dict(axis="head"), "axis='head'"),
    ((2, 2, 64, 64), jnp.float32, (2, 2), dict(group=0), "group=0 must be >= 1"),
    ((2, 2, 48, 64), jnp.float32, (2, 2), dict(group=32), "S=48 is not a multiple of group=32"),
    ((2, 2, 64, 64), jnp.float32, (2, 2), dict(axis="token", group=128), "H=64 is not a multiple of group=128"),
    ((2, 2, 64, 2), jnp.float32, (2, 2), dict(bits=2, group=1), "H=2 must be a multiple of 4"),
    ((2, 2, 64, 96), jnp.float32, (2, 2), {}, "H=96 must be a power of 2"),
    ((2, 2, 48, 64), jnp.float32, (2, 2), dict(group=24), "group=24 must be a power of 2"),
    ((2, 2, 64, 64), jnp.float32, (2, 2), dict(block_tokens=48), "block_tokens=48 must be a power of 2"),
    ((2, 2, 64, 64), jnp.float32, (2, 2), dict(block_tokens=16), "block_tokens=16 must be a multiple of group=32"),
    ((2, 2, 64, 64), jnp.float32, (2, 2), dict(num_warps=3), "num_warps=3 must be one of"),
])
def test_static_errors(shape, dtype, lshape, kwargs, match):
  kw = dict(bits=4, group=32, axis="channel") | kwargs
  x = jnp.zeros(shape, dtype)
  lengths = jnp.zeros(lshape, jnp.int32)
  with pytest.raises(ValueError, match=match):
    qp.quantize_pack(x, lengths, interpret=True, **kw)
  if not {"block_tokens", "num_warps"} & kwargs.keys() and "power of 2" not in match:
    # The reference shares the checks that are not Triton limits.
    with pytest.raises(ValueError, match=match):
      qp.quantize_pack_reference(x, lengths, **kw)


def test_reference_accepts_non_power_of_2_shapes():
  x = jax.random.normal(jax.random.key(0), (1, 1, 48, 96))
  codes, scale, zero = qp.quantize_pack_reference(x, jnp.array([[40]]), bits=4, group=24, axis="channel")
  assert codes.shape == (1, 1, 48, 48) and scale.shape == zero.shape == (1, 1, 2, 96)


def test_akv_quantize_dispatch():
  """akv.quantize(implementation="pallas") is the kernel, bit for bit; bad requests raise, never fall back."""
  import akv_jax as akv  # noqa: PLC0415
  x = jax.random.normal(jax.random.key(4), (2, 2, 64, 64), jnp.bfloat16)
  for spec in (akv.QuantSpec(bits=2, group=32, axis="channel"), akv.QuantSpec(bits=4, group=32, axis="token")):
    want = akv.quantize(x, spec, implementation="xla")
    got = akv.quantize(x, spec, implementation="pallas", interpret=INTERPRET)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  spec = akv.QuantSpec(bits=2, group=32, axis="channel")
  with pytest.raises(ValueError, match=r"quantize\(implementation='pallas'\): pass valid=None"):
    akv.quantize(x, spec, jnp.ones(x.shape[:3], bool), implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match=r"x must be \[B, K, S, H\] for the kernel, got shape \(2, 64, 64\)"):
    akv.quantize(x[0], spec, implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match="power-of-2 head dim and group, got H=48"):
    akv.quantize(x[..., :48], akv.QuantSpec(bits=2, group=16, axis="channel"), implementation="pallas",
                 interpret=True)
  with pytest.raises(ValueError, match="token axis 48 is not a multiple of the key group 32"):
    akv.quantize(x[:, :, :48], spec, implementation="pallas", interpret=True)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="implementation='pallas' needs a GPU"):
      akv.quantize(x, spec, implementation="pallas")
  with pytest.raises(ValueError, match="implementation='cuda' is not one of"):
    akv.quantize(x, spec, implementation="cuda")


@pytest.mark.parametrize("preset", ["kivi2", "hybrid_8x"])
def test_append_through_the_kernel_is_bit_identical(preset, monkeypatch):
  """Quantize-on-append dispatches like akv.quantize: the kernel path leaves the very same cache bytes."""
  import dataclasses  # noqa: PLC0415

  import akv_jax as akv  # noqa: PLC0415
  from akv_jax.testing import random_kv, random_queries  # noqa: PLC0415
  pol = dataclasses.replace(akv.presets.fixed(preset), recent=32, key_group=16, value_group=16)
  kv = random_kv(5, b=2, k=2, s=160, h=64, lengths=(160, 97), dtype=jnp.bfloat16)
  q_obs = random_queries(6, b=2, n=4, t=32, h=64)
  steps = jax.random.normal(jax.random.key(7), (40, 2, 2, 2, 64), jnp.bfloat16)   # [step, k/v, B, K, H]
  traced = []   # the kernel is really on the pallas path (appends trace it), and only there
  monkeypatch.setattr(qp, "quantize_pack", lambda *a, **kw: traced.append(1) or _quantize_pack(*a, **kw))
  caches = {}
  for impl in ("xla", "pallas"):
    c = akv.compress(kv, pol, queries=q_obs, reserve=48)
    for t in range(steps.shape[0]):   # 40 steps: several whole key groups and every value leave the window
      c = akv.append(c, steps[t, 0], steps[t, 1], pol, implementation=impl, interpret=INTERPRET)
    caches[impl] = c
    assert bool(traced) == (impl == "pallas")
  assert int(np.asarray(caches["xla"].key_fill).max()) > int(np.asarray(
      akv.compress(kv, pol, queries=q_obs, reserve=48).key_fill).max()), "no key group was flushed"
  for a, b in zip(jax.tree_util.tree_leaves(caches["pallas"]), jax.tree_util.tree_leaves(caches["xla"])):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_append_implementation_errors():
  import akv_jax as akv  # noqa: PLC0415
  from akv_jax.testing import random_kv  # noqa: PLC0415
  pol = akv.presets.fixed("kivi2")
  ckv = akv.compress(random_kv(0, b=1, k=2, s=256, h=64), pol, reserve=8)
  k_t = jnp.zeros((1, 2, 64))
  with pytest.raises(ValueError, match="implementation='cuda' is not one of None, 'reference', 'xla', 'pallas'"):
    akv.append(ckv, k_t, k_t, pol, implementation="cuda")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="implementation='pallas' needs a GPU"):
      akv.append(ckv, k_t, k_t, pol, implementation="pallas")
