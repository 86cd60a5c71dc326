"""In CI, a test skipped because a dev dependency is missing fails; outside CI it is still a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py").read_text()
TESTS = '''
import importlib.util
import pytest

def test_inside():
    pytest.importorskip("fleetlearn_no_such_package")

@pytest.mark.skipif(importlib.util.find_spec("fleetlearn_no_such_package") is None, reason="not installed")
def test_marked():
    pass

@pytest.mark.skip(reason="a deliberate skip")
def test_deliberate():
    pass
'''
MODULE = 'import pytest\npytest.importorskip("fleetlearn_no_such_package")\n\ndef test_never():\n    pass\n'


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_package_skips_fail_only_in_ci(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_functions=TESTS, test_module=MODULE)
    functions = pytester.runpytest("-p", "no:cacheprovider", "test_functions.py")
    module = pytester.runpytest("-p", "no:cacheprovider", "test_module.py")
    if ci:
        # importorskip in the test fails it; a skipif (evaluated at setup) becomes a setup error; the
        # deliberate skip stays a skip
        functions.assert_outcomes(failed=1, errors=1, skipped=1)
        module.assert_outcomes(errors=1)  # a module-level importorskip fails the collection
        assert "CI=true: a test skipped for a missing package fails" in functions.stdout.str()
    else:
        functions.assert_outcomes(skipped=3)
        module.assert_outcomes(skipped=1)
