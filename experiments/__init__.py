"""Experiments that test the claims of Wang, "Revisit Micro-batch Clipping" (arXiv 2408.16204) on offline data.

One command each: ``python -m experiments.vision``, ``.language``, ``.speech``,
``.domains`` (and ``.demo_lr`` for the tuned learning rates of the digits demo).
Results go to ``experiments/results/`` (Markdown, JSON, PNG); docs/science.md
discusses them.
"""
