"""What tests, benchmarks and the demo build their models from, offline: tiny models of
the real architectures (`betakd.testing.tiny_models`, with the shared tokenizer of
`betakd.testing.tiny_tokenizer`), not part of the distillation library."""
