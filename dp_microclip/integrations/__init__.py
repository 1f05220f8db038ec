"""Integrations of the engine with training frameworks, each importing its framework only when imported itself.

* :mod:`dp_microclip.integrations.hf_trainer`: ``DPTrainer`` (a small ``transformers.Trainer``
  subclass: the engine's Poisson loader, per-example losses, the engine attached to the Trainer's
  optimizer) and ``PrivacyCallback`` (epsilon in the Trainer's logs, the privacy statement at the end).

Nothing here is imported by ``import dp_microclip``: the core stays importable without transformers.
Import the submodule you use, e.g. ``from dp_microclip.integrations.hf_trainer import DPTrainer``.
"""
