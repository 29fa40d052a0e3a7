"""Module tests run a module's main() in this process: the process must not be a controller."""

import pytest
from ansible.module_utils import _internal


@pytest.fixture(autouse=True)
def _not_a_controller():
    # Once controller code is imported (ansible.errors, a filter or action plugin), ansible-core 2.19 sends a
    # module's warnings to the controller's display and its results lose them: keep such tests in another
    # process (Makefile UNIT_GROUPS).
    assert not _internal.is_controller, (
        "controller code was imported into the module-test process; run that test in its own UNIT_GROUPS entry"
    )
