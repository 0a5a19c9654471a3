"""akv-jax: KV-cache compression for long-context LLM inference, as pure pytree transforms.

Axis legend, used in every shape in this package:
  B batch, T query tokens, S key/value tokens (cache length), N query heads, K kv heads, G = N / K query heads
  per kv head, H head dim, D model dim, P pages, C compressed slots (M body slots and R recent slots per head,
  Z sink tokens, Q slots per page).

Typical use:

    import akv_jax as akv
    kv = akv.DenseKV(k=k, v=v, lengths=lengths)        # k, v: [B, K, S, H]; lengths: i32[B]
    policy = akv.presets.get("hybrid_8x")
    ckv = akv.compress(kv, policy, queries=q_obs, layer=0, num_layers=32)
    out = akv.attend(q, ckv)                           # q: [B, N, H] -> [B, N, H]
    ckv = akv.append(ckv, k_t, v_t, policy)            # k_t, v_t: [B, K, H]
    out, ckv = akv.extend(q_t, k_t, v_t, ckv, policy)  # T tokens: q_t [B, N, T, H], k_t, v_t [B, K, T, H]
"""

from akv_jax import bit_allocation as bit_allocation
from akv_jax import decode_rules as decode_rules
from akv_jax import metrics as metrics
from akv_jax import policy as policy
from akv_jax import presets as presets
from akv_jax import ratios as ratios
from akv_jax import selection as selection
from akv_jax.attention import attend as attend
from akv_jax.attention import dense_attention as dense_attention
from akv_jax.cache import CompressedKV as CompressedKV
from akv_jax.cache import DenseKV as DenseKV
from akv_jax.cache import QuantizedTensor as QuantizedTensor
from akv_jax.cache import compression_ratio as compression_ratio
from akv_jax.cache import dense_bf16_bytes as dense_bf16_bytes
from akv_jax.cache import nbytes as nbytes
from akv_jax.checks import checked as checked
from akv_jax.decode import append as append
from akv_jax.decode import observe as observe
from akv_jax.extend import extend as extend
from akv_jax.metrics import layer_stats as layer_stats
from akv_jax.pipeline import compress as compress
from akv_jax.pipeline import compress_layers as compress_layers
from akv_jax.pipeline import decompress as decompress
from akv_jax.policy import Guards as Guards
from akv_jax.policy import Layout as Layout
from akv_jax.policy import Policy as Policy
from akv_jax.pooled import PooledCache as PooledCache
from akv_jax.quant import QuantSpec as QuantSpec
from akv_jax.quant import dequantize as dequantize
from akv_jax.quant import pack as pack
from akv_jax.quant import quantize as quantize
from akv_jax.quant import unpack as unpack

__version__ = "0.1.0"
