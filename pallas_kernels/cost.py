"""Static cost of a Pallas Triton-backend kernel on sm_90, measured on a machine without a GPU.

A decode kernel that reads a few bytes per token is bound by what each warp issues per token, by register
pressure (spills to local memory) and by whether its dots run on tensor cores. None of that shows in the Pallas
source or the Triton IR, and a GPU is not always at hand, so this module measures it from the compiled code:

  1. capture: lower for CUDA (JAX builds each pallas_call's Triton IR, TTIR, on the CPU) and keep every Triton
     module with its launch parameters;
  2. compile: `triton.compile` of that TTIR for sm_90 with the `triton` wheel (the `kernel-report` extra) and
     its own ptxas;
  3. analyze: registers and stack from `cuobjdump -res-usage`, spill bytes from the ptxas log, the SASS from
     `cuobjdump -sass`, and whether the TTGIR puts the dots on tensor cores (`nvidia_mma` layouts) or on the FMA
     path (dot operands whose parent layout is `#blocked`).

On a GPU, XLA compiles the same TTIR with its own Triton and ptxas, so the counts here are those of the same
module through a nearby compiler, not of the binary that runs: good for comparing kernel designs, not exact.

Loops are the ranges [target, branch] of backward branches in the SASS. The main loop is the innermost one (it
contains no other loop) with the most instructions: a fori_loop over the cache is one such range, and in the
decode kernel the body loop outweighs the bf16 side loops (sinks, window, patch); every loop is reported too, to
check that rule against. Its instructions are counted statically, every one in the range once (as if each
forward branch inside fell through), with never-executed `@!PT` fillers and NOPs set apart as "nop". One trip
is taken to be one step of the caller's `tokens_per_step` tokens, which holds unless ptxas unrolled the loop.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import pathlib
import re
import subprocess
import tempfile

import jax
import triton
from jax.extend import core as jex_core
from triton import knobs
from triton.backends.compiler import GPUTarget

from pallas_kernels import lowering

# The defaults the Triton lowering applies when a pallas_call leaves them unset (pallas_call_registration).
_DEFAULT_NUM_WARPS = 4
_DEFAULT_NUM_STAGES = 3

_SM90 = GPUTarget("cuda", 90, 32)
_BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# Opcode classes of the instruction mix (base opcodes, the mnemonic before its first ".").
_CLASSES = {
    "tensor_core": {"HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BMMA", "DMMA"},
    "fp32_fma": {"FFMA", "FMUL", "FADD"},
    "fp32_other": {"FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FSWZADD"},
    "half": {"HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2"},
    "mufu": {"MUFU"},
    "int_alu": {"IMAD", "IADD3", "IADD", "IMUL", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "ISETP", "IMNMX",
                "VIMNMX", "IABS", "SEL", "SGXT", "BMSK", "POPC", "FLO", "BREV", "VIADD", "IDP", "BFE", "BFI",
                "PLOP3", "VIADDMNMX"},
    "conversion": {"I2F", "F2F", "F2I", "I2I", "F2FP", "I2FP", "F2IP", "PRMT", "FRND"},
    "move": {"MOV", "S2R", "CS2R", "S2UR", "R2UR", "P2R", "R2P"},
    "shuffle": {"SHFL"},
    "global_load": {"LDG"},
    "async_copy": {"LDGSTS"},
    "shared_load": {"LDS", "LDSM"},
    "constant_load": {"LDC"},
    "global_store": {"STG", "RED", "ATOM", "ATOMG"},
    "shared_store": {"STS", "STSM"},
    "spill": {"LDL", "STL"},
    "barrier": {"BAR", "DEPBAR", "LDGDEPBAR", "MEMBAR", "WARPSYNC", "BSSY", "BSYNC", "SYNCS", "ARRIVES", "ERRBAR",
                "CCTL"},
    "control": {"BRA", "BRX", "EXIT", "CALL", "RET", "JMP", "YIELD"},
    "nop": {"NOP"},
}
_CLASS_OF = {op: name for name, ops in _CLASSES.items() for op in ops}
# Memory opcodes are also counted by full mnemonic, which names their kind and width (LDG.E.128, LDS.64, ...).
_MEMORY = _CLASSES["global_load"] | _CLASSES["async_copy"] | _CLASSES["shared_load"] | _CLASSES["global_store"] \
    | _CLASSES["shared_store"] | _CLASSES["spill"]

_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P(?:T|\d+))\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)"
                        r"\s*([^;]*);")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_MMA_VERSION = re.compile(r"nvidia_mma<\{versionMajor = (\d+)")
_FMA_DOT = re.compile(r"dot_op<\{opIdx = \d+, parent = #blocked")


# ------------------------------------------------------------------------------------------------ capture


@dataclasses.dataclass(frozen=True)
class Captured:
  """One pallas_call's Triton module as the CUDA lowering built it, with the launch parameters XLA would use."""

  name: str
  ttir: str
  grid: tuple[int, ...]
  num_warps: int
  num_stages: int


