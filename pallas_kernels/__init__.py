"""Pallas (Triton backend) kernels for attention over compressed KV caches, each beside its plain-jnp reference.

Kernels take plain arrays and never import akv_jax, so they stay testable alone; akv_jax.fused maps a
CompressedKV onto decode_attention and akv.attend(implementation=...) dispatches to it.

  decode_attention   fused split-K decode attention over packed 2/4/8-bit or bf16 bodies, dense or paged
  quantize_pack      group min/max, rounding and bit packing in one pass (KIVI layout)
  quant_reference    the one quantizer reference: codes, packing and the dequantize formula in plain jnp
  prefill_attention  causal flash attention for prefill that also returns SnapKV / H2O attention votes
  lowering           CUDA lowering with the Triton module verified, for CPU-only CI
"""

from pallas_kernels.decode import Format as Format
from pallas_kernels.decode import combine as combine
from pallas_kernels.decode import decode_attention as decode_attention
from pallas_kernels.decode import decode_attention_reference as decode_attention_reference
from pallas_kernels import quant_reference as quant_reference
from pallas_kernels.lowering import lower_for_cuda as lower_for_cuda
from pallas_kernels.prefill_scores import prefill_attention as prefill_attention
from pallas_kernels.prefill_scores import prefill_attention_reference as prefill_attention_reference
from pallas_kernels.quantize import quantize_pack as quantize_pack
from pallas_kernels.quantize import quantize_pack_reference as quantize_pack_reference
