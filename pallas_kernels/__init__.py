"""Pallas (Triton backend) kernels for attention over compressed KV caches.

Empty until the kernels issue lands: fused decode attention over packed 2/4/8-bit caches, fused quantize-and-pack,
and a scoring prefill attention, each beside its plain-jnp reference. Kernels take plain arrays and never import
akv_jax, so they stay testable alone.
"""
