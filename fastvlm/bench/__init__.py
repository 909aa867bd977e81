"""Benchmarks: latency, FLOPs and memory of the encoders and the whole model."""
