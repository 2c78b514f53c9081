"""Every ``>>>`` example in the library's docstrings runs and prints what it says.

Modules are found by walking the package, so an example added anywhere is tested without
listing it here. Examples are meant to be tiny (no model loads, no compiles of networks).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import p2l_jax

MODULES = sorted(m.name for m in pkgutil.walk_packages(p2l_jax.__path__, "p2l_jax.")
                 if not m.name.endswith("__main__"))


def _examples(name):
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(importlib.import_module(name)) if t.examples]


WITH_EXAMPLES = [name for name in MODULES if _examples(name)]


def test_examples_are_found():
    # the walk itself works: modules known to carry examples are among those found
    assert {"p2l_jax.metrics", "p2l_jax.operators.base"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see output)"
