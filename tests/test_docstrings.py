"""The runnable examples in hf_pp docstrings stay true."""

import doctest
import importlib
import pkgutil

import pytest

import hf_pp

MODULES = ["hf_pp"] + sorted(m.name for m in pkgutil.iter_modules(hf_pp.__path__, "hf_pp.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
