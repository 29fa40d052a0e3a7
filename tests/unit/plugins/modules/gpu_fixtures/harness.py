# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Recorded GPU hosts for gpu_facts' tests (see README.md in this folder).

* :func:`load_host`: a host's ``host.yaml`` (PCI tree, files, recorded command outputs);
* :func:`materialize`: writes that host's sysfs/procfs tree under a temporary root, the way the kernel
  lays it out (``/sys/bus/pci/devices/<bdf>`` symlinks to ``/sys/devices/pci<domain>:<bus>/<bdf>``, a
  ``driver`` symlink to ``/sys/bus/pci/drivers/<name>``);
* :func:`replay_program`: an executable ``nvidia-smi`` / ``lspci`` that prints the recording made for exactly
  the arguments it is given and exits with the recorded status; any other arguments exit 99 (so a test fails
  when the module asks something no recording answers). Every call is logged for the tests to check;
* :class:`FakeNVML`: a stand-in for the ``pynvml`` module of nvidia-ml-py. This is the one double in these
  tests: there is no GPU on the machines they run on, so NVML cannot answer for real. It has the real
  module's names, return types and error codes (``test_fake_nvml_matches_real_pynvml`` checks them against
  the installed nvidia-ml-py when there is one) and answers with the same recorded values as nvidia-smi.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import sys

import yaml

FIXTURES = pathlib.Path(__file__).resolve().parent
HOSTS = sorted(path.name for path in FIXTURES.iterdir() if (path / "host.yaml").is_file())
RECORDED_FIELDS = [
    line.strip() for line in (FIXTURES / "query-gpu-fields.txt").read_text().splitlines() if line.strip()
]
MIB = 1024 * 1024


def load_host(name):
    host = yaml.safe_load((FIXTURES / name / "host.yaml").read_text())
    host["name"] = name
    return host


def fixture_text(host, file_name):
    return (FIXTURES / host["name"] / file_name).read_text()


def materialize(host, root):
    """Write ``host``'s sysfs and procfs under ``root`` (a pathlib.Path); returns ``root``."""
    root = pathlib.Path(root)
    bus_dir = root / "sys" / "bus" / "pci" / "devices"
    bus_dir.mkdir(parents=True, exist_ok=True)
    for bdf, attributes in (host.get("pci") or {}).items():
        domain, bus = bdf.split(":")[:2]
        device_dir = root / "sys" / "devices" / f"pci{domain}:{bus}" / bdf
        device_dir.mkdir(parents=True)
        for key, value in attributes.items():
            if key == "driver":
                continue
            (device_dir / key).write_text(f"{value}\n")
        if attributes.get("driver"):
            drivers = root / "sys" / "bus" / "pci" / "drivers" / attributes["driver"]
            drivers.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(drivers, device_dir), device_dir / "driver")
        os.symlink(os.path.relpath(device_dir, bus_dir), bus_dir / bdf)
    for path, content in (host.get("files") or {}).items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            content = fixture_text(host, content["file"])
        target.write_text(content)
    return root


def _recorded_args(entry):
    if "args" in entry:
        return list(entry["args"])
    fields = [field for field in RECORDED_FIELDS if field not in (entry.get("without") or [])]
    return ["--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits"]


def replay_program(host, program, bin_dir):
    """An executable replaying ``host``'s recordings of ``program`` (``nvidia-smi`` or ``lspci``), or the
    path where none exists when the host has no such program installed."""
    bin_dir = pathlib.Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / program
    recordings = host.get("commands", {}).get(program)
    if recordings is None:
        return str(path)  # not installed on that host
    table = [
        dict(
            args=_recorded_args(entry),
            stdout=fixture_text(host, entry["stdout"]) if entry.get("stdout") else "",
            stderr=fixture_text(host, entry["stderr"]) if entry.get("stderr") else "",
            rc=entry.get("rc", 0),
        )
        for entry in recordings
    ]
    (bin_dir / f"{program}.recordings.json").write_text(json.dumps(table))
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        "here = pathlib.Path(__file__).resolve().parent\n"
        "name = pathlib.Path(__file__).name\n"
        "args = sys.argv[1:]\n"
        "with open(here / (name + '.calls'), 'a') as log:\n"
        "    log.write(json.dumps(args) + '\\n')\n"
        "for entry in json.loads((here / (name + '.recordings.json')).read_text()):\n"
        "    if entry['args'] == args:\n"
        "        sys.stdout.write(entry['stdout'])\n"
        "        sys.stderr.write(entry['stderr'])\n"
        "        sys.exit(entry['rc'])\n"
        "sys.stderr.write('replay: no recording for %r\\n' % (args,))\n"
        "sys.exit(99)\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def calls(program_path):
    """The argument lists a replay program was called with."""
    log = pathlib.Path(program_path + ".calls")
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# NVML stand-in
# ---------------------------------------------------------------------------------------------------------------

