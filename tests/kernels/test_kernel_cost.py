"""pallas_kernels.cost: capturing Triton modules on a CPU, parsing SASS, and compiling tiny kernels for sm_90.

Needs the triton wheel (the kernel-report extra) for its compiler, ptxas and cuobjdump; no GPU.
"""

import json
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

pytest.importorskip("triton", reason="pallas_kernels.cost needs the triton wheel: pip install -e '.[kernel-report]'")

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from experiments import kernel_report  # noqa: E402
from pallas_kernels import cost, lowering  # noqa: E402

BF16_16x16 = jax.ShapeDtypeStruct((16, 16), jnp.bfloat16)


def _dot_call(**compiler):
  def kernel(x_ref, y_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], y_ref[...], preferred_element_type=jnp.float32)

  def f(x, y):
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32), grid=(1,),
                          name="tiny_dot", compiler_params=plgpu.CompilerParams(**compiler))(x, y)
  return f


def _loop_call(x, y, n):
  """acc += x[16 i : 16 i + 16] @ y for i < n[0]: a loop whose trip count is only known at run time."""
  def kernel(x_ref, y_ref, n_ref, o_ref):
    def body(i, acc):
      return acc + jnp.dot(x_ref[pl.ds(i * 16, 16), :], y_ref[...], preferred_element_type=jnp.float32)
    o_ref[...] = jax.lax.fori_loop(0, n_ref[0], body, jnp.zeros((16, 16), jnp.float32))

  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32), grid=(1,),
                        name="tiny_loop", compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))(x, y, n)


def test_capture_returns_one_module_per_pallas_call_each_time():
  f = _dot_call(num_warps=2, num_stages=1)
  for _ in range(2):   # the second lowering would be a cache hit without jax.clear_caches
    (mod,) = cost.capture_triton_modules(f, BF16_16x16, BF16_16x16)
    assert (mod.name, mod.grid, mod.num_warps, mod.num_stages) == ("tiny_dot", (1,), 2, 1)
    assert "tt.dot" in mod.ttir and "tt.func public @tiny_dot" in mod.ttir


def test_capture_applies_the_triton_lowering_defaults():   # for num_warps and num_stages left unset
  (mod,) = cost.capture_triton_modules(_dot_call(), BF16_16x16, BF16_16x16)
  assert (mod.num_warps, mod.num_stages) == (4, 3)


def test_capture_rejects_a_module_of_no_traced_pallas_call():
  traced = jax.jit(_dot_call()).trace(BF16_16x16, BF16_16x16)
  with pytest.raises(ValueError, match="'tiny_dot' that is not a pallas_call of the traced function"):
    with cost._capturing({}, []):
      traced.lower(lowering_platforms=("cuda",))


def test_pinned_gpu_info_answers_the_lookup_and_restores_it(monkeypatch):
  # JAX 0.10.2 has no GPU-info lookup in its Triton lowering; stand one in as newer JAX has it.
  from jax._src.pallas.triton import pallas_call_registration  # noqa: PLC0415

  def no_gpu():
    raise ValueError("Unsupported GPU device kind: cpu")

  info_lib = types.SimpleNamespace(get_gpu_info=no_gpu, get_gpu_info_from_version=lambda v: ("info", v),
                                   GpuVersion=types.SimpleNamespace(H200="H200"))
  monkeypatch.setattr(pallas_call_registration, "gpu_info_lib", info_lib, raising=False)
  with lowering.pinned_gpu_info():
    assert info_lib.get_gpu_info() == ("info", "H200")
  assert info_lib.get_gpu_info is no_gpu


