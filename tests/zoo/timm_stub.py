"""Import timm where torchvision is absent: a stub ``torchvision`` (every attribute a dummy) on a meta-path finder.

timm's package imports ``torchvision`` (data transforms, a frozen BatchNorm, feature extraction) but its model
code does not need it. Installing torchvision could replace torch, so the zoo registers a stub instead, only
inside :func:`import_timm`, and only when the real one is missing.

Zoo cases name timm classes through :func:`timm_class`, called by their ``build``: a module's cases are
plain module-level ``ZooCase`` tables (the zoo table generator lists them), and nothing imports timm until
a case builds its model (collecting the tests stays as fast as before).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

import pytest


class _DummyMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _dummy(name)


def _dummy(name: str):
    return _DummyMeta(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: None})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _dummy(name)
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """``timm``, imported with a torchvision stub if torchvision is absent; skips the test without timm."""
    try:
        import timm  # noqa: F401
        return sys.modules["timm"]
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            pytest.skip(f"timm is not importable: {err}")
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
        del sys.modules[name]
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"timm does not import with a torchvision stub: {err}")
    finally:
        sys.meta_path.remove(finder)


def timm_class(module: str, name: str):
    """``timm.<module>.<name>`` (e.g. ``timm_class("models.cait", "Cait")``), importing timm on first use;
    skips the calling test (or the table row) without timm."""
    import_timm()
    return getattr(importlib.import_module(f"timm.{module}"), name)
