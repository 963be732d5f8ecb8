"""The examples in the package's docstrings run and print what they claim (``doctest``).

One test per module, found by walking the package, so a new module is checked
without editing this file.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import gpytorch_tp

MODULES = [gpytorch_tp.__name__] + [
    info.name for info in pkgutil.walk_packages(gpytorch_tp.__path__, prefix=gpytorch_tp.__name__ + ".")
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as error:  # a module behind an optional dependency that is not installed
        pytest.skip(f"{name}: {error}")
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    failed = 0
    dtype = torch.get_default_dtype()
    try:
        # Examples run in a copy of the module's globals, as `python -m doctest` does.
        for test in finder.find(module, name, globs=dict(vars(module))):
            if test.examples:
                failed += runner.run(test, out=report.append).failed
    finally:
        torch.set_default_dtype(dtype)  # an example may change it; the other tests must not see that
    assert failed == 0, "".join(report)