# Hand-written in cuobjdump -sass's format: an outer loop [0x30, 0x120] around an inner one [0x50, 0xf0], a loop
# [0x130, 0x160] closed by two backward branches, forward branches, a never-executed @!PT filler and the
# self-branch after EXIT.
SASS = """
	code for sm_90a
		Function : fixture
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
                                                                                   /* 0x000fe20000000800 */
        /*0010*/              @!PT LDS RZ, [RZ] ;                                  /* 0x00000000fffff984 */
                                                                                   /* 0x000fe20000000800 */
        /*0020*/               @P3 BRA 0x170 ;                                     /* 0x0000000000007947 */
        /*0030*/                   IMAD.WIDE.U32 R4, R0, 0x10, R2 ;                /* 0x0000001000047825 */
        /*0040*/                   LDG.E.128 R8, desc[UR4][R4.64] ;                /* 0x0000000404087981 */
        /*0050*/                   LDS.64 R12, [R3] ;                              /* 0x00000000030c7984 */
        /*0060*/                   HMMA.16816.F32.BF16 R16, R8, R12, R16 ;         /* 0x0000000c0810723c */
        /*0070*/                   FFMA R20, R21, R22, R20 ;                       /* 0x0000001615147223 */
        /*0080*/                   LOP3.LUT R6, R6, 0xf, RZ, 0xc0, !PT ;           /* 0x0000000f06067812 */
        /*0090*/                   I2F.U16 R7, R6 ;                                /* 0x0000000600077306 */
        /*00a0*/                   PRMT R7, R7, 0x5410, R6 ;                       /* 0x0000541007077816 */
        /*00b0*/                   STL [R1], R20 ;                                 /* 0x0000001401007387 */
        /*00c0*/                   LDL R20, [R1] ;                                 /* 0x0000000001147983 */
        /*00d0*/                   ISETP.GE.AND P0, PT, R6, 0x4, PT ;              /* 0x000000040600780c */
        /*00e0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                   /* 0x0000000000007b1d */
        /*00f0*/              @!P0 BRA 0x50 ;                                      /* 0xffffffffff548947 */
        /*0100*/                   IADD3 R0, R0, 0x1, RZ ;                         /* 0x0000000100007810 */
        /*0110*/                   ISETP.GE.AND P1, PT, R0, 0x8, PT ;              /* 0x000000080000780c */
        /*0120*/              @!P1 BRA 0x30 ;                                      /* 0xffffffff00c09947 */
        /*0130*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;    /* 0x0000000004027fae */
        /*0140*/                   ISETP.NE.AND P2, PT, R0, RZ, PT ;               /* 0x000000ff0000720c */
        /*0150*/               @P2 BRA 0x130 ;                                     /* 0xfffffffc00f42947 */
        /*0160*/               @P5 BRA 0x130 ;                                     /* 0xfffffffc00f05947 */
        /*0170*/                   STG.E desc[UR4][R4.64], R16 ;                   /* 0x0000001004007986 */
        /*0180*/                   EXIT ;                                          /* 0x000000000000794d */
        /*0190*/                   BRA 0x190;                                      /* 0xfffffffc00fc7947 */
"""


def test_sass_parser_finds_loops_and_counts_opcode_classes():
  instrs = cost.parse_sass(SASS)
  assert len(instrs) == 26 and instrs[1].predicate == "@!PT" and instrs[6].mnemonic == "HMMA.16816.F32.BF16"
  loops = cost.find_loops(instrs)
  assert [(hex(lp.start), hex(lp.end), lp.instructions) for lp in loops] == [
      ("0x30", "0x120", 16), ("0x50", "0xf0", 11), ("0x130", "0x160", 4)]
  main = cost.main_loop(loops)
  assert (main.start, main.end) == (0x50, 0xf0)   # innermost: the outer loop has more instructions
  mix = cost.instruction_mix([i for i in instrs if main.start <= i.address <= main.end])
  assert mix.instructions == 11
  assert mix.classes == {"int_alu": 2, "conversion": 2, "spill": 2, "shared_load": 1, "tensor_core": 1,
                         "fp32_fma": 1, "barrier": 1, "control": 1}
  assert mix.memory == {"LDS.64": 1, "STL": 1, "LDL": 1}
  whole = cost.instruction_mix(instrs)
  assert whole.classes["nop"] == 1 and whole.instructions == 25
  assert whole.memory["LDG.E.128"] == 1 and whole.memory["LDGSTS.E.BYPASS.128"] == 1
  assert cost.main_loop([]) is None


def test_parsers_name_what_they_could_not_read():
  with pytest.raises(ValueError, match="no SASS instructions in cuobjdump output: 'garbage'"):
    cost.parse_sass("garbage")
  with pytest.raises(ValueError, match="no REG/STACK/SHARED/LOCAL line in cuobjdump -res-usage output: 'x'"):
    cost.parse_resource_usage("x")
  with pytest.raises(ValueError, match="no 'bytes spill stores' line in the ptxas log: 'y'"):
    cost.parse_ptxas_spills("y")
  usage = " Function f:\n  REG:255 STACK:248 SHARED:1024 LOCAL:0 CONSTANT[0]:672 TEXTURE:0\n"
  assert cost.parse_resource_usage(usage) == dict(registers=255, stack=248, shared=1024, local=0)
  log = "    248 bytes stack frame, 816 bytes spill stores, 800 bytes spill loads\n"
  assert cost.parse_ptxas_spills(log) == dict(stack_frame=248, spill_stores=816, spill_loads=800)


