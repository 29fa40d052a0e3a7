# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What the collection knows about NVIDIA GPUs on Linux: sysfs, procfs, ``lspci``, NVML and ``nvidia-smi``.

PRIVATE to the sovereign.mlops collection (leading underscore): no compatibility promise, import it only
from this collection's modules and tests. ``plugins/modules/gpu_facts.py`` orchestrates; this file knows
the tools and their formats (community.general's ``_kopia`` pattern). Nothing here runs a process or
imports ``pynvml`` at import time: the module passes a command runner and the ``pynvml`` module object.

Sources, from the most basic (works before any driver) to the richest:

* ``<root>/sys/bus/pci/devices/*/{vendor,device,class,...}`` and the ``driver`` symlink: every NVIDIA PCI
  function and which kernel driver is bound to it;
* ``lspci -Dnn`` (pciutils): the human name from pci.ids, and ``(rev ff)`` when config space reads all ones
  (a device that stopped answering on the bus);
* ``<root>/proc/driver/nvidia/version``, ``<root>/sys/module/nvidia/version``: the loaded kernel module;
  ``<root>/proc/driver/nvidia/gpus/<bus id>/information``: model and UUID per GPU from the kernel module
  alone (still there when the user-space library does not match);
* NVML through ``nvidia-ml-py`` (``import pynvml``), else ``nvidia-smi --query-gpu=... --format=csv,noheader,
  nounits`` (and ``nvidia-smi -q`` for the CUDA version): the per-GPU facts.

Bus ids are normalised to sysfs's form, ``0000:01:00.0`` (4-digit domain, lower case); NVML and
nvidia-smi print ``00000000:01:00.0``.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import re
import threading

from ansible_collections.sovereign.mlops.plugins.module_utils import _files

NVIDIA_VENDOR_ID = 0x10DE
# PCI base class 0x03 = display controller (0x0300 VGA, 0x0302 3D controller, 0x0380 other). The other
# functions NVIDIA cards expose (HD audio 0x0403, USB-C 0x0c03, NVSwitch bridges 0x0680) are not GPUs.
PCI_CLASS_DISPLAY = 0x03

# Problem severities: an "error" means a GPU the host has cannot be used; a "warning" means it can, but
# something needs attention (a fact a health gate or an operator acts on).
ERROR = "error"
WARNING = "warning"

# NVML return codes (nvml.h, identical in every nvidia-ml-py release): classified by number, not by the
# exception class, so any pynvml version (or the tests' stand-in) is understood the same way.
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_UNKNOWN = 999

# Compute capability (major, minor) -> architecture; cc is what both NVML and nvidia-smi report.
ARCHITECTURES = {
    (3, 0): "Kepler",
    (3, 5): "Kepler",
    (3, 7): "Kepler",
    (5, 0): "Maxwell",
    (5, 2): "Maxwell",
    (5, 3): "Maxwell",
    (6, 0): "Pascal",
    (6, 1): "Pascal",
    (6, 2): "Pascal",
    (7, 0): "Volta",
    (7, 2): "Volta",
    (7, 5): "Turing",
    (8, 0): "Ampere",
    (8, 6): "Ampere",
    (8, 7): "Ampere",
    (8, 9): "Ada Lovelace",
    (9, 0): "Hopper",
    (10, 0): "Blackwell",
    (10, 3): "Blackwell",
    (12, 0): "Blackwell",
    (12, 1): "Blackwell",
}

# What each problem means for the operator: the fix, written once.
FIX = {
    "no_driver": (
        "Install the NVIDIA kernel module for the running kernel and load it: on Debian 12 "
        "'apt-get install linux-headers-$(uname -r) nvidia-kernel-dkms' (or nvidia-open-kernel-dkms for "
        "Turing and newer) from non-free/contrib, then 'modprobe nvidia'. If the packages are installed, "
        "DKMS did not build the module for this kernel: check 'dkms status' and 'dkms autoinstall'."
    ),
    "nouveau_bound": (
        "The open-source nouveau driver holds this GPU, so the NVIDIA driver cannot bind it. Blacklist it "
        "('blacklist nouveau' and 'options nouveau modeset=0' in /etc/modprobe.d/blacklist-nouveau.conf), "
        "run 'update-initramfs -u' and reboot, then load the NVIDIA driver."
    ),
    "other_driver_bound": (
        "Another kernel driver is bound to this GPU (vfio-pci means it is reserved for VM passthrough), so "
        "this host cannot compute on it. If that is not intended, remove the binding (vfio-pci.ids= on the "
        "kernel command line or /etc/modprobe.d) and reboot."
    ),
    "driver_library_mismatch": (
        "The NVIDIA user-space libraries were upgraded while the old kernel module is still loaded. Reboot "
        "the host (drain it first), or reload the module without a reboot: 'systemctl stop "
        "nvidia-persistenced; rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia; modprobe nvidia'. Pin the "
        "driver packages so unattended upgrades cannot do this again."
    ),
    "driver_not_loaded": (
        "NVIDIA GPUs are present but the NVIDIA kernel module is not loaded: 'modprobe nvidia' and read "
        "'journalctl -k -b | grep -i nvrm' for why it failed (module not built for this kernel: "
        "'dkms autoinstall'; Secure Boot rejecting an unsigned module: enrol the DKMS key)."
    ),
    "gpu_lost": (
        "The GPU stopped answering on the PCI bus (XID 79, 'GPU has fallen off the bus'): take the host "
        "out of service and reboot it; a GPU reset rarely recovers this. 'journalctl -k | grep -i xid' "
        "shows when it happened. If it recurs, check power, cooling and seating, then RMA the card."
    ),
    "gpu_not_reported": (
        "The NVIDIA driver is bound to this PCI device but does not report it as a GPU. Read 'journalctl "
        "-k -b | grep -i nvrm' (RmInitAdapter failed, XID 79, GSP firmware errors); reboot, and if it "
        "persists the card or its firmware (firmware-misc-nonfree / firmware-nvidia-gsp) is at fault."
    ),
    "no_query_tool": (
        "The NVIDIA driver is loaded but neither NVML (python package nvidia-ml-py with libnvidia-ml.so.1, "
        "Debian libnvidia-ml1) nor nvidia-smi is usable here, so only what the kernel module tells is known. "
        "Install nvidia-smi and libnvidia-ml1 of the same version as the driver."
    ),
    "query_failed": (
        "Read the message: NVML or nvidia-smi failed for a reason other than a missing or mismatched "
        "driver. Run 'nvidia-smi' on the host to see it, and 'journalctl -k -b | grep -i nvrm'."
    ),
    "query_timeout": (
        "The driver did not answer in time, which usually means it is wedged (often after an XID error). "
        "Read 'journalctl -k -b | grep -i -e xid -e nvrm', drain the host and reboot it."
    ),
    "no_permission": (
        "NVML refused the query for lack of permission: run the module as root (become: true), or check "
        "the permissions of /dev/nvidia* (NVreg_DeviceFileMode)."
    ),
    "ecc_uncorrected_errors": (
        "Uncorrectable ECC errors since the last driver load: results computed on this GPU may be wrong. "
        "Drain the host, reset the GPU ('nvidia-smi -r -i <index>') or reboot so pages are retired or rows "
        "remapped; if the count keeps growing, RMA the card."
    ),
    "ecc_mode_pending": (
        "The ECC mode was changed but is applied only after a GPU reset or reboot: reset the GPU "
        "('nvidia-smi -r -i <index>') or reboot the host."
    ),
    "reset_required": ("The driver says this GPU needs a reset: drain it, then 'nvidia-smi -r -i <index>' or reboot."),
}


class NvidiaError(Exception):
    """A query of the driver failed; ``kind`` names the class of failure (a key of :data:`FIX` or
    ``library_not_found`` / ``unavailable``), ``str(exc)`` what was seen."""

    def __init__(self, kind, message, library_version=None):
        super().__init__(message)
        self.kind = kind
        self.library_version = library_version


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------

_BUS_ID_RE = re.compile(r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def normalize_bus_id(text):
    """``00000000:3B:00.0`` / ``0000:3b:00.0`` / ``3b:00.0`` -> ``0000:3b:00.0``; None when not a bus id."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not text:
        return None
    match = _BUS_ID_RE.match(text.strip())
    if not match:
        return None
    domain, bus, device, function = match.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{function}"


def text(value):
    """pynvml returns str, or bytes in old releases and for ctypes char arrays (``busId``)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\x00")
    return value


def read_file(path):
    """Content of a sysfs/procfs file without the trailing newline; None when it cannot be read.

    Unlike most files, an unreadable one is not an error here: sysfs answers EIO or ENODEV for attributes of a
    device that stopped responding, and the facts report what could be read."""
    try:
        content = _files.read_text(path)
    except (OSError, UnicodeDecodeError):
        return None
    return None if content is None else content.rstrip("\n")


def rooted(root, path):
    """``path`` (absolute) under ``root``."""
    return os.path.join(root, path.lstrip("/"))


def architecture(compute_capability):
    """``"8.9"`` -> ``"Ada Lovelace"``; None when unknown."""
    if not compute_capability:
        return None
    try:
        major, minor = (int(part) for part in str(compute_capability).split(".", 1))
    except ValueError:
        return None
    return ARCHITECTURES.get((major, minor))


def _hex_id(value):
    """``0x10de`` -> 0x10de; None when unreadable."""
    try:
        return int(value, 16)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# PCI: sysfs and lspci
# ---------------------------------------------------------------------------------------------------------------


def read_pci_devices(root):
    """Every NVIDIA PCI function under ``<root>/sys/bus/pci/devices``, sorted by bus id.

    Each: ``bus_id, vendor_id, device_id, class_id, subsystem_vendor_id, subsystem_device_id, revision,
    numa_node, kernel_driver, is_gpu`` (ids as ``0x....`` strings, as sysfs writes them). sysfs keeps the
    ids it read at enumeration, so a device that later fell off the bus is still listed here.
    """
    base = rooted(root, "/sys/bus/pci/devices")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    devices = []
    for name in names:
        path = os.path.join(base, name)
        vendor = _hex_id(read_file(os.path.join(path, "vendor")))
        if vendor != NVIDIA_VENDOR_ID:
            continue
        class_text = read_file(os.path.join(path, "class"))
        class_id = _hex_id(class_text)
        driver = None
        driver_link = os.path.join(path, "driver")
        if os.path.islink(driver_link):
            driver = os.path.basename(os.readlink(driver_link))
        numa = read_file(os.path.join(path, "numa_node"))
        devices.append(
            dict(
                bus_id=normalize_bus_id(name) or name,
                vendor_id=f"0x{vendor:04x}",
                device_id=(read_file(os.path.join(path, "device")) or "").lower() or None,
                class_id=f"0x{class_id:06x}" if class_id is not None else None,
                subsystem_vendor_id=(read_file(os.path.join(path, "subsystem_vendor")) or "").lower() or None,
                subsystem_device_id=(read_file(os.path.join(path, "subsystem_device")) or "").lower() or None,
                revision=(read_file(os.path.join(path, "revision")) or "").lower() or None,
                numa_node=int(numa) if numa is not None and numa.lstrip("-").isdigit() else None,
                kernel_driver=driver,
                is_gpu=class_id is not None and (class_id >> 16) == PCI_CLASS_DISPLAY,
            )
        )
    return devices


_LSPCI_RE = re.compile(
    r"^(?P<bus_id>(?:[0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+"
    r"(?P<class_name>.*?)\s+\[(?P<class_id>[0-9a-fA-F]{4})\]:\s+"
    r"(?P<description>.*?)\s+\[(?P<vendor_id>[0-9a-fA-F]{4}):(?P<device_id>[0-9a-fA-F]{4})\]"
    r"(?:\s+\(rev (?P<revision>[0-9a-fA-F]{2})\))?(?:\s+\(prog-if [^)]*\))?\s*$"
)


def parse_lspci(output):
    """``lspci -Dnn`` lines -> {bus_id: {class_name, class_id, description, vendor_id, device_id, revision}}.

    Lines that do not look like ``-nn`` output are skipped (lspci prints warnings on some kernels).
    """
    devices = {}
    for line in (output or "").splitlines():
        match = _LSPCI_RE.match(line.strip())
        if not match:
            continue
        entry = match.groupdict()
        bus_id = normalize_bus_id(entry.pop("bus_id"))
        entry["class_id"] = "0x" + entry["class_id"].lower()
        entry["vendor_id"] = "0x" + entry["vendor_id"].lower()
        entry["device_id"] = "0x" + entry["device_id"].lower()
        entry["revision"] = entry["revision"].lower() if entry["revision"] else None
        devices[bus_id] = entry
    return devices


def lspci_name(description):
    """``NVIDIA Corporation GP104GL [Tesla P4]`` -> ``Tesla P4``; ``NVIDIA Corporation Device`` -> None."""
    if not description:
        return None
    match = re.search(r"\[([^\]]+)\]\s*$", description)
    if match:
        return match.group(1)
    name = re.sub(r"^NVIDIA Corporation\s*", "", description).strip()
    return None if name in ("", "Device") else name


# ---------------------------------------------------------------------------------------------------------------
# The kernel module: /proc/driver/nvidia, /sys/module/nvidia
# ---------------------------------------------------------------------------------------------------------------

_PROC_VERSION_RE = re.compile(
    r"^NVRM version:\s+(?P<flavour>.*?Kernel Module)(?:\s+for\s+\S+)?\s+(?P<version>\d+(?:\.\d+)+)"
)


def parse_proc_version(content):
    """``/proc/driver/nvidia/version`` -> {version, kernel_module}; kernel_module ``open`` or ``proprietary``.

    ``NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.216.01  ...`` (proprietary) or
    ``NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.127.05  Release Build ...`` (open).
    """
    for line in (content or "").splitlines():
        match = _PROC_VERSION_RE.match(line.strip())
        if match:
            flavour = "open" if "Open Kernel Module" in match.group("flavour") else "proprietary"
            return dict(version=match.group("version"), kernel_module=flavour)
    return dict(version=None, kernel_module=None)


def read_driver(root):
    """The loaded NVIDIA kernel module: {loaded, version, kernel_module}."""
    proc = read_file(rooted(root, "/proc/driver/nvidia/version"))
    info = parse_proc_version(proc)
    module_version = read_file(rooted(root, "/sys/module/nvidia/version"))
    loaded = proc is not None or os.path.isdir(rooted(root, "/sys/module/nvidia"))
    return dict(
        loaded=loaded,
        version=info["version"] or (module_version.strip() if module_version else None),
        kernel_module=info["kernel_module"],
    )


def parse_proc_gpu_information(content):
    """``/proc/driver/nvidia/gpus/<bus id>/information`` -> {name, uuid, minor}.

    ``Model: \\t\\t Tesla P4`` / ``GPU UUID: \\t GPU-...`` / ``Device Minor: \\t 0``; a UUID the driver could
    not read is printed as ``GPU-????????-...`` and reported as None.
    """
    values = {}
    for line in (content or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    uuid = values.get("GPU UUID")
    minor = values.get("Device Minor", "")
    return dict(
        name=values.get("Model") or None,
        uuid=uuid if uuid and "?" not in uuid else None,
        minor=int(minor) if minor.isdigit() else None,
    )


def read_proc_gpus(root):
    """{bus_id: {name, uuid, minor}} for every GPU the kernel module registered."""
    found = {}
    for path in sorted(glob.glob(rooted(root, "/proc/driver/nvidia/gpus/*/information"))):
        bus_id = normalize_bus_id(os.path.basename(os.path.dirname(path)))
        if bus_id:
            found[bus_id] = parse_proc_gpu_information(read_file(path))
    return found


# Where Debian (multiarch), RHEL and the .run installer put the NVML library; its file name carries the
# user-space driver version, which is what a version mismatch is about.
_NVML_LIBRARY_GLOBS = (
    "/usr/lib/*-linux-gnu/libnvidia-ml.so.*.*",
    "/usr/lib64/libnvidia-ml.so.*.*",
    "/usr/lib/libnvidia-ml.so.*.*",
)


def read_library_version(root):
    """Version of the installed ``libnvidia-ml.so.<version>``, None when none is installed."""
    for pattern in _NVML_LIBRARY_GLOBS:
        for path in sorted(glob.glob(rooted(root, pattern))):
            match = re.search(r"libnvidia-ml\.so\.(\d+\.\d+(?:\.\d+)?)$", path)
            if match:
                return match.group(1)
    return None


# ---------------------------------------------------------------------------------------------------------------
# nvidia-smi
# ---------------------------------------------------------------------------------------------------------------

# (query field, fact key, kind). The order is the order of the CSV columns.
SMI_FIELDS = (
    ("index", "index", "int"),
    ("name", "name", "str"),
    ("uuid", "uuid", "str"),
    ("pci.bus_id", "bus_id", "bus_id"),
    ("driver_version", "driver_version", "str"),
    ("memory.total", "memory_total_mib", "int"),
    ("compute_cap", "compute_capability", "str"),
    ("persistence_mode", "persistence_mode", "enabled"),
    ("ecc.mode.current", "ecc_mode", "enabled"),
    ("ecc.mode.pending", "ecc_mode_pending", "enabled"),
    ("ecc.errors.corrected.volatile.total", "ecc_errors_corrected_volatile", "int"),
    ("ecc.errors.uncorrected.volatile.total", "ecc_errors_uncorrected_volatile", "int"),
    ("temperature.gpu", "temperature_c", "int"),
    ("power.limit", "power_limit_w", "float"),
)


def smi_query_args(fields=None):
    """The nvidia-smi arguments (after the program) for the per-GPU query."""
    fields = SMI_FIELDS if fields is None else fields
    return ["--query-gpu=" + ",".join(field for field, _key, _kind in fields), "--format=csv,noheader,nounits"]


_SMI_HANDLE_RE = re.compile(
    r"Unable to determine the device handle for GPU\s*(?P<bus_id>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7])"
    r":\s*(?P<reason>.*)$"
)
_SMI_INVALID_FIELD_RE = re.compile(r'Field "(?P<field>[^"]+)" is not a valid field to query')
_SMI_LIBRARY_VERSION_RE = re.compile(r"NVML library version:\s*(?P<version>\d+(?:\.\d+)+)")


def _smi_value(raw, kind):
    """One CSV cell -> (value, note). ``[N/A]``, ``[Not Supported]``, ``N/A`` -> None; ``[GPU is lost]``
    and other bracketed errors -> None with the bracket text as note."""
    raw = raw.strip()
    if raw in ("", "N/A", "[N/A]", "[Not Supported]", "Not Supported"):
        return None, None
    if raw.startswith("[") and raw.endswith("]"):
        return None, raw[1:-1]
    try:
        if kind == "int":
            return int(float(raw)), None
        if kind == "float":
            return float(raw), None
        if kind == "enabled":
            lowered = raw.lower()
            if lowered in ("enabled", "on"):
                return True, None
            if lowered in ("disabled", "off"):
                return False, None
            return None, raw
        if kind == "bus_id":
            return normalize_bus_id(raw), None
    except ValueError:
        return None, raw
    return raw, None


def parse_smi_query(output, fields=None):
    """``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` -> (gpus, lost, other).

    ``gpus``: one dict per CSV row (keys from :data:`SMI_FIELDS`, plus ``state`` ``ok``/``lost`` and
    ``notes``: the bracketed errors seen in its cells). ``lost``: ``{bus_id: reason}`` from lines
    ``Unable to determine the device handle for GPU0000:3B:00.0: Unknown Error`` (nvidia-smi prints one
    per GPU it cannot open and goes on with the others). ``other``: lines that are neither.
    """
    fields = SMI_FIELDS if fields is None else fields
    gpus, lost, other = [], {}, []
    for line in (output or "").splitlines():
        if not line.strip():
            continue
        handle = _SMI_HANDLE_RE.search(line)
        if handle:
            lost[normalize_bus_id(handle.group("bus_id"))] = handle.group("reason").strip()
            continue
        cells = next(csv.reader([line], skipinitialspace=True))
        if len(cells) != len(fields):
            other.append(line.strip())
            continue
        gpu, notes = {}, []
        for position, (field, key, kind) in enumerate(fields):
            value, note = _smi_value(cells[position], kind)
            gpu[key] = value
            if note:
                notes.append(f"{field}: {note}")
        if gpu.get("index") is None:
            other.append(line.strip())
            continue
        gpu["state"] = "lost" if any("GPU is lost" in note for note in notes) else "ok"
        gpu["notes"] = notes
        gpus.append(gpu)
    return gpus, lost, other


def classify_smi_failure(output, rc):
    """A failed nvidia-smi run (no GPU rows) -> :class:`NvidiaError`."""
    message = "nvidia-smi: " + (
        " ".join(line.strip() for line in (output or "").splitlines() if line.strip()) or f"exit status {rc}"
    )
    lowered = message.lower()
    version = _SMI_LIBRARY_VERSION_RE.search(message)
    if "driver/library version mismatch" in lowered or rc == NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return NvidiaError("driver_library_mismatch", message, version.group("version") if version else None)
    if "couldn't communicate with the nvidia driver" in lowered or rc == NVML_ERROR_DRIVER_NOT_LOADED:
        return NvidiaError("driver_not_loaded", message)
    if "nvml shared library not found" in lowered or "libnvidia-ml.so" in lowered or rc == 12:
        return NvidiaError("library_not_found", message)
    if "no devices were found" in lowered or "no devices found" in lowered:
        return NvidiaError("no_devices", message)
    if "insufficient permissions" in lowered or rc == NVML_ERROR_NO_PERMISSION:
        return NvidiaError("no_permission", message)
    if rc in (124, 137):
        return NvidiaError("query_timeout", f"{message} (no answer in time, killed)")
    if "gpu is lost" in lowered or "fallen off the bus" in lowered or rc == NVML_ERROR_GPU_IS_LOST:
        return NvidiaError("gpu_lost", message)
    return NvidiaError("query_failed", f"{message} (exit status {rc})")


def invalid_smi_field(output):
    """The field an older nvidia-smi rejects (``Field "compute_cap" is not a valid field to query.``)."""
    match = _SMI_INVALID_FIELD_RE.search(output or "")
    return match.group("field") if match else None


def parse_smi_q(output):
    """``nvidia-smi -q`` -> nested dict: ``Key : Value`` lines, sections by 4-space indentation.

    The GPU sections are ``GPU 00000000:01:00.0`` at the top level, so ``result["Driver Version"]``,
    ``result["CUDA Version"]`` and ``result["GPU 00000000:01:00.0"]["FB Memory Usage"]["Total"]``.
    """
    result = {}
    stack = [(-1, result)]
    for raw in (output or "").splitlines():
        if not raw.strip() or raw.strip().startswith("="):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        key, sep, value = raw.strip().partition(" : ")
        if not sep and raw.rstrip().endswith(" :"):
            key, sep, value = raw.strip()[:-1], " : ", ""
        if sep:
            parent[key.strip()] = value.strip()
        else:
            section = {}
            parent[key.strip()] = section
            stack.append((indent, section))
    return result


def cuda_version_from_q(output):
    """``CUDA Version : 12.2`` from ``nvidia-smi -q``; None when absent or N/A."""
    value = parse_smi_q(output).get("CUDA Version")
    return value if value and re.match(r"^\d+\.\d+", value) else None


# ---------------------------------------------------------------------------------------------------------------
# NVML (nvidia-ml-py)
# ---------------------------------------------------------------------------------------------------------------


def nvml_code(exc):
    """The NVML return code carried by a pynvml exception (``NVMLError.value``), else None."""
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def nvml_kind(exc):
    """A pynvml exception -> the :data:`FIX` key (or ``library_not_found``) it stands for."""
    return {
        NVML_ERROR_DRIVER_NOT_LOADED: "driver_not_loaded",
        NVML_ERROR_LIBRARY_NOT_FOUND: "library_not_found",
        NVML_ERROR_FUNCTION_NOT_FOUND: "library_not_found",
        NVML_ERROR_LIB_RM_VERSION_MISMATCH: "driver_library_mismatch",
        NVML_ERROR_NO_PERMISSION: "no_permission",
        NVML_ERROR_GPU_IS_LOST: "gpu_lost",
        NVML_ERROR_RESET_REQUIRED: "reset_required",
        NVML_ERROR_TIMEOUT: "query_timeout",
    }.get(nvml_code(exc), "query_failed")


def _nvml_message(exc):
    code = nvml_code(exc)
    return f"NVML: {exc}" + (f" (NVML error {code})" if code is not None else "")


def _optional(call, notes, what):
    """One per-device NVML query: its value, or None when not supported; a lost GPU propagates."""
    try:
        return call()
    except Exception as exc:  # pynvml raises NVMLError subclasses; any other failure is only noted
        code = nvml_code(exc)
        if code in (NVML_ERROR_GPU_IS_LOST, NVML_ERROR_RESET_REQUIRED):
            raise
        if code != NVML_ERROR_NOT_SUPPORTED:
            notes.append(f"{what}: {exc}")
        return None


def _nvml_device(pynvml, index, handle):
    notes = []
    gpu = dict(index=index, state="ok", notes=notes)
    gpu["name"] = text(pynvml.nvmlDeviceGetName(handle))
    gpu["uuid"] = text(_optional(lambda: pynvml.nvmlDeviceGetUUID(handle), notes, "uuid"))
    pci = _optional(lambda: pynvml.nvmlDeviceGetPciInfo(handle), notes, "pci")
    gpu["bus_id"] = normalize_bus_id(text(getattr(pci, "busId", None))) if pci is not None else None
    memory = _optional(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle), notes, "memory")
    gpu["memory_total_mib"] = int(memory.total) // (1024 * 1024) if memory is not None else None
    cc = _optional(lambda: pynvml.nvmlDeviceGetCudaComputeCapability(handle), notes, "compute capability")
    gpu["compute_capability"] = f"{cc[0]}.{cc[1]}" if cc else None
    persistence = _optional(lambda: pynvml.nvmlDeviceGetPersistenceMode(handle), notes, "persistence mode")
    gpu["persistence_mode"] = bool(persistence) if persistence is not None else None
    ecc = _optional(lambda: pynvml.nvmlDeviceGetEccMode(handle), notes, "ECC mode")
    gpu["ecc_mode"] = bool(ecc[0]) if ecc else None
    gpu["ecc_mode_pending"] = bool(ecc[1]) if ecc else None
    for key, error_type in (
        ("ecc_errors_corrected_volatile", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
        ("ecc_errors_uncorrected_volatile", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
    ):
        gpu[key] = (
            _optional(
                lambda error_type=error_type: pynvml.nvmlDeviceGetTotalEccErrors(
                    handle, error_type, pynvml.NVML_VOLATILE_ECC
                ),
                notes,
                key,
            )
            if gpu["ecc_mode"]
            else None
        )
    gpu["temperature_c"] = _optional(
        lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU), notes, "temperature"
    )
    limit = _optional(lambda: pynvml.nvmlDeviceGetPowerManagementLimit(handle), notes, "power limit")
    gpu["power_limit_w"] = round(limit / 1000.0, 2) if limit is not None else None
    return gpu


def nvml_collect(pynvml):
    """Everything NVML says: (system, gpus). ``system``: driver_version, nvml_version, cuda_version.

    Raises :class:`NvidiaError` when NVML cannot start (library missing, driver not loaded, version
    mismatch, ...). A GPU whose handle or queries fail with "GPU is lost" / "Unknown Error" becomes an
    entry with ``state: lost`` (its bus id is unknown to NVML then: the caller matches it to sysfs).
    """
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        raise NvidiaError(nvml_kind(exc), _nvml_message(exc)) from exc
    try:
        system = dict(
            driver_version=text(_optional(pynvml.nvmlSystemGetDriverVersion, [], "driver version")),
            nvml_version=text(_optional(pynvml.nvmlSystemGetNVMLVersion, [], "NVML version")),
            cuda_version=None,
        )
        cuda = _optional(pynvml.nvmlSystemGetCudaDriverVersion, [], "CUDA version")
        if cuda:
            system["cuda_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                gpus.append(_nvml_device(pynvml, index, handle))
            except Exception as exc:
                code = nvml_code(exc)
                if code not in (NVML_ERROR_GPU_IS_LOST, NVML_ERROR_UNKNOWN, NVML_ERROR_RESET_REQUIRED):
                    raise NvidiaError(nvml_kind(exc), _nvml_message(exc)) from exc
                state = "reset_required" if code == NVML_ERROR_RESET_REQUIRED else "lost"
                gpus.append(dict(index=index, state=state, bus_id=None, notes=[_nvml_message(exc)]))
        return system, gpus
    except NvidiaError:
        raise
    except Exception as exc:
        raise NvidiaError(nvml_kind(exc), _nvml_message(exc)) from exc
    finally:
        # Shutting down a half-initialised library is best effort.
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def call_with_timeout(function, timeout):
    """``function()`` in a daemon thread: a wedged driver can block an NVML call forever, and a daemon
    thread does not keep the module's process alive. Raises :class:`NvidiaError` ``query_timeout``."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # handed to the caller's thread as is
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="nvml-query", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise NvidiaError("query_timeout", f"NVML did not answer within {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# ---------------------------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------------------------

GPU_KEYS = (
    "index",
    "bus_id",
    "name",
    "uuid",
    "state",
    "kernel_driver",
    "pci_device_id",
    "memory_total_mib",
    "compute_capability",
    "architecture",
    "persistence_mode",
    "ecc_mode",
    "ecc_mode_pending",
    "ecc_errors_corrected_volatile",
    "ecc_errors_uncorrected_volatile",
    "temperature_c",
    "power_limit_w",
    "source",
    "notes",
)


def _blank_gpu(bus_id):
    gpu = dict.fromkeys(GPU_KEYS)
    gpu.update(bus_id=bus_id, notes=[])
    return gpu


def _problem(code, message, gpu=None, severity=ERROR):
    return dict(
        code=code,
        severity=severity,
        bus_id=gpu.get("bus_id") if gpu else None,
        index=gpu.get("index") if gpu else None,
        message=message,
        fix=FIX.get(code, FIX["query_failed"]),
    )


def _label(gpu):
    parts = [f"GPU {gpu['index']}" if gpu.get("index") is not None else "GPU"]
    if gpu.get("bus_id"):
        parts.append(f"at {gpu['bus_id']}")
    if gpu.get("name"):
        parts.append(f"({gpu['name']})")
    return " ".join(parts)


def build_facts(pci, lspci, driver, proc_gpus, backend, system, queried, query_error, library_version):
    """Merge every source into the ``sovereign_gpu`` facts and derive the problems.

    ``pci``: :func:`read_pci_devices`; ``lspci``: :func:`parse_lspci`; ``driver``: :func:`read_driver`;
    ``proc_gpus``: :func:`read_proc_gpus`; ``backend``: ``nvml``, ``nvidia-smi`` or None; ``system``:
    driver_version/nvml_version/cuda_version from that backend; ``queried``: its GPU dicts;
    ``query_error``: the :class:`NvidiaError` when no backend answered; ``library_version``: the
    installed libnvidia-ml version.
    """
    problems = []
    by_bus = {}

    # 1. The hardware: every display-class NVIDIA function on the bus.
    for device in pci:
        if not device["is_gpu"]:
            continue
        gpu = _blank_gpu(device["bus_id"])
        gpu.update(kernel_driver=device["kernel_driver"], pci_device_id=device["device_id"], source="pci")
        listed = lspci.get(device["bus_id"])
        if listed:
            gpu["name"] = lspci_name(listed["description"])
            if listed["revision"] == "ff":
                gpu["state"] = "lost"
                gpu["notes"].append("lspci: PCI config space reads all ones (rev ff)")
        by_bus[device["bus_id"]] = gpu

    # 2. What the kernel module registered (model and UUID, even when user space is broken).
    for bus_id, info in proc_gpus.items():
        gpu = by_bus.setdefault(bus_id, _blank_gpu(bus_id))
        gpu["name"] = info["name"] or gpu["name"]
        gpu["uuid"] = info["uuid"]
        gpu["source"] = "proc" if gpu["source"] in (None, "pci") else gpu["source"]
        if gpu["kernel_driver"] is None and not pci:
            gpu["kernel_driver"] = "nvidia"

    # 3. What the driver answers through NVML / nvidia-smi.
    unplaced = []
    for found in queried or []:
        bus_id = found.get("bus_id")
        if not bus_id:
            unplaced.append(found)
            continue
        gpu = by_bus.setdefault(bus_id, _blank_gpu(bus_id))
        if found.get("state") == "ok":
            # The driver's answer is authoritative: a GPU it reads is on the bus, whatever lspci saw.
            gpu["notes"] = [note for note in gpu["notes"] if not note.startswith("lspci:")]
        for key in GPU_KEYS:
            if key in found and key not in ("notes", "bus_id") and (found[key] is not None or key == "index"):
                gpu[key] = found[key]
        gpu["notes"] = gpu["notes"] + list(found.get("notes") or [])
        gpu["source"] = backend
        if gpu["kernel_driver"] is None and not pci:
            gpu["kernel_driver"] = "nvidia"
    # A GPU NVML could not open has no bus id: it is one of the nvidia-bound devices nothing answered
    # for (NVML numbers GPUs in PCI bus order, so the first unanswered device is the first unplaced GPU).
    silent = [
        gpu
        for bus_id, gpu in sorted(by_bus.items())
        if gpu["kernel_driver"] == "nvidia" and gpu["source"] in ("pci", "proc") and backend
    ]
    for found in unplaced:
        if silent:
            gpu = silent.pop(0)
            gpu.update(index=found.get("index"), state=found.get("state"), source=backend)
            gpu["notes"] = gpu["notes"] + list(found.get("notes") or [])
        else:
            gpu = _blank_gpu(None)
            gpu.update(index=found.get("index"), state=found.get("state"), source=backend, notes=found.get("notes"))
            by_bus[f"~{found.get('index')}"] = gpu

    gpus = sorted(by_bus.values(), key=lambda g: (g["bus_id"] is None, g["bus_id"] or "", g["index"] or 0))

    # 4. Per-GPU states and problems.
    mismatch = query_error is not None and query_error.kind == "driver_library_mismatch"
    for gpu in gpus:
        gpu["architecture"] = architecture(gpu["compute_capability"])
        label = _label(gpu)
        if gpu["state"] == "lost":
            evidence = "; ".join(gpu["notes"]) or "the driver cannot open it"
            problems.append(_problem("gpu_lost", f"{label} fell off the bus or stopped answering: {evidence}.", gpu))
            continue
        if gpu["state"] == "reset_required":
            problems.append(_problem("reset_required", f"{label} needs a GPU reset: {'; '.join(gpu['notes'])}.", gpu))
            continue
        if gpu["state"] == "ok":
            if gpu["ecc_errors_uncorrected_volatile"]:
                problems.append(
                    _problem(
                        "ecc_uncorrected_errors",
                        f"{label} has {gpu['ecc_errors_uncorrected_volatile']} uncorrectable volatile ECC errors.",
                        gpu,
                        WARNING,
                    )
                )
            if None not in (gpu["ecc_mode"], gpu["ecc_mode_pending"]) and gpu["ecc_mode"] != gpu["ecc_mode_pending"]:
                state = "enabled" if gpu["ecc_mode_pending"] else "disabled"
                problems.append(
                    _problem("ecc_mode_pending", f"{label}: ECC will be {state} after a reset.", gpu, WARNING)
                )
            continue
        driver_name = gpu["kernel_driver"]
        if driver_name is None:
            gpu["state"] = "no_driver"
            problems.append(_problem("no_driver", f"{label} has no kernel driver bound.", gpu))
        elif driver_name == "nouveau":
            gpu["state"] = "other_driver"
            problems.append(_problem("nouveau_bound", f"{label} is driven by nouveau, not the NVIDIA driver.", gpu))
        elif driver_name != "nvidia":
            gpu["state"] = "other_driver"
            problems.append(
                _problem(
                    "other_driver_bound", f"{label} is bound to the '{driver_name}' driver.", gpu, severity=WARNING
                )
            )
        elif mismatch or query_error is not None or backend is None:
            gpu["state"] = "unqueried"
        else:
            gpu["state"] = "not_reported"
            problems.append(
                _problem("gpu_not_reported", f"{label} is bound to nvidia but the driver lists no such GPU.", gpu)
            )

    # 5. Host-level problems: why the GPUs bound to nvidia could not be queried.
    unqueried = [gpu for gpu in gpus if gpu["state"] == "unqueried"]
    if query_error is not None and (unqueried or (query_error.kind == "driver_library_mismatch" and gpus)):
        kind = query_error.kind
        affects = " Affects: " + ", ".join(_label(gpu) for gpu in unqueried) + "." if unqueried else ""
        if kind == "driver_library_mismatch":
            # The installed file names the full version; nvidia-smi's message only major.minor.
            library = library_version or query_error.library_version
            message = (
                f"Driver/library version mismatch: kernel module {driver.get('version') or 'unknown'} is loaded, "
                f"the user-space library is {library or 'another version'} ({query_error})."
            )
            problems.insert(0, _problem(kind, message + affects))
        elif kind in ("library_not_found", "unavailable"):
            problems.insert(0, _problem("no_query_tool", f"{query_error}.{affects}", severity=WARNING))
        else:
            problems.insert(0, _problem(kind if kind in FIX else "query_failed", f"{query_error}.{affects}"))

    usable = [gpu for gpu in gpus if gpu["state"] == "ok"]
    return dict(
        gpu_count=len(gpus),
        usable_gpu_count=len(usable),
        gpus=gpus,
        pci_devices=[dict(device) for device in pci],
        driver=dict(
            loaded=bool(driver.get("loaded")),
            version=driver.get("version") or (system or {}).get("driver_version"),
            kernel_module=driver.get("kernel_module"),
            library_version=(system or {}).get("driver_version")
            or library_version
            or (query_error.library_version if query_error is not None else None),
            nvml_version=(system or {}).get("nvml_version"),
            cuda_version=(system or {}).get("cuda_version"),
        ),
        backend=backend,
        problems=problems,
    )
