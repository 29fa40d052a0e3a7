"""Markers of the release tests (molecule/release runs -m "not fault", molecule/release_faults -m fault)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "fault: a fault case of the release flow (molecule/release_faults)")
