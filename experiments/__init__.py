"""Experiment entry points of akv_jax: the real-model runner (run_real.py) with its configs and benchmarks, the tiny
trained model's training, probes and runner (toy/), and the synthetic-data runner on KV artifacts (synthetic/)."""