def _pallas_call_params(jaxpr: jex_core.Jaxpr, out: dict[int, dict]) -> dict[int, dict]:
  """Each pallas_call's eqn params under `jaxpr` (nested jaxprs included), keyed by id of its kernel jaxpr:
  that jaxpr is the object the Triton lowering receives, while the compiler params stay behind in the eqn."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      out[id(eqn.params["jaxpr"])] = eqn.params
    for sub in jex_core.jaxprs_in_params(eqn.params):
      _pallas_call_params(sub, out)
  return out


def _launch(params: dict) -> tuple[int, int]:
  """(num_warps, num_stages) of a pallas_call, with the Triton lowering's defaults for the unset ones."""
  compiler = params.get("compiler_params")
  warps = getattr(compiler, "num_warps", None)
  stages = getattr(compiler, "num_stages", None)
  return (_DEFAULT_NUM_WARPS if warps is None else warps, _DEFAULT_NUM_STAGES if stages is None else stages)


@contextlib.contextmanager
def _capturing(params_by_jaxpr: dict[int, dict], out: list[Captured]):
  """Keeps each Triton module the lowering builds (its text is only valid inside that lowering)."""
  from jax._src.pallas.triton import lowering as triton_lowering  # noqa: PLC0415 (internal, may move)

  original = triton_lowering.lower_jaxpr_to_triton_module

  def capturing(jaxpr, *args, **kwargs):
    result = original(jaxpr, *args, **kwargs)
    params = params_by_jaxpr.get(id(jaxpr))
    if params is None:
      raise ValueError(f"the Triton lowering built a module for kernel {jaxpr.debug_info.func_name!r} that is "
                       "not a pallas_call of the traced function")
    warps, stages = _launch(params)
    name = str(result.module.operation.attributes["sym_name"]).strip('"')
    out.append(Captured(name=name, ttir=str(result.module), grid=tuple(int(g) for g in result.grid),
                        num_warps=warps, num_stages=stages))
    return result

  triton_lowering.lower_jaxpr_to_triton_module = capturing
  try:
    yield
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = original


def capture_triton_modules(fn, *args, **kwargs) -> list[Captured]:
  """The Triton modules of every pallas_call in jax.jit(fn)(*args, **kwargs), lowered for CUDA without a GPU.

  Arguments may be jax.ShapeDtypeStruct: only shapes and dtypes reach the lowering. JAX's caches are cleared
  first (jax.clear_caches), since a cached lowering would not run the Triton lowering and capture nothing.
  """
  traced = jax.jit(fn).trace(*args, **kwargs)
  params = _pallas_call_params(traced.jaxpr.jaxpr, {})
  out: list[Captured] = []
  jax.clear_caches()
  with lowering.pinned_gpu_info(), _capturing(params, out):
    traced.lower(lowering_platforms=("cuda",))
  return out


# ------------------------------------------------------------------------------------------------ compile


@dataclasses.dataclass(frozen=True)
class Compiled:
  """A Triton module compiled for sm_90: its TTGIR, PTX, cubin and ptxas's resource log."""

  name: str
  ttgir: str
  ptx: str
  cubin: bytes
  ptxas_log: str


def compile_sm90(ttir: str, num_warps: int, num_stages: int) -> Compiled:
  """Compiles TTIR text for sm_90 with the triton wheel, bypassing its cache so that ptxas runs and logs.

  FMA contraction is on, Triton's default until 3.10 (asked for explicitly, which also keeps 3.9 quiet).
  """
  log = io.StringIO()
  with tempfile.TemporaryDirectory() as tmp, knobs.cache.scope(), knobs.compilation.scope(), \
      knobs.nvidia.scope():
    knobs.cache.dir = tmp
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True   # printed to stdout by the nvidia backend
    path = pathlib.Path(tmp) / "kernel.ttir"
    path.write_text(ttir)
    with contextlib.redirect_stdout(log):
      kernel = triton.compile(str(path), target=_SM90,
                              options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))
  return Compiled(name=kernel.metadata.name, ttgir=kernel.asm["ttgir"], ptx=kernel.asm["ptx"],
                  cubin=kernel.asm["cubin"], ptxas_log=log.getvalue())


