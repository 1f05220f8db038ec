"""dp-microclip: micro-batch gradient clipping for PyTorch, noise-free or differentially private.

``attach(model, optimizer, micro_batch_size=b, max_grad_norm=C)`` and train as usual.
"""

from . import layers  # noqa: F401  (registers the built-in layer rules)
from .configure import attach
from .engine import Engine
from .errors import BatchError, ConfigurationError, MicroclipError, PrivacyError, UnsupportedModuleError
from .layers.registry import LayerRule, register_rule, registered_types, rule_for

__all__ = [
    "attach", "Engine", "LayerRule", "register_rule", "registered_types", "rule_for",
    "MicroclipError", "ConfigurationError", "UnsupportedModuleError", "BatchError", "PrivacyError",
]
__version__ = "0.1.0"
