"""dp-microclip: micro-batch gradient clipping for PyTorch, noise-free or differentially private.

``attach(model, optimizer, micro_batch_size=b, max_grad_norm=C)`` and train as usual.
"""

from . import layers  # noqa: F401  (registers the built-in layer rules)
from .attach import attach
from .engine import Engine
from .settings import DP, MemoryBudget
from .errors import BatchError, ConfigurationError, MicroclipError, PrivacyError, UnsupportedModuleError
from .layers.registry import (
    LayerRule, register_lazy_rule, register_rule, registered_lazy_names, registered_types, rule_for,
)

__all__ = [
    "attach", "DP", "MemoryBudget", "Engine", "LayerRule", "register_rule", "register_lazy_rule", "registered_types",
    "registered_lazy_names", "rule_for",
    "MicroclipError", "ConfigurationError", "UnsupportedModuleError", "BatchError", "PrivacyError",
]
__version__ = "0.2.0"