def _release(tool: str) -> str:
  """The "release X.Y, VX.Y.Z" part of a CUDA tool's --version."""
  text = subprocess.run([tool, "--version"], check=True, capture_output=True, text=True).stdout
  return re.search(r"release [^\n]*", text)[0]


def toolchain() -> dict[str, str]:
  """Versions of what compile_sm90 and cuobjdump run, for a report's header."""
  from triton.backends.nvidia import compiler as nvidia  # noqa: PLC0415 (the nvidia backend's ptxas choice)

  return dict(triton=triton.__version__, ptxas=_release(nvidia.get_ptxas(_SM90.arch).path),
              cuobjdump=_release(str(_BIN / "cuobjdump")))


def cuobjdump(cubin: bytes, flag: str) -> str:
  """The triton wheel's cuobjdump `flag` (-sass, -res-usage) on a cubin."""
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "kernel.cubin"
    path.write_bytes(cubin)
    return subprocess.run([str(_BIN / "cuobjdump"), flag, str(path)], check=True, capture_output=True,
                          text=True).stdout


# ------------------------------------------------------------------------------------------------ analysis


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One SASS instruction as cuobjdump prints it."""

  address: int
  predicate: str      # "" when unpredicated
  mnemonic: str       # opcode with its modifiers: "LDG.E.128"
  operands: str

  @property
  def opcode(self) -> str:
    return self.mnemonic.split(".")[0]


@dataclasses.dataclass(frozen=True)
class Loop:
  """A backward-branch range of the SASS."""

  start: int          # address of the first instruction (the backward branch's target)
  end: int            # address of the last backward branch to `start`
  instructions: int   # every instruction in [start, end], nops included


def parse_sass(text: str) -> list[Instruction]:
  """Instructions of `cuobjdump -sass` output, in address order; ValueError if there are none."""
  out = []
  for line in text.splitlines():
    m = _SASS_LINE.match(line)
    if m:
      out.append(Instruction(int(m[1], 16), m[2] or "", m[3], m[4].strip()))
  if not out:
    raise ValueError(f"no SASS instructions in cuobjdump output: {text[:200]!r}")
  return out


def classify(instr: Instruction) -> str:
  """Opcode class of one instruction: a key of _CLASSES, "uniform" for the uniform datapath (U*), else "other"."""
  if instr.predicate == "@!PT":
    return "nop"      # never executes: ptxas's scheduling filler
  if instr.opcode in _CLASS_OF:
    return _CLASS_OF[instr.opcode]
  return "uniform" if instr.opcode.startswith("U") else "other"


def _branch_target(instr: Instruction) -> int | None:
  if instr.opcode != "BRA":
    return None
  targets = re.findall(r"0x([0-9a-f]+)", instr.operands)
  return int(targets[-1], 16) if targets else None


def find_loops(instrs: list[Instruction]) -> list[Loop]:
  """Ranges [target, branch] of backward branches (a target before its branch), merged per target, by start."""
  ends: dict[int, int] = {}
  for instr in instrs:
    target = _branch_target(instr)
    if target is not None and target < instr.address:
      ends[target] = max(ends.get(target, 0), instr.address)
  return [Loop(start, end, sum(start <= i.address <= end for i in instrs)) for start, end in sorted(ends.items())]


def main_loop(loops: list[Loop]) -> Loop | None:
  """The innermost loop (containing no other) with the most instructions, the first on a tie; None if no loop."""
  innermost = [a for a in loops
               if not any(b is not a and a.start <= b.start and b.end <= a.end for b in loops)]
  return max(innermost, key=lambda loop: loop.instructions, default=None)


@dataclasses.dataclass(frozen=True)
class Mix:
  """Instruction mix of a range of SASS."""

  instructions: int   # issued: every instruction but the "nop" class
  classes: dict[str, int]
  opcodes: dict[str, int]
  memory: dict[str, int]   # memory instructions by full mnemonic (kind and width)


def instruction_mix(instrs: list[Instruction]) -> Mix:
  """Counts by class (nops included), and by opcode and memory mnemonic (nops left out), most common first."""
  classes = collections.Counter(classify(i) for i in instrs)
  live = [i for i in instrs if classify(i) != "nop"]
  return Mix(instructions=len(live), classes=dict(classes.most_common()),
             opcodes=dict(collections.Counter(i.opcode for i in live).most_common()),
             memory=dict(collections.Counter(i.mnemonic for i in live if i.opcode in _MEMORY).most_common()))


def parse_resource_usage(text: str) -> dict[str, int]:
  """registers, stack, shared and local bytes from `cuobjdump -res-usage`; ValueError if they are missing."""
  m = _RES_USAGE.search(text)
  if not m:
    raise ValueError(f"no REG/STACK/SHARED/LOCAL line in cuobjdump -res-usage output: {text!r}")
  return dict(zip(("registers", "stack", "shared", "local"), map(int, m.groups())))


def parse_ptxas_spills(log: str) -> dict[str, int]:
  """stack frame, spill store and spill load bytes from ptxas's -v log; ValueError if they are missing."""
  m = _PTXAS_SPILLS.search(log)
  if not m:
    raise ValueError(f"no 'bytes spill stores' line in the ptxas log: {log!r}")
  return dict(zip(("stack_frame", "spill_stores", "spill_loads"), map(int, m.groups())))


