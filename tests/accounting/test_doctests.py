"""The examples in accounting's docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["accounting", "accounting.mechanism", "accounting.sensitivity", "accounting.ledger",
           "accounting.calibrate", "accounting.statement", "accounting.audit", "accounting.backends.rdp",
           "accounting.backends.prv", "accounting.backends.pld"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
