"""The examples in the docstrings of the public modules run as written."""
import doctest
import importlib
import warnings

import pytest


@pytest.mark.parametrize("name", ["fastbp", "fastbp.model", "fastbp.trainer", "fastbp.schedules",
                                  "fastbp.progress", "fastbp.info", "fastbp.plotting", "fastbp.sklearn"])
def test_docstring_examples(name):
    if name == "fastbp.plotting":
        pytest.importorskip("matplotlib")
    if name == "fastbp.sklearn":
        pytest.importorskip("sklearn")
    module = importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
