"""The synthetic-data runner: compression measured on KV artifacts, no model (experiments/synthetic/README.md)."""
