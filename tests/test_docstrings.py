"""Every public name of the installed packages says why it exists (a docstring), so the API reference is complete."""

from __future__ import annotations

import importlib
import inspect
import pkgutil


import accounting
import dp_microclip

SKIP_MODULES = {"dp_microclip.cli", "accounting.cli", "accounting.__main__", "dp_microclip.__main__"}  # command-line entry points: documented by --help


def _modules():
    for package in (dp_microclip, accounting):
        yield package.__name__
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name not in SKIP_MODULES:
                yield info.name


def _public_definitions():
    for name in _modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("_") or getattr(value, "__module__", None) != name:
                continue
            if inspect.isfunction(value) or inspect.isclass(value):
                yield f"{name}.{attr}", value
                if inspect.isclass(value):
                    for member, item in vars(value).items():
                        if member.startswith("_") or member in getattr(value, "_fields", ()):
                            continue
                        if inspect.isfunction(item) or isinstance(item, (property, classmethod, staticmethod)):
                            yield f"{name}.{attr}.{member}", item


def test_every_public_name_has_a_docstring():
    missing = []
    for qualname, obj in _public_definitions():
        target = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
        # A property's docstring is its own (``property(fget, doc=...)``) or its getter's.
        doc = target.__doc__ if isinstance(target, property) else inspect.getdoc(target)
        if not (doc or "").strip():
            missing.append(qualname)
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(missing)
