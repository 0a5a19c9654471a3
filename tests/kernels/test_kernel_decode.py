"""pallas_kernels.decode_attention against its plain-jnp reference (interpret mode on CPU, the GPU when present),
and its Triton lowering for CUDA from a CPU-only machine."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode as da
from pallas_kernels import lowering

INTERPRET = jax.default_backend() != "gpu"


def make_inputs(seed, *, b=2, kh=2, g=4, h=64, z=4, m=96, r=40, f=32, fmt=da.Format(), pages=None,
                lengths=None):
  """Random kernel inputs. Codes, scales and mins are random (the kernel only has to decode them like the
  reference); lengths are ragged and, unless given, include an empty body and a full one."""
  rng = np.random.default_rng(seed)
  heads = 1 if fmt.page_size else kh
  rows = pages * fmt.page_size if fmt.page_size else m

  def bf16(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.bfloat16)

  def packed(bits, *shape_rows, scale_shape):
    codes = jnp.asarray(rng.integers(0, 256, size=(*shape_rows, h * bits // 8)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(0.01, 0.3, size=scale_shape), jnp.float16)
    zero = jnp.asarray(rng.normal(size=scale_shape), jnp.float16)
    return codes, scale, zero

  if fmt.key_bits == da.RAW:
    body_k = bf16(b, heads, rows, h)
  else:
    body_k = packed(fmt.key_bits, b, heads, rows, scale_shape=(b, heads, rows // fmt.key_group, h))
    if fmt.key_outliers:   # outlier channels beside the codes, with large values (what they are cut out for)
      body_k = (*body_k, jnp.asarray(rng.normal(size=(b, heads, rows, fmt.key_outliers)) * 8, jnp.bfloat16))
  if fmt.value_bits == da.RAW:
    body_v = bf16(b, heads, rows, h)
  else:
    body_v = packed(fmt.value_bits, b, heads, rows, scale_shape=(b, heads, rows, h // fmt.value_group))
  q = jnp.asarray(rng.normal(size=(b, kh, g, h)) / np.sqrt(h), jnp.float32)
  table = None
  if fmt.page_size:
    per_head = pages // kh
    perm = np.stack([rng.permutation(pages) for _ in range(b)])             # pool pages of each row, shuffled
    table = perm.reshape(b, kh, per_head).astype(np.int32)
    table[0, -1, per_head // 2:] = -1                                      # a head owning fewer pages
    capacity = np.where(table >= 0, 1, 0).sum(-1) * fmt.page_size
    table = jnp.asarray(table)
  else:
    capacity = np.full((b, kh), m)
  if lengths is None:
    sink = rng.integers(0, z + 1, size=(b, 1)).repeat(kh, 1)
    body = rng.integers(0, capacity + 1)
    body[0, 0] = 0
    body[-1, -1] = capacity[-1, -1]
    patch = rng.integers(0, f, size=(b, kh))
    recent = np.minimum(patch + rng.integers(0, r + 1, size=(b, kh)), r)
    patch = np.minimum(patch, recent)
    lengths = np.stack([sink, body, patch, recent], -1)
  q_out = (jnp.asarray(rng.normal(size=(b, kh, g, fmt.key_outliers)) / np.sqrt(h), jnp.float32)
           if fmt.key_outliers else None)
  return dict(q=q, sink_k=bf16(b, kh, z, h), sink_v=bf16(b, kh, z, h), body_k=body_k, body_v=body_v,
              recent_k=bf16(b, kh, r, h), recent_v=bf16(b, kh, r, h), patch_v=bf16(b, kh, f, h),
              lengths=jnp.asarray(lengths, jnp.int32), page_table=table, q_out=q_out)


def run_kernel(inputs, fmt, **kw):
  o, m, l = da.decode_attention(**inputs, fmt=fmt, interpret=INTERPRET, **kw)
  return da.combine(o, m, l, inputs["q"].shape[2])


def tolerance(fmt) -> float:
  """The kernel's error against the f32 reference, relative to the output's largest magnitude, per bit width.

  Quantized bodies meet the dots as f16 (dequantized keys, p * value scale: 2^-11 relative each), which the
  softmax amplifies by the scores' magnitude; 8-bit keys span the widest ranges in these random inputs (outputs
  up to 70). bf16 parts are split into exact halves, so a bf16-only cache is f32-accurate.
  """
  if fmt.key_bits == da.RAW and fmt.value_bits == da.RAW:
    return 1e-5
  return 3e-3 if 8 in (fmt.key_bits, fmt.value_bits) else 1e-3


def check(inputs, fmt, **kw):
  got = np.asarray(run_kernel(inputs, fmt, **kw))
  want = np.asarray(da.decode_attention_reference(**inputs, fmt=fmt))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(fmt) * max(1.0, np.max(np.abs(want))))


CASES = [
    # (key_bits, value_bits, h, g, value_group)
    (2, 2, 128, 4, 32), (4, 4, 64, 8, 32), (8, 8, 128, 1, 32), (2, 4, 64, 4, 16), (4, 2, 128, 8, 64),
    (2, 2, 64, 1, 32), (16, 16, 64, 4, 32), (16, 16, 128, 8, 32), (8, 2, 64, 4, 32), (2, 2, 64, 3, 32),
    (4, 4, 128, 3, 32), (16, 16, 64, 3, 32), (3, 2, 128, 3, 16),
    (3, 3, 128, 4, 32), (2, 3, 128, 8, 64), (3, 3, 256, 4, 32),   # 3-bit values paired (H = 128) and not
]


@pytest.mark.parametrize("kb,vb,h,g,gv", CASES)
def test_dense_body_matches_reference(kb, vb, h, g, gv):
  fmt = da.Format(key_bits=kb, value_bits=vb, value_group=gv, key_group=32)
  inputs = make_inputs(kb * 100 + vb + h + g, h=h, g=g, fmt=fmt, m=160 if kb != 16 else 83, r=40)
  check(inputs, fmt)                                  # 128-slot steps, the last one partial
  check(inputs, fmt, splits=3)                        # more splits than some rows have blocks
  check(inputs, dataclasses.replace(fmt, block=32))   # one key group per step


@pytest.mark.parametrize("kb,vb,h,g,o", [(2, 2, 64, 3, 4), (4, 2, 128, 8, 1), (3, 3, 128, 4, 2), (8, 4, 64, 1, 7)])
def test_outlier_key_channels_match_reference(kb, vb, h, g, o):
  fmt = da.Format(key_bits=kb, value_bits=vb, key_group=32, value_group=32, key_outliers=o)
  inputs = make_inputs(31 + kb + o, h=h, g=g, fmt=fmt, m=160, r=40)
  check(inputs, fmt)
  check(inputs, fmt, splits=3)
  # The outlier term is really read: without it the reference differs.
  plain = dataclasses.replace(fmt, key_outliers=0)
  without = da.decode_attention_reference(**{**inputs, "body_k": inputs["body_k"][:3], "q_out": None}, fmt=plain)
  assert np.max(np.abs(np.asarray(without) - np.asarray(run_kernel(inputs, fmt)))) > 0.05


@pytest.mark.parametrize("kb,vb,h,g,q,o", [(2, 2, 128, 4, 32, 0), (4, 4, 64, 8, 16, 0), (16, 16, 64, 1, 16, 0),
                                             (8, 4, 128, 4, 32, 0), (3, 3, 128, 4, 32, 0), (2, 2, 64, 3, 32, 4)])
def test_paged_body_matches_reference(kb, vb, h, g, q, o):
  fmt = da.Format(key_bits=kb, value_bits=vb, key_group=q, value_group=16, page_size=q, key_outliers=o)
  inputs = make_inputs(7 + kb + q, h=h, g=g, fmt=fmt, pages=8, r=33)
  check(inputs, fmt)
  check(inputs, fmt, splits=2)


def test_long_recent_buffer_and_empty_rows():
  fmt = da.Format(key_bits=16, value_bits=16)
  lengths = np.array([[[0, 0, 0, 0], [4, 0, 0, 300]], [[1, 0, 0, 77], [4, 0, 0, 131]]])
  inputs = make_inputs(3, m=32, r=300, f=1, fmt=fmt, lengths=lengths)
  got = np.asarray(run_kernel(inputs, fmt, splits=4))
  np.testing.assert_array_equal(got[0, 0], 0.0)    # nothing to attend to: zeros, not NaN
  check(inputs, fmt, splits=4)


def test_every_split_written():
  """Poison: the real query rows of every (row, head, split) are finite and the unused splits carry no mass."""
  fmt = da.Format(key_bits=2, value_bits=2, block=32)
  inputs = make_inputs(11, m=256, r=30, f=16, fmt=fmt)
  o, m, l = da.decode_attention(**inputs, fmt=fmt, splits=4, interpret=INTERPRET)
  g = inputs["q"].shape[2]
  assert np.all(np.isfinite(np.asarray(o)[..., :g, :])) and np.all(np.isfinite(np.asarray(m)))
  body = np.asarray(inputs["lengths"])[..., 1]
  # Split s of a head sees body blocks [2s, 2s + 2) (8 blocks / 4 splits); the one recent block goes to split 0.
  for s in range(1, 4):
    empty = body <= 2 * s * 32
    np.testing.assert_array_equal(np.asarray(l)[:, :, s][empty], 0.0)


def test_default_splits_from_occupancy():
  fmt = da.Format(key_bits=2, value_bits=2)
  assert da.default_splits(fmt, 16384, 8 * 8) == 4     # 64 programs: 4 splits fill 256 of 264 CTA slots
  assert da.default_splits(fmt, 16384, 32 * 8) == 1    # already 97% of one wave
  assert da.default_splits(fmt, 256, 1) == 1           # 2 blocks: no split leaves 2 blocks each
  waves = lambda s: 64 * s / 264                       # noqa: E731
  s = da.default_splits(fmt, 16384, 64)
  assert waves(s) / np.ceil(waves(s)) >= 0.85 * max(waves(t) / np.ceil(waves(t)) for t in range(1, 65))


@pytest.mark.parametrize("kb,vb,h,paged,o", [(2, 2, 128, False, 0), (4, 4, 64, True, 0), (8, 8, 64, False, 0),
                                               (16, 16, 128, True, 0), (2, 4, 64, False, 0), (3, 3, 128, False, 0),
                                               (2, 2, 64, False, 4), (2, 2, 64, True, 4)])
def test_lowers_for_cuda(kb, vb, h, paged, o):
  q_size = 32 if kb != 16 else 16
  fmt = da.Format(key_bits=kb, value_bits=vb, value_group=32, page_size=q_size if paged else 0, key_outliers=o)
  inputs = make_inputs(0, h=h, fmt=fmt, pages=8 if paged else None)
  text = lowering.lower_for_cuda(lambda kw: da.decode_attention(**kw, fmt=fmt), inputs)
  assert "__gpu$xla.gpu.triton" in text


def test_errors():
  fmt = da.Format(key_bits=2, value_bits=2)
  inputs = make_inputs(0, fmt=fmt)
  with pytest.raises(ValueError, match="key_bits=5 is not supported"):
    da.Format(key_bits=5)
  with pytest.raises(ValueError, match="head dim H=64 is too small for key_bits=3: each of the 8 packed"):
    da.decode_attention(**make_inputs(0, h=64, fmt=da.Format(key_bits=3, value_bits=3)),
                        fmt=da.Format(key_bits=3, value_bits=3), interpret=True)
  with pytest.raises(ValueError, match="key_group=24 must be a power of 2"):
    da.Format(key_group=24)
  with pytest.raises(ValueError, match="page_size=8 must be a power of 2 >= 16"):
    da.Format(page_size=8)
  with pytest.raises(ValueError, match="page_size=16 must equal key_group=32"):
    da.Format(key_bits=2, page_size=16)
  with pytest.raises(ValueError, match=r"q must be \[B, K, G, H\]"):
    da.decode_attention(**{**inputs, "q": inputs["q"][0]}, fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match="head dim H=32 is too small for key_bits=2"):
    small = make_inputs(0, h=32, fmt=da.Format(key_bits=4, value_bits=4))
    da.decode_attention(**small, fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match=r"lengths must be i32\[B=2, K=2, 4\]"):
    da.decode_attention(**{**inputs, "lengths": inputs["lengths"][..., :3]}, fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match="page_table is missing but page_size=32"):
    da.decode_attention(**inputs, fmt=da.Format(key_bits=2, value_bits=2, page_size=32), interpret=True)
  with pytest.raises(ValueError, match="splits=0 must be >= 1"):
    da.decode_attention(**inputs, fmt=fmt, splits=0, interpret=True)
  with pytest.raises(ValueError, match="side_block=24 must be a power of 2"):
    da.decode_attention(**inputs, fmt=fmt, side_block=24, interpret=True)
  with pytest.raises(ValueError, match="body capacity 80 is not a multiple of key_group=32"):
    da.decode_attention(**make_inputs(0, m=80, fmt=fmt), fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match=r"body value must be \[B=2, 2, ...\], got shape \(2, 1, 96, 16\)"):
    da.decode_attention(**{**inputs, "body_v": tuple(x[:, :1] for x in inputs["body_v"])}, fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match=r"body key must be \[B=2, 2, ...\]"):
    da.decode_attention(**{**inputs, "body_k": tuple(x[:, :1] for x in inputs["body_k"])}, fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match=r"sink_k must be \[B=2, K=2, \*, H=64\], got shape \(2, 2, 4, 32\)"):
    da.decode_attention(**{**inputs, "sink_k": inputs["sink_k"][..., :32]}, fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match="G=256 query heads per kv head is more than this kernel handles"):
    da.decode_attention(**{**inputs, "q": jnp.zeros((2, 2, 256, 64))}, fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match="head dim H=96 must be a power of 2"):
    da.decode_attention(**{**inputs, "q": jnp.zeros((2, 2, 4, 96))}, fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match="key_outliers=2 must be >= 0, and 0 for bf16 keys"):
    da.Format(key_outliers=2)
  ofmt = da.Format(key_bits=2, value_bits=2, key_outliers=3)
  oin = make_inputs(0, fmt=ofmt)
  with pytest.raises(ValueError, match=r"body_k must be \(body key, body key scale, body key zero, body key "
                                       r"outliers\) for key_bits=2, key_outliers=3; got 3 arrays"):
    da.decode_attention(**{**oin, "body_k": oin["body_k"][:3]}, fmt=ofmt, interpret=True)
  with pytest.raises(ValueError, match=r"body key outliers must be \[..., O=3\], got shape \(2, 2, 96, 2\)"):
    da.decode_attention(**{**oin, "body_k": (*oin["body_k"][:3], oin["body_k"][3][..., :2])}, fmt=ofmt,
                        interpret=True)
  with pytest.raises(ValueError, match=r"key_outliers=3 needs q_out f32\[B=2, K=2, G=4, O=3\], got None"):
    da.decode_attention(**{**oin, "q_out": None}, fmt=ofmt, interpret=True)
  with pytest.raises(ValueError, match=r"q_out is given but the format has no outlier key channels"):
    da.decode_attention(**{**inputs, "q_out": oin["q_out"]}, fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match="head dim H=64 is not a multiple of value_group=128"):
    da.decode_attention(**inputs, fmt=da.Format(key_bits=2, value_bits=8, value_group=128), interpret=True)
  with pytest.raises(ValueError, match="page_table is given but page_size=0"):
    da.decode_attention(**{**inputs, "page_table": jnp.zeros((2, 2, 3), jnp.int32)}, fmt=fmt, interpret=True)
  paged = da.Format(key_bits=2, value_bits=2, page_size=32)
  pin = make_inputs(0, fmt=paged, pages=8)
  with pytest.raises(ValueError, match=r"page_table must be i32\[B=2, K=2, P_max\], got shape \(2, 1, 4\)"):
    da.decode_attention(**{**pin, "page_table": pin["page_table"][:, :1]}, fmt=paged, interpret=True)
