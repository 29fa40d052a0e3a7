"""The unit files and drop-ins roles/redis and roles/feast wrote have no setting systemd ignores
(a key in the wrong section, an unknown key): molecule/shared/systemd_units.py."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
import systemd_units

test_managed_units_have_no_ignored_settings = systemd_units.test_managed_units_have_no_ignored_settings