# nvml.h return codes and the messages nvidia-ml-py's NVMLError.__str__ gives for them.
NVML_ERRORS = {
    1: ("UNINITIALIZED", "Uninitialized", "Uninitialized"),
    3: ("NOT_SUPPORTED", "NotSupported", "Not Supported"),
    4: ("NO_PERMISSION", "NoPermission", "Insufficient Permissions"),
    9: ("DRIVER_NOT_LOADED", "DriverNotLoaded", "Driver Not Loaded"),
    10: ("TIMEOUT", "Timeout", "Timeout"),
    12: ("LIBRARY_NOT_FOUND", "LibraryNotFound", "NVML Shared Library Not Found"),
    13: ("FUNCTION_NOT_FOUND", "FunctionNotFound", "Function Not Found"),
    15: ("GPU_IS_LOST", "GpuIsLost", "GPU is lost"),
    16: ("RESET_REQUIRED", "ResetRequired", "GPU requires restart"),
    18: ("LIB_RM_VERSION_MISMATCH", "LibRmVersionMismatch", "RM has detected an NVML/RM version mismatch."),
    999: ("UNKNOWN", "Unknown", "Unknown Error"),
}


class NVMLError(Exception):
    """Like pynvml.NVMLError: ``value`` is the NVML return code; NVMLError(code) builds the subclass."""

    _classes: dict = {}

    def __new__(cls, value):
        subclass = NVMLError._classes.get(value, cls) if cls is NVMLError else cls
        obj = Exception.__new__(subclass)
        obj.value = value
        return obj

    def __init__(self, value):
        super().__init__(value)

    def __str__(self):
        return NVML_ERRORS.get(self.value, (None, None, f"NVML Error with code {self.value}"))[2]


for _code, (_constant, _suffix, _message) in NVML_ERRORS.items():
    NVMLError._classes[_code] = type(f"NVMLError_{_suffix}", (NVMLError,), {})


class _Struct:
    def __init__(self, **values):
        self.__dict__.update(values)


def _enabled(value):
    return None if value is None else int(bool(value))


def nvml_devices_from_csv(host):
    """The per-GPU values NVML would return on ``host``, from its recorded nvidia-smi CSV (NVML units:
    bytes, milliwatts, 0/1, tuples). A GPU that nvidia-smi could not open is at the index ``host.yaml``
    gives in ``nvml.lost`` (NVML numbers GPUs in PCI bus order)."""
    from ansible_collections.sovereign.mlops.plugins.module_utils import _nvidia

    entry = next(e for e in host["commands"]["nvidia-smi"] if "args" not in e and not e.get("without"))
    rows, _lost, _other = _nvidia.parse_smi_query(fixture_text(host, entry["stdout"]))
    devices = []
    for row in sorted(rows, key=lambda r: r["index"]):
        cc = tuple(int(part) for part in row["compute_capability"].split(".")) if row["compute_capability"] else None
        devices.append(
            dict(
                name=row["name"],
                uuid=row["uuid"],
                # NVML's busId is a char array: ctypes gives bytes, in nvidia-smi's 8-digit-domain form.
                bus_id=("0000" + row["bus_id"].upper()[:4] + row["bus_id"][4:]).encode(),
                memory_total=row["memory_total_mib"] * MIB,
                cc=cc,
                persistence=_enabled(row["persistence_mode"]),
                ecc=None if row["ecc_mode"] is None else [_enabled(row["ecc_mode"]), _enabled(row["ecc_mode_pending"])],
                ecc_corrected=row["ecc_errors_corrected_volatile"],
                ecc_uncorrected=row["ecc_errors_uncorrected_volatile"],
                temperature=row["temperature_c"],
                power_limit=None if row["power_limit_w"] is None else round(row["power_limit_w"] * 1000),
            )
        )
    for index in (host.get("nvml") or {}).get("lost", []):
        devices.insert(index, dict(handle_error=999))
    return devices


