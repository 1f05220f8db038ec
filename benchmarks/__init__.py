"""Benchmarks of dp-microclip: one training step against plain PyTorch, Opacus and the naive loop.

Entry point: ``python -m benchmarks.bench`` (see ``benchmarks/README.md``).
"""
