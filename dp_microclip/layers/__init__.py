"""Layer rules. Importing this package registers the built-in rules."""

from . import conv, embedding, linear, norms  # noqa: F401  (register at import)
from .registry import LayerRule, register_rule, registered_types, rule_for

__all__ = ["LayerRule", "register_rule", "registered_types", "rule_for"]
