"""Integrations of the engine with training frameworks, each importing its framework only when imported itself.

* :mod:`dp_microclip.integrations.hf_trainer`: ``DPTrainer`` (a small ``transformers.Trainer``
  subclass: the engine's Poisson loader, per-example losses, the engine attached to the Trainer's
  optimizer, one Poisson logical batch per step in physical chunks) and ``PrivacyCallback`` (epsilon in
  the Trainer's logs, the privacy statement at the end);
* :mod:`dp_microclip.integrations.logical_batches`: ``LogicalBatchLoader`` (one item per sampled logical
  batch, for loops that count loader items as optimizer steps) and ``order_checked`` (a collator that
  reorders rows is refused where micro-batches follow rows). It imports no framework.

Nothing here is imported by ``import dp_microclip``: the core stays importable without transformers.
Import the submodule you use, e.g. ``from dp_microclip.integrations.hf_trainer import DPTrainer``.
"""
