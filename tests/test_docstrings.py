"""Every public name has a docstring with a runnable example, and the example runs."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import lightning_aw


def _public_modules() -> list[ModuleType]:
    mods = [lightning_aw]
    for info in pkgutil.walk_packages(lightning_aw.__path__, prefix="lightning_aw."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        mods.append(importlib.import_module(info.name))
    return mods


def _public_names() -> dict[str, tuple[object, ModuleType]]:
    """``qualified name -> (object, module that exports it)``, each object once."""
    found: dict[str, tuple[object, ModuleType]] = {}
    seen: set[int] = set()
    for mod in _public_modules():
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            found[f"{mod.__name__}.{name}"] = (obj, mod)
    return found


PUBLIC = _public_names()
# plain data exported for reference (a dict of classes has no docstring of its own)
DATA = {name for name, (obj, _) in PUBLIC.items() if isinstance(obj, (dict, tuple, list, str))}
DOCUMENTED = sorted(set(PUBLIC) - DATA)


def test_public_surface_is_found():
    # the walk reaches the subpackages, not just the top-level module
    assert "lightning_aw.MultiTaskModule" in PUBLIC
    assert any(name.startswith("lightning_aw.functional.") for name in PUBLIC)
    assert any(name.startswith("lightning_aw.transforms.") for name in PUBLIC)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_public_name_has_a_runnable_example(name):
    obj, mod = PUBLIC[name]
    doc = inspect.getdoc(obj)
    assert doc, f"{name} has no docstring"
    assert ">>>" in doc, f"{name}'s docstring has no runnable `>>>` example"
    home = inspect.getmodule(obj) or mod  # examples see the globals of the defining module
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, module=home, globs=vars(home))
    examples = [t for t in tests if t.examples]
    assert examples, f"{name}: doctest found no example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in examples:
        test.globs = dict(test.globs)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
