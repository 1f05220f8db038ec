"""Layer rules. Importing this package registers the built-in rules (third-party ones lazily, by class name)."""

from . import conv, conv_transpose, embedding, linear, misc, norms, rnn, third_party, validators  # noqa: F401  (register at import)
from .registry import (
    LayerRule,
    register_lazy_rule,
    register_rule,
    registered_lazy_names,
    registered_types,
    rule_for,
)

__all__ = [
    "LayerRule", "register_lazy_rule", "register_rule", "registered_lazy_names", "registered_types", "rule_for",
]