@pytest.mark.parametrize("name", ["tokens_per_step", "kv_heads_per_program"])
def test_kernel_cost_rejects_a_step_layout_below_one(name):
  layout = {"tokens_per_step": 16, "kv_heads_per_program": 1, name: 0}
  with pytest.raises(ValueError, match=f"{name}=0 must be >= 1"):
    cost.kernel_cost(cost.Captured("k", "", (1,), 4, 3), **layout)


def test_a_tiny_bf16_dot_compiles_to_tensor_cores_without_spills():
  (mod,) = cost.capture_triton_modules(_dot_call(num_warps=4, num_stages=2), BF16_16x16, BF16_16x16)
  c = cost.kernel_cost(mod, tokens_per_step=16, kv_heads_per_program=1)
  assert c.name == "tiny_dot" and c.mma and c.mma_version == 2 and not c.fma_dot
  assert c.spill_store_bytes == c.spill_load_bytes == c.stack_bytes == c.local_loads == c.local_stores == 0
  assert 0 < c.registers <= 255 and c.main_loop is None and c.warp_instructions_per_token_per_kv_head is None
  json.dumps(c.to_dict())


def test_the_main_loop_of_a_dot_loop_is_counted_per_token():
  x = jax.ShapeDtypeStruct((64, 16), jnp.bfloat16)
  (mod,) = cost.capture_triton_modules(_loop_call, x, BF16_16x16, jax.ShapeDtypeStruct((1,), jnp.int32))
  c = cost.kernel_cost(mod, tokens_per_step=16, kv_heads_per_program=2)
  assert c.main_loop is not None and c.main_loop_mix.classes["tensor_core"] >= 1
  assert c.warp_instructions_per_token_per_kv_head == c.main_loop_mix.instructions * 4 / (16 * 2)


def test_kernel_report_writes_a_row_per_kernel_with_the_baseline(tmp_path):
  result = kernel_report.main(["--out", str(tmp_path), "--seq", "2048", "--batch", "1", "--policies", "hybrid_8x"])
  saved = json.loads((tmp_path / "report.json").read_text())
  assert [r["policy"] for r in saved["rows"]] == ["hybrid_8x", "jax_pallas_gqa"]
  ours, gqa = result["rows"]
  assert ours["name"] == "akv_decode_attention" and ours["main_loop_mix"]["instructions"] > 0
  assert gqa["mma"] and gqa["tokens_per_step"] == 2048 // kernel_report.GQA_SPLITS
  assert saved["meta"]["toolchain"]["triton"] and "| hybrid_8x | akv_decode_attention |" in (
      tmp_path / "report.md").read_text()


def test_kernel_report_records_a_baseline_that_does_not_lower(monkeypatch):
  def fail(*args, **kwargs):
    raise ValueError("no Triton lowering for this\nsecond line")

  monkeypatch.setattr(kernel_report.cost, "capture_triton_modules", fail)
  rows = kernel_report.gqa_rows(b=1, s=1024)
  assert rows == [dict(policy="jax_pallas_gqa", error="failed: ValueError: no Triton lowering for this")]
  from jax.experimental.pallas.ops import gpu as jax_gpu_ops  # noqa: PLC0415

  monkeypatch.delattr(jax_gpu_ops, "decode_attention", raising=False)   # as in a JAX that dropped the module
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.ops.gpu.decode_attention", None)
  (row,) = kernel_report.gqa_rows(b=1, s=1024)
  assert row["error"].startswith("unavailable: ")
  meta = dict(command="c", seq=1024, batch=1, jax="j", jaxlib="j", machine="m", seconds=0.0,
              toolchain=dict(triton="t", ptxas="p", cuobjdump="o"))
  assert "| jax_pallas_gqa | unavailable: " in kernel_report.markdown(dict(meta=meta, rows=[row]))
