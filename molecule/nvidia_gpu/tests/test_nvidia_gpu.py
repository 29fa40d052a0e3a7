"""The nvidia_gpu role on GPU-less systemd containers (testinfra, podman backend).

molecule-nvidia_gpu-force (the default host here) was converged with nvidia_gpu_force: its apt sources and pins
are checked against Debian's real mirror and keyring (apt-get update, apt-cache policy, a simulated install of
the headless set), the units with systemd-analyze verify (test_systemd_units.py), the exporter runs for real and
serves "no NVML" and the health gate's result says "no GPU". molecule-nvidia_gpu-skip was converged plainly:
gpu_facts found no GPU and the role installed nothing.

Not tested here (no GPU on these machines): the driver packages, DKMS, loading the module, reboots, NVML and the
health gate's matmul on a real GPU.
"""

import json
import re

import pytest
import testinfra

SKIP = testinfra.get_host("podman://molecule-nvidia_gpu-skip")
SOURCES = "/etc/apt/sources.list.d/sovereign-nvidia.sources"
PREFERENCES = "/etc/apt/preferences.d/sovereign-nvidia.pref"
HEADLESS = [
    "nvidia-kernel-dkms",
    "nvidia-smi",
    "libcuda1",
    "nvidia-persistenced",
    "nvidia-modprobe",
    "firmware-misc-nonfree",
    "dkms",
    "linux-headers-amd64",
]


def contract(host):
    return json.loads(host.file("/etc/ansible/facts.d/sovereign.fact").content_string)


# --- the plain host: a clear skip ------------------------------------------------------------------------------


def test_skip_host_gets_a_gpu_section_saying_no_gpu():
    gpu = contract(SKIP)["gpu"]
    assert gpu["gpu_count"] == 0
    assert gpu["usable_gpu_count"] == 0
    assert gpu["managed"] is False
    assert gpu["device_nodes"] == []
    assert "sovereign_gpu" not in contract(SKIP).get("metrics", {})


@pytest.mark.parametrize(
    "path",
    [SOURCES, PREFERENCES, "/etc/systemd/system/sovereign-gpu-exporter.service", "/opt/sovereign/gpu"],
)
def test_skip_host_has_nothing_installed(path):
    assert not SKIP.file(path).exists


# --- the forced host: sources and pins, checked by apt against Debian's mirror ---------------------------------


def test_sources_are_deb822_signed_with_the_needed_components(host):
    text = host.file(SOURCES).content_string
    stanzas = [s for s in text.split("\n\n") if "Types:" in s]
    assert len(stanzas) == 2
    for stanza in stanzas:
        assert "Components: contrib non-free non-free-firmware" in stanza
        assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in stanza
    assert "Suites: bookworm bookworm-updates" in stanzas[0]
    assert "Suites: bookworm-security" in stanzas[1]


def test_apt_takes_the_driver_from_non_free_at_the_pinned_branch(host):
    policy = host.check_output("apt-cache policy nvidia-smi nvidia-kernel-dkms libcuda1")
    candidates = [line.split()[-1] for line in policy.splitlines() if "Candidate:" in line]
    assert len(candidates) == 3 and all(c.startswith("535.") for c in candidates), policy
    assert "bookworm/non-free amd64 Packages" in policy
    # The version table gives the pinned version the pin's priority.
    assert len(re.findall(r"^\s+535\.\S+ 1000$", policy, re.MULTILINE)) >= 3, policy


def test_persistenced_and_firmware_come_from_contrib_and_non_free_firmware(host):
    policy = host.check_output("apt-cache policy nvidia-persistenced firmware-misc-nonfree nvidia-modprobe")
    assert "contrib amd64 Packages" in policy
    assert "non-free-firmware amd64 Packages" in policy
    assert "Candidate: (none)" not in policy


def test_the_x_driver_is_refused(host):
    policy = host.check_output("apt-cache policy nvidia-driver xserver-xorg-video-nvidia")
    assert policy.count("Candidate: (none)") == 2, policy


def test_the_headless_set_installs_without_x(host):
    """A simulated install of the role's package set resolves against the real archive and pulls in no X server,
    no VDPAU and no desktop libraries."""
    out = host.run("apt-get install -s --no-install-recommends " + " ".join(HEADLESS))
    assert out.rc == 0, out.stderr
    installs = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("Inst ")]
    assert "nvidia-kernel-dkms" in installs and "nvidia-smi" in installs
    assert not [p for p in installs if p.startswith(("xserver", "libx11", "nvidia-vdpau", "libgl", "nvidia-driver"))]


def test_nouveau_is_blacklisted(host):
    text = host.file("/etc/modprobe.d/sovereign-blacklist-nouveau.conf").content_string
    assert "blacklist nouveau\n" in text and "options nouveau modeset=0\n" in text


