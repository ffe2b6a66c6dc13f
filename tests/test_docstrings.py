"""The `Example:` sections of the public names' docstrings run, and every public name has one."""

from __future__ import annotations

import doctest

import pytest
import torch
import transformers

import hf_blockprune

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.fixture(autouse=True)
def quiet_single_thread():
    """transformers' warnings off (they are not part of any example's output); one torch thread: the examples' tiny
    matrices gain nothing from more, and a shared CPU makes extra threads wait for each other."""
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


def examples_of(name: str) -> list[doctest.DocTest]:
    """The doctests of the public object `name` and of its methods, each with empty globals (an example imports what
    it uses, as a reader copying it would)."""
    tests = doctest.DocTestFinder().find(getattr(hf_blockprune, name), name, globs={})
    return [test for test in tests if test.examples]


def run_examples(tests: list[doctest.DocTest], label: str) -> None:
    """Run `tests`; fail naming how many example lines of `label` failed (the runner prints each above)."""
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} example lines of {label} failed (above)."


@pytest.mark.parametrize("name", hf_blockprune.__all__)
def test_docstring_examples_run(name):
    tests = examples_of(name)
    assert tests, f"`hf_blockprune.{name}` has no `>>>` example in its docstring: add an `Example:` section."
    run_examples(tests, f"`{name}`")


# Modules whose own examples run too: the structure every consumer reads and the hooks the integrations fill.
MODULES = ["hf_blockprune.structure.discovery", "hf_blockprune.structure.model_structure",
           "hf_blockprune.structure.layers", "hf_blockprune.structure.architectures",
           "hf_blockprune.structure.wrappers", "hf_blockprune.structure.stream", "hf_blockprune.pruning.layer",
           "hf_blockprune.pruning.norm", "hf_blockprune.structure.modeling_blockprune", "hf_blockprune.compact.depth",
           "hf_blockprune.integrations.sentence_transformers"]


@pytest.mark.parametrize("module_name", MODULES)
def test_module_examples_run(module_name):
    import importlib

    module = importlib.import_module(module_name)
    tests = [test for test in doctest.DocTestFinder().find(module, module_name) if test.examples]
    assert tests, f"{module_name} has no `>>>` example."
    run_examples(tests, module_name)
