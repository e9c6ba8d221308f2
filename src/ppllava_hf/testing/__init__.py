"""Tiny models, tokenizers and data sets built locally, and the embedded default: for tests, examples and demos (the
model, conversion and training code never import this package)."""