# --- units -----------------------------------------------------------------------------------------------------


def test_persistenced_is_enabled_and_waits_for_a_driver(host):
    svc = host.service("nvidia-persistenced")
    assert svc.is_enabled
    assert not svc.is_running
    assert "--persistence-mode" in host.file("/etc/systemd/system/nvidia-persistenced.service").content_string
    assert svc.systemd_properties["ConditionResult"] in ("no", "yes")


def test_exporter_runs_hardened_with_only_the_nvidia_control_node(host):
    svc = host.service("sovereign-gpu-exporter")
    assert svc.is_running and svc.is_enabled
    props = svc.systemd_properties
    assert props["User"] == "sovereign-gpu"
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["DevicePolicy"] == "closed"
    assert props["DeviceAllow"] == "/dev/nvidiactl rw"  # gpu_count 0: no /dev/nvidiaN, no unified memory
    # systemctl show prints an empty set as "CapabilityBoundingSet=", which testinfra drops; a unit without the
    # setting would show the full set.
    assert props.get("CapabilityBoundingSet", "") == ""


def test_exporter_serves_nvml_down_and_no_gpu_on_the_internal_address(host):
    address = host.interface.default().addresses[0]
    assert host.socket(f"tcp://{address}:9835").is_listening
    assert not host.socket("tcp://0.0.0.0:9835").is_listening
    # The venv's Python as the client (the image has no curl).
    fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
    text = host.check_output(f"/opt/sovereign/gpu/bin/python -c '{fetch}' http://{address}:9835/metrics")
    assert 'sovereign_gpu_exporter_nvml_up{error="NVML: NVML Shared Library Not Found"} 0.0' in text
    assert "sovereign_gpu_count 0.0" in text
    assert "sovereign_gpu_expected_count 0.0" in text


def test_health_gate_says_no_gpu(host):
    result = json.loads(host.file("/var/lib/sovereign/gpu/health.json").content_string)
    assert result["status"] == "no_gpu"
    assert result["passed"] is True
    assert result["summary"].startswith("no GPU: NVML: NVML Shared Library Not Found; torch is not installed")
    metrics = host.file("/var/lib/prometheus/node-exporter/sovereign_gpu_health.prom").content_string
    assert 'sovereign_gpu_health_passed{gpu="all",status="no_gpu"} 1' in metrics
    assert 'sovereign_job_success{job="gpu_health"} 1' in metrics  # run under the sovereign-job wrapper


def test_health_gate_unit_is_a_capability_free_oneshot(host):
    props = host.service("sovereign-gpu-health").systemd_properties
    assert props["Type"] == "oneshot"
    # systemctl show prints an empty set as "CapabilityBoundingSet=", which testinfra drops; a unit without the
    # setting would show the full set.
    assert props.get("CapabilityBoundingSet", "") == ""
    assert props["DevicePolicy"] == "closed"
    # gpu_count 0: the control and unified-memory nodes, no /dev/nvidiaN ("node rw" pairs).
    # systemctl show prints one DeviceAllow= line per node (newest first); testinfra keeps only one of them.
    lines = host.check_output("systemctl show -p DeviceAllow sovereign-gpu-health").splitlines()
    # ProtectClock=yes adds "char-rtc r" itself: only device paths are the role's.
    entries = [line.split("=", 1)[1].split()[0] for line in lines if line.startswith("DeviceAllow=")]
    nodes = [entry for entry in entries if entry.startswith("/dev/")]
    assert sorted(nodes) == ["/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidiactl"], lines


def test_venv_has_the_exporters_packages_and_no_torch_without_a_gpu(host):
    python = "/opt/sovereign/gpu/bin/python"
    assert host.run(f"{python} -c 'import pynvml, prometheus_client'").rc == 0
    assert host.run(f"{python} -c 'import torch'").rc != 0


def test_contract_publishes_the_gpu_section_and_the_exporter(host):
    c = contract(host)
    gpu = c["gpu"]
    assert gpu["gpu_count"] == 0 and gpu["managed"] is True and gpu["forced"] is True
    assert gpu["driver"] == dict(source="debian", kernel_module="proprietary", pin="535.*", loaded_version=None,
                                 reboot_required=False)  # fmt: skip
    assert gpu["health"] == dict(enabled=True, result="/var/lib/sovereign/gpu/health.json",
                                 unit="sovereign-gpu-health.service")  # fmt: skip
    endpoint = c["metrics"]["sovereign_gpu"]
    assert endpoint["job"] == "sovereign_gpu" and endpoint["port"] == 9835
    assert endpoint["address"] == host.interface.default().addresses[0]
