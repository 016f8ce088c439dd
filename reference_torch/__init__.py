"""PyTorch reference implementations that the JAX code is checked against (parity tests, benchmarks)."""
