"""Experiment entry points of akv_jax: synthetic KV artifacts, quality benchmarks and config-driven runs."""
