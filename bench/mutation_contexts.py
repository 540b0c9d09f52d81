"""pytest plugin for bench/mutation.py: labels what coverage.py records by the test that ran it.

Loaded with ``-p mutation_contexts`` under ``coverage run``: the lines a test's call runs are recorded under its
node id, those of its setup and teardown under ``<node id>@setup`` / ``@teardown`` (a module-scoped fixture runs
in the setup of its module's first test only, so those lines stand for the whole file), and collection (imports,
module-level code) under the empty context, which stands for every test.
"""
from __future__ import annotations

import coverage
import pytest


def _switch(context: str) -> None:
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context(context)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    _switch(item.nodeid + "@setup")
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _switch(item.nodeid)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    _switch(item.nodeid + "@teardown")
    yield
    _switch("")
