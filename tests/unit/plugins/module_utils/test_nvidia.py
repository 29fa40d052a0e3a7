# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Tables for plugins/module_utils/_nvidia.py: the parsers of nvidia-smi (CSV and -q), lspci, /proc/driver/nvidia
and sysfs, on the recorded hosts of tests/unit/plugins/modules/gpu_fixtures (reconstructed in the real formats,
see its README.md) and on single lines; and NVML collection through the pynvml stand-in (no GPU here)."""

from __future__ import annotations

import pytest
from ansible_collections.sovereign.mlops.plugins.module_utils import _nvidia
from ansible_collections.sovereign.mlops.tests.unit.plugins.modules.gpu_fixtures import harness

# ---------------------------------------------------------------------------------------------------------------
# The recordings themselves
# ---------------------------------------------------------------------------------------------------------------


def test_recordings_were_made_with_the_modules_query():
    """Every CSV recording has the columns of query-gpu-fields.txt: the module must ask exactly those."""
    assert [field for field, _key, _kind in _nvidia.SMI_FIELDS] == harness.RECORDED_FIELDS
    assert _nvidia.smi_query_args() == [
        "--query-gpu=" + ",".join(harness.RECORDED_FIELDS),
        "--format=csv,noheader,nounits",
    ]


Q_HOSTS = [name for name in harness.HOSTS if (harness.FIXTURES / name / "nvidia-smi-q.txt").exists()]
Q_HOSTS_WITH_GPUS = [name for name in Q_HOSTS if name != "lost_gpu"]


@pytest.mark.parametrize("name", Q_HOSTS_WITH_GPUS)
def test_q_and_csv_recordings_agree(name):
    """``nvidia-smi -q`` and the CSV of one host say the same things (guards the reconstructed fixtures)."""
    host = harness.load_host(name)
    query = next(e for e in host["commands"]["nvidia-smi"] if "query" in e and not e.get("without"))
    fields = _nvidia.SMI_FIELDS
    if (harness.FIXTURES / name / "nvidia-smi-query-gpu.txt").exists():  # old driver: the second recording
        query = next(e for e in host["commands"]["nvidia-smi"] if e.get("without"))
        fields = [f for f in fields if f[0] not in query["without"]]
    rows, lost, other = _nvidia.parse_smi_query(harness.fixture_text(host, query["stdout"]), fields)
    assert (lost, other) == ({}, [])
    q = _nvidia.parse_smi_q(harness.fixture_text(host, "nvidia-smi-q.txt"))
    assert int(q["Attached GPUs"]) == len(rows)
    for row in rows:
        section = q["GPU " + "0000" + row["bus_id"][:4].upper() + row["bus_id"][4:].upper()]
        assert section["Product Name"] == row["name"]
        assert section["GPU UUID"] == row["uuid"]
        assert _nvidia.normalize_bus_id(section["PCI"]["Bus Id"]) == row["bus_id"]
        assert section["FB Memory Usage"]["Total"] == f"{row['memory_total_mib']} MiB"
        assert (section["Persistence Mode"] == "Enabled") is row["persistence_mode"]
        assert section["ECC Mode"]["Current"] == {True: "Enabled", False: "Disabled", None: "N/A"}[row["ecc_mode"]]
        assert section["Temperature"]["GPU Current Temp"] == f"{row['temperature_c']} C"
        assert section["GPU Power Readings"]["Current Power Limit"] == f"{row['power_limit_w']:.2f} W"
        assert q["Driver Version"] == row["driver_version"]
        if "Product Architecture" in section:
            assert section["Product Architecture"] == _nvidia.architecture(row["compute_capability"])
        if row["ecc_mode"]:
            dram = section["ECC Errors"]["Volatile"]["DRAM Correctable"]
            sram = section["ECC Errors"]["Volatile"]["SRAM Correctable"]
            assert int(dram) + int(sram) == row["ecc_errors_corrected_volatile"]


# ---------------------------------------------------------------------------------------------------------------
# nvidia-smi --query-gpu
# ---------------------------------------------------------------------------------------------------------------

CELLS = [
    # (cell, kind, value, note)
    ("7680", "int", 7680, None),
    ("75.00", "float", 75.0, None),
    ("  450.00 ", "float", 450.0, None),
    ("Enabled", "enabled", True, None),
    ("Disabled", "enabled", False, None),
    ("[N/A]", "int", None, None),
    ("N/A", "int", None, None),
    ("[Not Supported]", "float", None, None),
    ("", "str", None, None),
    ("[GPU is lost]", "int", None, "GPU is lost"),
    ("[Unknown Error]", "str", None, "Unknown Error"),
    ("[Insufficient Permissions]", "int", None, "Insufficient Permissions"),
    ("00000000:3B:00.0", "bus_id", "0000:3b:00.0", None),
    ("abc", "int", None, "abc"),
    ("8.9", "str", "8.9", None),
]


@pytest.mark.parametrize(("cell", "kind", "value", "note"), CELLS)
def test_smi_cells(cell, kind, value, note):
    assert _nvidia._smi_value(cell, kind) == (value, note)


SMI_ROW = (
    "0, Tesla P4, GPU-5b3a0a4e-8f7c-6d21-9e0b-3c4d5e6f7a81, 00000000:3B:00.0, 535.261.03, 7680, 6.1, "
    "Enabled, Enabled, Enabled, 0, 0, 36, 75.00"
)
LOST_ROW = (
    "1, [GPU is lost], [GPU is lost], 00000000:2A:00.0, 550.90.07, [GPU is lost], [GPU is lost], [GPU is lost], "
    "[GPU is lost], [GPU is lost], [GPU is lost], [GPU is lost], [GPU is lost], [GPU is lost]"
)

SMI_OUTPUTS = [
    # (id, output, [(index, bus_id, state)], lost, other)
    ("one-gpu", SMI_ROW + "\n", [(0, "0000:3b:00.0", "ok")], {}, []),
    (
        "handle-lost-no-space",
        "Unable to determine the device handle for GPU0000:2A:00.0: Unknown Error\n" + SMI_ROW,
        [(0, "0000:3b:00.0", "ok")],
        {"0000:2a:00.0": "Unknown Error"},
        [],
    ),
    (
        "handle-lost-with-space",
        "Unable to determine the device handle for GPU 0000:2a:00.0: GPU is lost.  Reboot the system to recover "
        "this GPU\n",
        [],
        {"0000:2a:00.0": "GPU is lost.  Reboot the system to recover this GPU"},
        [],
    ),
    ("lost-cells", SMI_ROW + "\n" + LOST_ROW + "\n", [(0, "0000:3b:00.0", "ok"), (1, "0000:2a:00.0", "lost")], {}, []),
    ("noise", "No devices were found\n", [], {}, ["No devices were found"]),
    ("empty", "", [], {}, []),
]


@pytest.mark.parametrize(
    ("output", "gpus", "lost", "other"), [c[1:] for c in SMI_OUTPUTS], ids=[c[0] for c in SMI_OUTPUTS]
)
def test_parse_smi_query(output, gpus, lost, other):
    rows, seen_lost, seen_other = _nvidia.parse_smi_query(output)
    assert [(r["index"], r["bus_id"], r["state"]) for r in rows] == gpus
    assert (seen_lost, seen_other) == (lost, other)


def test_lost_cells_keep_the_evidence():
    rows, _lost, _other = _nvidia.parse_smi_query(LOST_ROW)
    assert rows[0]["name"] is None
    assert "name: GPU is lost" in rows[0]["notes"]


FAILURES = [
    # (id, output, rc, kind, library version)
    (
        "mismatch",
        "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 535.261\n",
        18,
        "driver_library_mismatch",
        "535.261",
    ),
    (
        "mismatch-old-driver",
        "Failed to initialize NVML: Driver/library version mismatch\n",
        18,
        "driver_library_mismatch",
        None,
    ),
    (
        "driver-not-loaded",
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest "
        "NVIDIA driver is installed and running.\n",
        9,
        "driver_not_loaded",
        None,
    ),
    (
        "library-missing",
        "NVIDIA-SMI couldn't find libnvidia-ml.so library in your system.\n",
        12,
        "library_not_found",
        None,
    ),
    ("no-permission", "Failed to initialize NVML: Insufficient Permissions\n", 4, "no_permission", None),
    ("timeout", "", 124, "query_timeout", None),
    ("gpu-lost", "Unable to determine the device handle for GPU0000:2A:00.0: GPU is lost\n", 15, "gpu_lost", None),
    ("other", "Segmentation fault\n", 139, "query_failed", None),
]


@pytest.mark.parametrize(("output", "rc", "kind", "library"), [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
def test_classify_smi_failure(output, rc, kind, library):
    error = _nvidia.classify_smi_failure(output, rc)
    assert (error.kind, error.library_version) == (kind, library)
    assert str(error).startswith("nvidia-smi: ")
    assert kind in _nvidia.FIX or kind == "library_not_found"


def test_invalid_field():
    assert _nvidia.invalid_smi_field('Field "compute_cap" is not a valid field to query.\n') == "compute_cap"
    assert _nvidia.invalid_smi_field("Failed to initialize NVML: Unknown Error") is None


# ---------------------------------------------------------------------------------------------------------------
# nvidia-smi -q
# ---------------------------------------------------------------------------------------------------------------


def test_parse_smi_q_nesting():
    q = _nvidia.parse_smi_q(harness.fixture_text(harness.load_host("h200"), "nvidia-smi-q.txt"))
    gpu = q["GPU 00000000:18:00.0"]
    assert gpu["PCI"]["GPU Link Info"]["PCIe Generation"]["Max"] == "5"
    assert gpu["Remapped Rows"]["Bank Remap Availability Histogram"]["Max"] == "2560 bank(s)"
    assert gpu["ECC Errors"]["Aggregate Uncorrectable SRAM Sources"]["SRAM L2"] == "0"
    assert gpu["Temperature"]["Memory Current Temp"] == "34 C"
    assert gpu["Processes"] == "None"


@pytest.mark.parametrize(
    ("name", "cuda"),
    [
        ("p4", "12.2"),
        ("rtx4090", "12.4"),
        ("h200", "12.8"),
        ("two_h100", "12.4"),
        ("old_driver", "11.4"),
        ("lost_gpu", None),
    ],
)
def test_cuda_version_from_q(name, cuda):
    assert _nvidia.cuda_version_from_q(harness.fixture_text(harness.load_host(name), "nvidia-smi-q.txt")) == cuda


# ---------------------------------------------------------------------------------------------------------------
# lspci, /proc/driver/nvidia, sysfs
# ---------------------------------------------------------------------------------------------------------------

LSPCI_LINES = [
    (
        "0000:3b:00.0 3D controller [0302]: NVIDIA Corporation GP104GL [Tesla P4] [10de:1bb3] (rev a1)",
        "0000:3b:00.0",
        "0x0302",
        "0x1bb3",
        "a1",
        "Tesla P4",
    ),
    (
        "0000:01:00.0 VGA compatible controller [0300]: NVIDIA Corporation AD102 [GeForce RTX 4090] [10de:2684] "
        "(rev a1)",
        "0000:01:00.0",
        "0x0300",
        "0x2684",
        "a1",
        "GeForce RTX 4090",
    ),
    (
        "0000:18:00.0 3D controller [0302]: NVIDIA Corporation Device [10de:2335] (rev a1)",
        "0000:18:00.0",
        "0x0302",
        "0x2335",
        "a1",
        None,
    ),
    (
        "0000:2a:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev ff)",
        "0000:2a:00.0",
        "0x0302",
        "0x2330",
        "ff",
        "H100 SXM5 80GB",
    ),
    # Without -D (domain 0 implied), with prog-if, without a revision.
    (
        "01:00.0 VGA compatible controller [0300]: NVIDIA Corporation TU104GL [Tesla T4] [10de:1eb8] (rev a1) "
        "(prog-if 00 [VGA controller])",
        "0000:01:00.0",
        "0x0300",
        "0x1eb8",
        "a1",
        "Tesla T4",
    ),
    (
        "0001:c1:00.0 3D controller [0302]: NVIDIA Corporation GA100 [A100 SXM4 40GB] [10de:20b0]",
        "0001:c1:00.0",
        "0x0302",
        "0x20b0",
        None,
        "A100 SXM4 40GB",
    ),
]


@pytest.mark.parametrize(("line", "bus_id", "class_id", "device_id", "revision", "name"), LSPCI_LINES)
def test_parse_lspci(line, bus_id, class_id, device_id, revision, name):
    parsed = _nvidia.parse_lspci("pcilib: sysfs_read_vpd: read failed: No such device\n" + line + "\n")
    assert list(parsed) == [bus_id]
    entry = parsed[bus_id]
    assert (entry["class_id"], entry["device_id"], entry["revision"], entry["vendor_id"]) == (
        class_id,
        device_id,
        revision,
        "0x10de",
    )
    assert _nvidia.lspci_name(entry["description"]) == name


PROC_VERSIONS = [
    (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.261.03  Wed Jul 16 18:09:51 UTC 2025\n",
        "535.261.03",
        "proprietary",
    ),
    (
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.127.05  Release Build  "
        "(dvs-builder@U16-I3-B03-4-3)  Tue Oct  8 03:22:07 UTC 2024\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14+deb12u1)\n",
        "550.127.05",
        "open",
    ),
    (
        "NVRM version: NVIDIA UNIX aarch64 Kernel Module  570.133.20  Fri Mar 14 22:05:12 UTC 2025\n",
        "570.133.20",
        "proprietary",
    ),
    ("garbage\n", None, None),
    (None, None, None),
]


@pytest.mark.parametrize(("content", "version", "flavour"), PROC_VERSIONS)
def test_parse_proc_version(content, version, flavour):
    assert _nvidia.parse_proc_version(content) == dict(version=version, kernel_module=flavour)


def test_parse_proc_gpu_information():
    host = harness.load_host("p4")
    info = _nvidia.parse_proc_gpu_information(harness.fixture_text(host, "information-3b.txt"))
    assert info == dict(name="Tesla P4", uuid="GPU-5b3a0a4e-8f7c-6d21-9e0b-3c4d5e6f7a81", minor=0)
    unreadable = "Model: \t\t Tesla P4\nGPU UUID: \t GPU-????????-????-????-????-????????????\nDevice Minor: \t 3\n"
    assert _nvidia.parse_proc_gpu_information(unreadable) == dict(name="Tesla P4", uuid=None, minor=3)


BUS_IDS = [
    ("00000000:3B:00.0", "0000:3b:00.0"),
    ("0000:3b:00.0", "0000:3b:00.0"),
    ("3b:00.0", "0000:3b:00.0"),
    (b"00000001:C1:00.0", "0001:c1:00.0"),
    ("0000:3b:00.8", None),
    ("not a bus id", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("raw", "normalized"), BUS_IDS)
def test_normalize_bus_id(raw, normalized):
    assert _nvidia.normalize_bus_id(raw) == normalized


@pytest.mark.parametrize(
    ("cc", "name"),
    [
        ("6.1", "Pascal"),
        ("7.5", "Turing"),
        ("8.0", "Ampere"),
        ("8.9", "Ada Lovelace"),
        ("9.0", "Hopper"),
        ("10.0", "Blackwell"),
        ("4.2", None),
        (None, None),
        ("x", None),
    ],
)
def test_architecture(cc, name):
    assert _nvidia.architecture(cc) == name


@pytest.mark.parametrize("name", harness.HOSTS)
def test_sysfs_trees(tmp_path, name):
    """The materialised tree reads back as the host.yaml says: NVIDIA functions only, driver links followed."""
    host = harness.load_host(name)
    root = harness.materialize(host, tmp_path)
    devices = _nvidia.read_pci_devices(str(root))
    expected = {bdf: attrs for bdf, attrs in (host.get("pci") or {}).items() if attrs["vendor"] == "0x10de"}
    assert [d["bus_id"] for d in devices] == sorted(expected)
    for device in devices:
        attrs = expected[device["bus_id"]]
        assert device["kernel_driver"] == attrs.get("driver")
        assert device["device_id"] == attrs["device"]
        assert device["is_gpu"] is attrs["class"].startswith("0x03")
        assert device["numa_node"] == (int(attrs["numa_node"]) if attrs["numa_node"] != "-1" else -1)


def test_missing_sysfs_is_empty(tmp_path):
    assert _nvidia.read_pci_devices(str(tmp_path)) == []
    assert _nvidia.read_driver(str(tmp_path)) == dict(loaded=False, version=None, kernel_module=None)
    assert _nvidia.read_proc_gpus(str(tmp_path)) == {}
    assert _nvidia.read_library_version(str(tmp_path)) is None


def test_library_version(tmp_path):
    lib = tmp_path / "usr" / "lib" / "x86_64-linux-gnu"
    lib.mkdir(parents=True)
    for name in ("libnvidia-ml.so", "libnvidia-ml.so.1", "libnvidia-ml.so.550.127.05"):
        (lib / name).write_text("")
    assert _nvidia.read_library_version(str(tmp_path)) == "550.127.05"


# ---------------------------------------------------------------------------------------------------------------
# NVML through the stand-in
# ---------------------------------------------------------------------------------------------------------------


def test_nvml_collect_two_gpus():
    fake = harness.fake_nvml_for(harness.load_host("two_h100"))
    system, gpus = _nvidia.nvml_collect(fake)
    assert system == dict(driver_version="550.90.07", nvml_version="12.550.90.07", cuda_version="12.4")
    assert [(g["index"], g["bus_id"], g["memory_total_mib"], g["ecc_errors_corrected_volatile"]) for g in gpus] == [
        (0, "0000:18:00.0", 81559, 0),
        (1, "0000:2a:00.0", 81559, 3),
    ]
    assert fake.calls[0] == "nvmlInit" and fake.calls[-1] == "nvmlShutdown"


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (9, "driver_not_loaded"),
        (12, "library_not_found"),
        (18, "driver_library_mismatch"),
        (4, "no_permission"),
        (999, "query_failed"),
    ],
)
def test_nvml_init_errors(code, kind):
    with pytest.raises(_nvidia.NvidiaError) as caught:
        _nvidia.nvml_collect(harness.FakeNVML(init_error=code))
    assert caught.value.kind == kind
    assert f"(NVML error {code})" in str(caught.value)


def test_nvml_error_mid_enumeration_still_shuts_down():
    fake = harness.fake_nvml_for(harness.load_host("p4"))
    fake.devices[0]["handle_error"] = 4  # not a lost GPU: the whole query fails
    with pytest.raises(_nvidia.NvidiaError) as caught:
        _nvidia.nvml_collect(fake)
    assert caught.value.kind == "no_permission"
    assert fake.calls[-1] == "nvmlShutdown"


def test_ecc_counters_not_read_when_ecc_is_off():
    fake = harness.fake_nvml_for(harness.load_host("rtx4090"))
    _system, gpus = _nvidia.nvml_collect(fake)
    assert "nvmlDeviceGetTotalEccErrors" not in fake.calls
    assert gpus[0]["ecc_errors_uncorrected_volatile"] is None


def test_call_with_timeout():
    assert _nvidia.call_with_timeout(lambda: 42, 1) == 42
    with pytest.raises(ZeroDivisionError):
        _nvidia.call_with_timeout(lambda: 1 / 0, 1)
    import threading

    gate = threading.Event()
    try:
        with pytest.raises(_nvidia.NvidiaError) as caught:
            _nvidia.call_with_timeout(lambda: gate.wait(30), 0.2)
        assert caught.value.kind == "query_timeout"
    finally:
        gate.set()


def test_every_problem_code_has_a_fix():
    codes = {
        "no_driver",
        "nouveau_bound",
        "other_driver_bound",
        "driver_library_mismatch",
        "driver_not_loaded",
        "gpu_lost",
    }
    codes |= {"gpu_not_reported", "no_query_tool", "query_failed", "query_timeout", "no_permission"}
    codes |= {"ecc_uncorrected_errors", "ecc_mode_pending", "reset_required"}
    assert codes == set(_nvidia.FIX)


def test_pci_gpu_bound_to_nvidia_but_not_listed():
    """The driver answers, but not for one nvidia-bound device (RmInitAdapter failed): not_reported."""
    pci = [
        dict(
            bus_id="0000:18:00.0",
            vendor_id="0x10de",
            device_id="0x2330",
            class_id="0x030200",
            kernel_driver="nvidia",
            is_gpu=True,
        ),
        dict(
            bus_id="0000:2a:00.0",
            vendor_id="0x10de",
            device_id="0x2330",
            class_id="0x030200",
            kernel_driver="nvidia",
            is_gpu=True,
        ),
    ]
    queried = [dict(index=0, bus_id="0000:18:00.0", state="ok", name="NVIDIA H100 80GB HBM3", notes=[])]
    facts = _nvidia.build_facts(pci, {}, dict(loaded=True, version="550.90.07"), {}, "nvml", {}, queried, None, None)
    assert [g["state"] for g in facts["gpus"]] == ["ok", "not_reported"]
    assert [(p["code"], p["bus_id"]) for p in facts["problems"]] == [("gpu_not_reported", "0000:2a:00.0")]


def test_container_without_sysfs_counts_what_the_driver_lists():
    queried = [dict(index=0, bus_id="0000:18:00.0", state="ok", name="NVIDIA H200", notes=[])]
    facts = _nvidia.build_facts([], {}, dict(loaded=True), {}, "nvidia-smi", {}, queried, None, None)
    assert (facts["gpu_count"], facts["usable_gpu_count"], facts["problems"]) == (1, 1, [])
    assert facts["gpus"][0]["kernel_driver"] == "nvidia"


def test_vfio_bound_gpu_is_a_warning():
    pci = [
        dict(
            bus_id="0000:41:00.0",
            vendor_id="0x10de",
            device_id="0x2684",
            class_id="0x030000",
            kernel_driver="vfio-pci",
            is_gpu=True,
        )
    ]
    facts = _nvidia.build_facts(
        pci, {}, dict(loaded=False), {}, None, None, None, _nvidia.NvidiaError("unavailable", "x"), None
    )
    assert [(p["code"], p["severity"]) for p in facts["problems"]] == [("other_driver_bound", "warning")]
    assert "vfio-pci" in facts["problems"][0]["message"]


def test_read_file_tolerates_unreadable_attributes(tmp_path):
    """sysfs answers EIO/ENODEV for a dead device's attributes: unreadable is None, not an error."""
    (tmp_path / "vendor").write_text("0x10de\n")
    (tmp_path / "config").mkdir()  # IsADirectoryError, an OSError like EIO
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    assert _nvidia.read_file(str(tmp_path / "vendor")) == "0x10de"
    assert _nvidia.read_file(str(tmp_path / "config")) is None
    assert _nvidia.read_file(str(tmp_path / "binary")) is None
    assert _nvidia.read_file(str(tmp_path / "missing")) is None