@dataclasses.dataclass(frozen=True)
class KernelCost:
  """What one compiled kernel costs, per warp and per token.

  Attributes:
    registers, stack_bytes, shared_bytes: per thread / per thread / per program, from cuobjdump -res-usage.
    spill_store_bytes, spill_load_bytes: from the ptxas log (register spills to local memory).
    local_loads, local_stores: LDL / STL instructions in the whole kernel.
    mma: the TTGIR has an nvidia_mma layout (some dot runs on tensor cores); mma_version 2 is mma.sync
      (HMMA), 3 is wgmma (HGMMA).
    fma_dot: some dot's operands have a #blocked parent layout (that dot runs as FMAs).
    loops: every loop found; main_loop: its mix (None for a kernel without loops).
    warp_instructions_per_token_per_kv_head: main-loop instructions per warp x num_warps / (tokens_per_step x
      kv_heads_per_program).
  """

  name: str
  grid: tuple[int, ...]
  num_warps: int
  num_stages: int
  registers: int
  stack_bytes: int
  shared_bytes: int
  spill_store_bytes: int
  spill_load_bytes: int
  local_loads: int
  local_stores: int
  mma: bool
  mma_version: int | None
  fma_dot: bool
  sass_instructions: int
  loops: list[Loop]
  main_loop: Loop | None
  main_loop_mix: Mix | None
  tokens_per_step: int
  kv_heads_per_program: int
  warp_instructions_per_token_per_kv_head: float | None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def kernel_cost(captured: Captured, *, tokens_per_step: int, kv_heads_per_program: int) -> KernelCost:
  """Compiles a captured module for sm_90 and measures it.

  Args:
    captured: from capture_triton_modules.
    tokens_per_step: tokens one trip of the main loop covers, from the kernel's static layout.
    kv_heads_per_program: kv heads one program (one grid point) serves, from the kernel's static layout.
  """
  for name, v in (("tokens_per_step", tokens_per_step), ("kv_heads_per_program", kv_heads_per_program)):
    if v < 1:
      raise ValueError(f"{name}={v} must be >= 1")
  compiled = compile_sm90(captured.ttir, captured.num_warps, captured.num_stages)
  usage = parse_resource_usage(cuobjdump(compiled.cubin, "-res-usage"))
  spills = parse_ptxas_spills(compiled.ptxas_log)
  instrs = parse_sass(cuobjdump(compiled.cubin, "-sass"))
  loops = find_loops(instrs)
  loop = main_loop(loops)
  mix = instruction_mix([i for i in instrs if loop.start <= i.address <= loop.end]) if loop else None
  per_token = (mix.instructions * captured.num_warps / (tokens_per_step * kv_heads_per_program)
               if mix else None)
  mma = _MMA_VERSION.search(compiled.ttgir)
  opcodes = collections.Counter(i.opcode for i in instrs if classify(i) != "nop")
  return KernelCost(
      name=compiled.name, grid=captured.grid, num_warps=captured.num_warps, num_stages=captured.num_stages,
      registers=usage["registers"], stack_bytes=usage["stack"], shared_bytes=usage["shared"],
      spill_store_bytes=spills["spill_stores"], spill_load_bytes=spills["spill_loads"],
      local_loads=opcodes["LDL"], local_stores=opcodes["STL"], mma="nvidia_mma" in compiled.ttgir,
      mma_version=int(mma[1]) if mma else None, fma_dot=_FMA_DOT.search(compiled.ttgir) is not None,
      sass_instructions=sum(opcodes.values()), loops=loops, main_loop=loop, main_loop_mix=mix,
      tokens_per_step=tokens_per_step, kv_heads_per_program=kv_heads_per_program,
      warp_instructions_per_token_per_kv_head=per_token)