class FakeNVML:
    """The subset of ``pynvml`` gpu_facts calls, answering from ``devices`` (see nvml_devices_from_csv).

    ``init_error``: the NVML code nvmlInit raises; a device's ``handle_error``: the code
    nvmlDeviceGetHandleByIndex raises for it; ``errors``: {function name: code} raised by that query.
    ``calls`` records every call, so a test can see that nvmlShutdown followed nvmlInit.
    """

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_AGGREGATE_ECC = 1
    NVML_FEATURE_ENABLED = 1

    def __init__(
        self, devices=(), driver_version="535.261.03", cuda_version=12020, init_error=None, bytes_strings=False
    ):
        self.devices = [dict(d) for d in devices]
        self.driver_version = driver_version
        self.cuda_version = cuda_version
        self.init_error = init_error
        self.bytes_strings = bytes_strings  # nvidia-ml-py before 11.515 returned bytes for names
        self.calls = []

    def _str(self, value):
        return value.encode() if self.bytes_strings and isinstance(value, str) else value

    def _device(self, handle, function):
        self.calls.append(function)
        device = self.devices[handle]
        code = (device.get("errors") or {}).get(function)
        if code is not None:
            raise NVMLError(code)
        return device

    def _value(self, handle, function, key):
        value = self._device(handle, function).get(key)
        if value is None:
            raise NVMLError(3)  # NVML_ERROR_NOT_SUPPORTED, as on a GPU without that feature
        return value

    def nvmlInit(self):
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.calls.append("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self):
        return self._str(self.driver_version)

    def nvmlSystemGetNVMLVersion(self):
        return self._str("12." + self.driver_version)

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda_version

    def nvmlDeviceGetCount(self):
        self.calls.append("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        self.calls.append("nvmlDeviceGetHandleByIndex")
        if self.devices[index].get("handle_error") is not None:
            raise NVMLError(self.devices[index]["handle_error"])
        return index

    def nvmlDeviceGetName(self, handle):
        return self._str(self._value(handle, "nvmlDeviceGetName", "name"))

    def nvmlDeviceGetUUID(self, handle):
        return self._str(self._value(handle, "nvmlDeviceGetUUID", "uuid"))

    def nvmlDeviceGetPciInfo(self, handle):
        return _Struct(busId=self._value(handle, "nvmlDeviceGetPciInfo", "bus_id"))

    def nvmlDeviceGetMemoryInfo(self, handle):
        total = self._value(handle, "nvmlDeviceGetMemoryInfo", "memory_total")
        return _Struct(total=total, free=total, used=0)

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return self._value(handle, "nvmlDeviceGetCudaComputeCapability", "cc")

    def nvmlDeviceGetPersistenceMode(self, handle):
        return self._value(handle, "nvmlDeviceGetPersistenceMode", "persistence")

    def nvmlDeviceGetEccMode(self, handle):
        return list(self._value(handle, "nvmlDeviceGetEccMode", "ecc"))

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type):
        assert counter_type == self.NVML_VOLATILE_ECC
        key = "ecc_corrected" if error_type == self.NVML_MEMORY_ERROR_TYPE_CORRECTED else "ecc_uncorrected"
        return self._value(handle, "nvmlDeviceGetTotalEccErrors", key)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._value(handle, "nvmlDeviceGetTemperature", "temperature")

    def nvmlDeviceGetPowerManagementLimit(self, handle):
        return self._value(handle, "nvmlDeviceGetPowerManagementLimit", "power_limit")


for _code, (_constant, _suffix, _message) in NVML_ERRORS.items():
    setattr(FakeNVML, "NVML_ERROR_" + _constant, _code)
    setattr(FakeNVML, "NVMLError_" + _suffix, NVMLError._classes[_code])

FAKE_NVML_FUNCTIONS = sorted(name for name in vars(FakeNVML) if name.startswith("nvml"))
FAKE_NVML_CONSTANTS = sorted(name for name in vars(FakeNVML) if name.startswith(("NVML_", "NVMLError")))


def fake_nvml_for(host):
    """The ``pynvml`` stand-in for ``host`` (``host.yaml`` key ``nvml``), or None where nvidia-ml-py is not
    installed on that host (the tests then make ``import pynvml`` fail)."""
    spec = host.get("nvml") or {}
    if spec.get("installed") is False:
        return None
    if spec.get("init_error") is not None:
        return FakeNVML(init_error=spec["init_error"])
    devices = nvml_devices_from_csv(host)
    rows = [d for d in devices if "name" in d]
    driver = next(
        (line.split(", ")[4] for line in fixture_text(host, "nvidia-smi-query-gpu.csv").splitlines() if ", " in line),
        None,
    )
    cuda = spec.get("cuda_version")
    if cuda is None:
        q = _q_cuda(host)
        cuda = int(q.split(".")[0]) * 1000 + int(q.split(".")[1]) * 10 if q else None
    assert rows, f"{host['name']}: no GPU rows to build NVML answers from"
    return FakeNVML(devices, driver_version=driver, cuda_version=cuda)


def _q_cuda(host):
    path = FIXTURES / host["name"] / "nvidia-smi-q.txt"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("CUDA Version"):
            return line.split(":", 1)[1].strip()
    return None
