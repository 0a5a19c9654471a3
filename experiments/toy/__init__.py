"""The tiny trained model: its training, probes and runners (experiments/toy/README.md)."""
