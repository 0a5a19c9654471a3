"""Quantization: error bounds, exact packing, constant groups, padding never entering min/max."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import akv_jax as akv
from akv_jax.quant import QuantSpec
from akv_jax.testing import random_kv, random_queries


def _step(qt, axis):
  red = -2 if axis == "channel" else -1
  return jnp.repeat(qt.scale.astype(jnp.float32), qt.group, axis=red)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_error_within_half_step(bits, axis):
  x = jax.random.normal(jax.random.key(bits), (2, 3, 64, 64)) * 4 + 1
  x = x.at[..., 5].multiply(30.0)  # an outlier channel
  spec = QuantSpec(bits=bits, group=16, axis=axis)
  qt = akv.quantize(x, spec)
  err = jnp.abs(akv.dequantize(qt) - x)
  step = _step(qt, axis)
  # Half a step of the stored f16 scale, plus f32 rounding of the dequantization itself.
  assert bool(jnp.all(err <= 0.5 * step + 1e-5 * (1 + jnp.abs(x))))
  assert qt.codes.dtype == jnp.uint8 and qt.codes.shape[-1] == 64 * bits // 8
  assert qt.scale.dtype == jnp.float16


def test_channel_groups_isolate_outlier_channels():
  x = jax.random.normal(jax.random.key(0), (1, 32, 16))
  x = x.at[:, :, 3].multiply(100.0)
  per_channel = akv.dequantize(akv.quantize(x, QuantSpec(bits=2, group=32, axis="channel")))
  per_token = akv.dequantize(akv.quantize(x, QuantSpec(bits=2, group=16, axis="token")))
  normal = np.arange(16) != 3
  err_c = float(jnp.abs(per_channel - x)[..., normal].mean())
  err_t = float(jnp.abs(per_token - x)[..., normal].mean())
  assert err_c < err_t / 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_constant_group_is_exact_and_finite(bits):
  x = jnp.full((2, 32, 8), 3.3)
  x = x.at[1].set(0.0)
  for axis, group in (("channel", 32), ("token", 8)):
    out = akv.dequantize(akv.quantize(x, QuantSpec(bits=bits, group=group, axis=axis)))
    assert not bool(jnp.any(jnp.isnan(out)))
    np.testing.assert_allclose(out, x, rtol=1e-6)


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_padded_tokens_never_enter_min_max(axis):
  x = jax.random.normal(jax.random.key(1), (1, 32, 16))
  valid = jnp.arange(32)[None, :] < 20
  spec = QuantSpec(bits=2, group=16 if axis == "token" else 32, axis=axis)
  a = akv.quantize(x, spec, valid)
  b = akv.quantize(jnp.where(valid[..., None], x, 1e4), spec, valid)
  for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(la, lb)
  rows = akv.dequantize(a)[0, :20]
  assert float(jnp.max(jnp.abs(rows - x[0, :20]))) < 3.0  # the 1e4 pads would have made this ~1e3


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), width=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_pack_unpack_bijective(bits, rows, width, seed):
  h = width * (8 // bits if bits != 3 else 8)
  codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, h), dtype=np.uint8)
  packed = akv.pack(jnp.asarray(codes), bits)
  assert packed.shape == (rows, h * bits // 8)
  np.testing.assert_array_equal(akv.unpack(packed, bits), codes)
  # Bijective: packing is also onto every byte pattern.
  raw = np.random.default_rng(seed + 1).integers(0, 256, size=(rows, h * bits // 8), dtype=np.uint8)
  np.testing.assert_array_equal(akv.pack(akv.unpack(jnp.asarray(raw), bits), bits), raw)


def test_packing_layout_sub_blocks_are_contiguous_head_dims():
  codes = jnp.arange(16, dtype=jnp.uint8)[None] % 4   # 2-bit, H = 16, 4 codes per byte
  packed = akv.pack(codes, 2)
  # Byte j holds elements j, j + 4, j + 8, j + 12 in bit pairs 0-1, 2-3, 4-5, 6-7.
  expect = [int(codes[0, j]) | int(codes[0, j + 4]) << 2 | int(codes[0, j + 8]) << 4 | int(codes[0, j + 12]) << 6
            for j in range(4)]
  np.testing.assert_array_equal(packed[0], expect)


def test_three_bit_codes_are_two_planes_read_as_contiguous_sub_blocks():
  """3 bits: a 2-bit plane (H/4 bytes) then a 1-bit plane (H/8 bytes); sub_blocks gives 8 head-dim ranges of H/8."""
  from pallas_kernels import quant_reference as ref
  codes = (jnp.arange(16, dtype=jnp.uint8)[None] * 5) % 8   # H = 16
  packed = akv.pack(codes, 3)
  assert packed.shape == (1, 6)
  np.testing.assert_array_equal(packed[0, :4], akv.pack(codes & 3, 2)[0])
  np.testing.assert_array_equal(packed[0, 4:], [sum(int(codes[0, 2 * i + j] >> 2) << i for i in range(8))
                                                for j in range(2)])
  subs = ref.sub_blocks(packed, 3)
  assert len(subs) == 8 and all(s.shape == (1, 2) for s in subs)
  np.testing.assert_array_equal(jnp.concatenate(subs, axis=-1), codes)
  with pytest.raises(ValueError, match="last axis 12 must be a multiple of 8 to pack 3-bit codes"):
    akv.pack(jnp.zeros((12,), jnp.uint8), 3)
  with pytest.raises(ValueError, match="3-bit codes are not byte-aligned"):
    ref.codes_per_byte(3)


def test_three_bit_caches_on_every_path():
  """compress, append, the XLA path, the fused kernel (H = 128: each of the 8 sub-blocks fills a 16-wide dot) and
  the quantize-and-pack kernel read and write the two planes; at H = 64 the kernel says why it cannot."""
  kv = random_kv(0, b=2, k=2, s=128, h=128, lengths=(128, 100), dtype=jnp.bfloat16)
  q = random_queries(1, b=2, n=4, t=None, h=128, dtype=jnp.bfloat16)
  pol = akv.Policy(key_bits=3, value_bits=3, recent=16)
  ckv = akv.compress(kv, pol, reserve=8)
  assert ckv.body_k.codes.shape[-1] == 48 and ckv.body_k.bits == 3
  ckv = akv.append(ckv, kv.k[:, :, 0], kv.v[:, :, 0], pol)
  want = np.asarray(akv.attend(q, ckv, implementation="reference"), np.float32)
  for impl in ("xla", "pallas"):
    got = np.asarray(akv.attend(q, ckv, implementation=impl, interpret=True), np.float32)
    np.testing.assert_allclose(got, want, atol=2e-2)
  spec = QuantSpec(bits=3, group=32, axis="channel")
  for a, b in zip(jax.tree_util.tree_leaves(akv.quantize(kv.k, spec, implementation="pallas", interpret=True)),
                  jax.tree_util.tree_leaves(akv.quantize(kv.k, spec))):
    np.testing.assert_array_equal(a, b)
  small = akv.compress(random_kv(0, b=1, k=2, s=128, h=64, dtype=jnp.bfloat16), pol)
  with pytest.raises(ValueError, match=r"head dim 64 is too small for the Pallas kernel with 3-bit keys \(each of "
                                       r"the 8 packed sub-blocks needs >= 16 channels\)"):
    akv.attend(random_queries(1, b=1, n=4, t=None, h=64, dtype=jnp.bfloat16), small, implementation="pallas",
               interpret=True)


def test_rounding_is_half_up():
  # Values exactly half way between two levels round up, the rule a Triton kernel shares.
  x = jnp.array([[0.0], [0.5], [1.0], [3.0]]).repeat(4, axis=1)[None]   # [1, 4, 4], token groups of 4
  qt = akv.quantize(jnp.swapaxes(x, -1, -2), QuantSpec(bits=2, group=4, axis="token"))
  np.testing.assert_array_equal(akv.unpack(qt.codes, 2)[0, 0], [0, 1, 1, 3])


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=5), "bits=5 is not supported"),
    (dict(bits=2, group=0), "group=0 must be >= 1"),
    (dict(bits=2, axis="row"), "axis='row'"),
])
def test_spec_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**kwargs)


def test_shape_errors():
  with pytest.raises(ValueError, match="token axis 30 is not a multiple of the key group 32"):
    akv.quantize(jnp.zeros((30, 8)), QuantSpec(bits=2, group=32, axis="channel"))
  with pytest.raises(ValueError, match="head dim 8 is not a multiple of the value group 32"):
    akv.quantize(jnp.zeros((30, 8)), QuantSpec(bits=2, group=32, axis="token"))
  with pytest.raises(ValueError, match="last axis 6 must be a multiple of 4"):
    akv.pack(jnp.zeros((6,), jnp.uint8), 2)
  with pytest.raises(ValueError, match="bits=5 is not supported"):
    akv.unpack(jnp.zeros((6,), jnp.uint8), 5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_path_reads_codes_with_the_one_dequantize_formula(bits):
  """akv.dequantize is the formula (x = code * scale + zero, pallas_kernels.quant_reference.dequantize), which the
  decode kernel's reference calls; the chunked XLA path and the body readers mirror it, and must give the same
  numbers from the same QuantizedTensor."""
  from akv_jax import body as _body
  from akv_jax import chunked
  from pallas_kernels import decode as kernel_decode
  b, kh, s, h, group = 2, 2, 64, 32, 16
  x = jax.random.normal(jax.random.key(bits), (b, kh, s, h), jnp.float32) * 3 + 1
  keys = akv.quantize(x, akv.QuantSpec(bits=bits, group=group, axis="channel"))
  values = akv.quantize(x, akv.QuantSpec(bits=bits, group=group, axis="token"))
  for qt, axis in ((keys, 2), (values, 3)):
    want = np.asarray(akv.dequantize(qt))
    np.testing.assert_allclose(np.asarray(kernel_decode._dequant((qt.codes, qt.scale, qt.zero), bits, group, axis)),
                               want, rtol=1e-6, atol=1e-6)
  # The chunked path never materializes the body; one-hot queries and probabilities read it back exactly.
  eye_q = jnp.broadcast_to(jnp.eye(h, dtype=jnp.float32), (b, kh, h, h))
  got_k = jnp.swapaxes(chunked._scores(eye_q, keys, 0, s), -1, -2)
  np.testing.assert_allclose(np.asarray(got_k), np.asarray(akv.dequantize(keys)), rtol=1e-6, atol=1e-6)
  eye_p = jnp.broadcast_to(jnp.eye(s, dtype=jnp.float32), (b, kh, s, s))
  got_v = chunked._mix(eye_p, values, 0, s)
  np.testing.assert_allclose(np.asarray(got_v), np.asarray(akv.dequantize(values)), rtol=1e-6, atol=1e-6)
  ckv = akv.compress(akv.DenseKV(k=x.astype(jnp.bfloat16), v=x.astype(jnp.bfloat16), lengths=jnp.array([s, s])),
                     akv.Policy(key_bits=bits, value_bits=bits, key_group=group, value_group=group, recent=0))
  np.testing.assert_allclose(np.asarray(_body.dequantize_heads(ckv, ckv.body_v)),
                             np.asarray(akv.dequantize(ckv.body_v)), rtol=0, atol=0)
