"""Shared fixtures and hooks for the fleetlearn test-suite.

In CI (``CI=true``) a test that would be skipped because a package is missing (``pytest.importorskip``,
or a ``skipif`` whose reason says the package is not installed) fails instead: CI installs every
dev dependency, so such a skip means a broken install, not an optional feature.
"""

from __future__ import annotations

import os
import re

import pytest

MISSING_DEPENDENCY = re.compile(r"could not import|no module named|not installed", re.IGNORECASE)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fail_skips_for_missing_packages(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not (report.skipped and in_ci()):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if MISSING_DEPENDENCY.search(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"{reason}\nCI=true: a test skipped for a missing package fails; "
            "install '.[host,sim,postgres,demo,dev,torch]'"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    _fail_skips_for_missing_packages(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    _fail_skips_for_missing_packages(outcome.get_result())
