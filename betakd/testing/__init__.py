"""What tests, benchmarks and the demo build their models from, offline: tiny models of
the real architectures (`betakd.testing.tiny`), not part of the distillation library."""
