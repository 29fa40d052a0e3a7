#!/usr/bin/python
# Copyright: sovereign.mlops maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: gpu_facts
short_description: Facts about a host's NVIDIA GPUs, from the PCI bus up to the driver
version_added: 0.1.0
author: sovereign.mlops maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sovereign.mlops._attributes
  - sovereign.mlops._attributes.read_only
  - ansible.builtin.action_common_attributes.facts
description:
  - Reads, never changes, what a host has in NVIDIA GPUs and returns it as the fact C(ansible_facts.sovereign_gpu)
    (so C(sovereign_gpu) in later tasks, like every fact).
  - B(PCI devices) from sysfs (C(/sys/bus/pci/devices/*/{vendor,device,class}), vendor C(0x10de), PCI class display
    or 3D controller) and, when installed, C(lspci -Dnn) for their names. This works before any driver is
    installed.
  - B(The driver) loaded and its version (C(/proc/driver/nvidia/version), C(/sys/module/nvidia/version)), open or
    proprietary kernel module, the installed C(libnvidia-ml) version, and per GPU the model and UUID the kernel
    module registered (C(/proc/driver/nvidia/gpus/*/information)).
  - B(Per GPU), through NVML with the Python package C(nvidia-ml-py) (C(import pynvml)) when it and the driver's
    C(libnvidia-ml.so.1) are there, else C(nvidia-smi --query-gpu=... --format=csv,noheader,nounits). They give
    index, name, UUID, PCI bus id, memory total, compute capability (and architecture), persistence mode, ECC mode
    and volatile corrected/uncorrected ECC error counts, temperature, power limit. The CUDA version the driver
    supports comes from NVML or C(nvidia-smi -q).
  - A host without NVIDIA GPUs returns RV(ansible_facts.sovereign_gpu.gpu_count=0) and no problems; that is not an
    error.
  - What is wrong is reported as facts, not as a failure, in RV(ansible_facts.sovereign_gpu.problems), each naming
    the GPU (bus id, index) and the fix. A driver/library version mismatch (C(Failed to initialize NVML -
    Driver/library version mismatch)), a GPU that fell off the bus (XID 79; "Unable to determine the device
    handle for GPU...", C([GPU is lost]), C(lspci) C(rev ff)), a GPU with no driver, or with nouveau or vfio-pci
    bound, a loaded driver nothing can query, uncorrectable ECC errors and an ECC mode change waiting for a reset.
  - The module fails only on bad options. A playbook decides what a problem means, for example
    C(sovereign_gpu.problems | selectattr('severity', '==', 'error')).
  - Run it as root (C(become)) so NVML may read every GPU; sysfs and procfs need no privileges.
options:
  root:
    description:
      - Read C(/sys) and C(/proc) under this directory instead of C(/). The tests point it at recorded trees.
      - It does not change what NVML, O(nvidia_smi) and O(lspci) see, which is always the running host; with
        another root, set O(use_nvml=false) and give O(nvidia_smi) and O(lspci) explicitly (or as V("")).
    type: path
    default: /
  use_nvml:
    description:
      - Query the driver through NVML (C(nvidia-ml-py)) first. With V(false), or when C(pynvml) cannot be imported
        or NVML cannot start, O(nvidia_smi) is used.
    type: bool
    default: true
  nvidia_smi:
    description:
      - The C(nvidia-smi) program, a path or a name looked up in C(PATH) (and C(/usr/sbin), C(/usr/local/sbin)).
        When it is not installed the module goes on without it. V("") never runs it.
      - Default is C(nvidia-smi) from C(PATH).
    type: str
  lspci:
    description:
      - The C(lspci) program (pciutils), used for the devices' names. When it is not installed the module goes on
        with sysfs alone. V("") never runs it.
      - Default is C(lspci) from C(PATH) when O(root=/), and none otherwise (lspci describes the running host).
    type: str
  timeout:
    description:
      - Seconds to wait for NVML and for each C(nvidia-smi)/C(lspci) run. A wedged driver blocks them forever; a
        query that times out is reported as a problem (C(query_timeout)).
    type: int
    default: 30
attributes:
  facts:
    support: full
notes:
  - Unit tests replay recorded outputs of real cards (Tesla P4, GeForce RTX 4090, H100, H200) and broken hosts;
    NVML is exercised through a stand-in C(pynvml) module. On the machines this collection is developed on there is
    no GPU, so the module has run for real only on hosts without one (RV(ansible_facts.sovereign_gpu.gpu_count=0)).
requirements:
  - Optional, for the richest facts, the Python package C(nvidia-ml-py) (the C(pynvml) module) on the host, else
    C(nvidia-smi) (Debian package C(nvidia-smi)).
seealso:
  - name: NVML API reference
    description: What each NVML query returns.
    link: https://docs.nvidia.com/deploy/nvml-api/
  - name: nvidia-smi documentation
    description: The query fields (C(nvidia-smi --help-query-gpu)) and their units.
    link: https://docs.nvidia.com/deploy/nvidia-smi/
"""

EXAMPLES = r"""
- name: Learn this host's GPUs
  sovereign.mlops.gpu_facts:
  become: true

- name: Skip the GPU tasks on a host without a GPU
  ansible.builtin.debug:
    msg: "{{ inventory_hostname }} has no NVIDIA GPU; nothing to install"
  when: sovereign_gpu.gpu_count == 0

- name: Stop on a host whose GPUs cannot be used, saying which and why
  ansible.builtin.fail:
    msg: "{{ sovereign_gpu.problems | selectattr('severity', '==', 'error') | map(attribute='message') | join(' ') }}"
  when: sovereign_gpu.problems | selectattr('severity', '==', 'error') | list | length > 0

- name: The CUDA build of torch this driver can run
  ansible.builtin.debug:
    msg: "driver {{ sovereign_gpu.driver.version }} supports CUDA {{ sovereign_gpu.driver.cuda_version }}"
  when: sovereign_gpu.usable_gpu_count > 0

- name: Only the kernel and PCI view, without NVML or nvidia-smi
  sovereign.mlops.gpu_facts:
    use_nvml: false
    nvidia_smi: ""
"""

RETURN = r"""
ansible_facts:
  description: The facts, under the one key C(sovereign_gpu).
  returned: always
  type: dict
  contains:
    sovereign_gpu:
      description: What the host has in NVIDIA GPUs.
      returned: always
      type: dict
      contains:
        gpu_count:
          description:
            - NVIDIA GPUs on this host, usable or not, one per physical GPU (the PCI devices of display or 3D
              class, and any GPU the driver lists that sysfs does not show, as in a container).
          returned: always
          type: int
          sample: 2
        usable_gpu_count:
          description: The GPUs whose RV(ansible_facts.sovereign_gpu.gpus[].state) is V(ok).
          returned: always
          type: int
          sample: 1
        backend:
          description: What answered for the GPUs, V(nvml) or V(nvidia-smi); V(null) when neither did.
          returned: always
          type: str
          sample: nvml
        backend_errors:
          description: Why a query (NVML, nvidia-smi) was not used, one line each; empty when the first worked.
          returned: always
          type: list
          elements: str
          sample: ["NVML: the Python package nvidia-ml-py (import pynvml) is not installed"]
        gpus:
          description: One entry per GPU, sorted by PCI bus id. Unknown values are V(null).
          returned: always
          type: list
          elements: dict
          contains:
            index:
              description: The driver's index (as C(nvidia-smi -i) and NVML count); V(null) without a driver.
              type: int
              sample: 0
            bus_id:
              description: PCI bus id in sysfs form (4-digit domain, lower case).
              type: str
              sample: "0000:01:00.0"
            name:
              description: The product name from the driver, else from the kernel module, else from C(lspci).
              type: str
              sample: Tesla P4
            uuid:
              description: The GPU's UUID.
              type: str
              sample: GPU-5b3a0a4e-8f7c-6d21-9e0b-3c4d5e6f7a81
            state:
              description:
                - V(ok) the driver answers for it; V(lost) fell off the bus or stopped answering; V(reset_required);
                  V(no_driver) no kernel driver bound; V(other_driver) nouveau, vfio-pci or another driver bound;
                  V(unqueried) bound to nvidia but nothing could query it (the host-level problem says why);
                  V(not_reported) bound to nvidia but the driver does not list it.
              type: str
              sample: ok
            kernel_driver:
              description: The kernel driver bound to the PCI device (sysfs C(driver) link).
              type: str
              sample: nvidia
            pci_device_id:
              description: PCI device id.
              type: str
              sample: "0x1bb3"
            memory_total_mib:
              description: Total framebuffer memory in MiB (what C(nvidia-smi) shows as C(memory.total)).
              type: int
              sample: 7680
            compute_capability:
              description: CUDA compute capability, C(major.minor).
              type: str
              sample: "6.1"
            architecture:
              description: The architecture that compute capability belongs to.
              type: str
              sample: Pascal
            persistence_mode:
              description: Whether persistence mode is on.
              type: bool
            ecc_mode:
              description: Whether ECC is on now; V(null) on GPUs without ECC.
              type: bool
            ecc_mode_pending:
              description: The ECC mode after the next reset.
              type: bool
            ecc_errors_corrected_volatile:
              description: Corrected ECC errors since the driver loaded; V(null) when ECC is off or unsupported.
              type: int
            ecc_errors_uncorrected_volatile:
              description: Uncorrectable ECC errors since the driver loaded; V(null) when ECC is off or unsupported.
              type: int
            temperature_c:
              description: GPU core temperature, degrees Celsius.
              type: int
            power_limit_w:
              description: The power limit in force, watts.
              type: float
              sample: 75.0
            source:
              description: Where the per-GPU values came from, V(nvml), V(nvidia-smi), V(proc) or V(pci).
              type: str
            notes:
              description: Values that could not be read and other evidence, one line each.
              type: list
              elements: str
        pci_devices:
          description:
            - Every NVIDIA PCI function in sysfs, GPUs and the others (HD audio, USB-C, NVSwitch).
            - Keys C(bus_id), C(vendor_id), C(device_id), C(class_id), C(subsystem_vendor_id), C(subsystem_device_id),
              C(revision), C(numa_node), C(kernel_driver), C(is_gpu).
          returned: always
          type: list
          elements: dict
        driver:
          description: The NVIDIA driver.
          returned: always
          type: dict
          contains:
            loaded:
              description: Whether the C(nvidia) kernel module is loaded.
              type: bool
            version:
              description: The loaded kernel module's version.
              type: str
              sample: 535.216.01
            kernel_module:
              description: V(open) or V(proprietary) kernel module; V(null) when not loaded.
              type: str
            library_version:
              description: The user-space driver (C(libnvidia-ml)) version.
              type: str
            nvml_version:
              description: NVML's version (NVML backend only).
              type: str
            cuda_version:
              description: The newest CUDA version this driver supports.
              type: str
              sample: "12.2"
        problems:
          description: What is wrong, most important first; empty on a healthy host and on a host without GPU.
          returned: always
          type: list
          elements: dict
          contains:
            code:
              description:
                - V(driver_library_mismatch), V(driver_not_loaded), V(no_driver), V(nouveau_bound),
                  V(other_driver_bound), V(gpu_lost), V(gpu_not_reported), V(reset_required), V(no_query_tool),
                  V(no_permission), V(query_timeout), V(query_failed), V(ecc_uncorrected_errors),
                  V(ecc_mode_pending).
              type: str
              sample: gpu_lost
            severity:
              description: V(error) (a GPU cannot be used) or V(warning).
              type: str
            bus_id:
              description: The GPU concerned; V(null) for a host-level problem.
              type: str
            index:
              description: The GPU's driver index, when known.
              type: int
            message:
              description: What was seen.
              type: str
            fix:
              description: What to do about it.
              type: str
"""

import importlib
import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sovereign.mlops.plugins.module_utils import _nvidia

# Which failure explains the most when no backend answered (the first in this list wins).
_ERROR_PRIORITY = (
    "driver_library_mismatch",
    "query_timeout",
    "gpu_lost",
    "reset_required",
    "no_permission",
    "driver_not_loaded",
    "query_failed",
    "library_not_found",
    "unavailable",
)


def import_pynvml():
    """The ``pynvml`` module of nvidia-ml-py (the tests put a stand-in into ``sys.modules``)."""
    try:
        return importlib.import_module("pynvml")
    except Exception as exc:  # ImportError, or a broken install
        raise _nvidia.NvidiaError(
            "unavailable", f"NVML: the Python package nvidia-ml-py (import pynvml) is not usable: {exc}"
        ) from exc


def find_program(module, program):
    """A program's path, or None when it is not installed (``""`` means do not use it)."""
    if not program:
        return None
    if os.path.isabs(program) or os.sep in program:
        return program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    return module.get_bin_path(program, opt_dirs=["/usr/sbin", "/usr/local/sbin"])


class Runner:
    """Runs the read-only tools under coreutils ``timeout`` (a hung nvidia-smi otherwise hangs the play)."""

    def __init__(self, module, timeout):
        self.module = module
        self.timeout = timeout
        self.timeout_program = module.get_bin_path("timeout")

    def __call__(self, argv):
        if self.timeout_program:
            argv = [self.timeout_program, "--kill-after=5", str(self.timeout), *argv]
        rc, out, err = self.module.run_command(argv, environ_update=dict(LC_ALL="C"))
        return rc, out or "", err or ""


def query_nvidia_smi(run, program):
    """(system, gpus) from nvidia-smi, or :class:`_nvidia.NvidiaError`."""
    fields = list(_nvidia.SMI_FIELDS)
    # An older driver rejects a field it does not know (compute_cap came with R510): ask again without it.
    while True:  # each retry drops one field, so this ends
        rc, out, err = run([program, *_nvidia.smi_query_args(fields)])
        combined = out + ("\n" + err if err else "")
        gpus, lost, _other = _nvidia.parse_smi_query(combined, fields)
        if gpus or lost:
            break
        invalid = _nvidia.invalid_smi_field(combined)
        if invalid and any(field == invalid for field, _key, _kind in fields) and len(fields) > 1:
            fields = [entry for entry in fields if entry[0] != invalid]
            continue
        if "no devices were found" in combined.lower():
            return dict(driver_version=None, nvml_version=None, cuda_version=None), []
        raise _nvidia.classify_smi_failure(combined, rc)
    for bus_id, reason in sorted(lost.items()):
        gpus.append(
            dict(
                index=None,
                bus_id=bus_id,
                state="lost",
                notes=[f"nvidia-smi: Unable to determine the device handle: {reason}"],
            )
        )
    system = dict(
        driver_version=next((gpu.get("driver_version") for gpu in gpus if gpu.get("driver_version")), None),
        nvml_version=None,
        cuda_version=None,
    )
    # -q exits non-zero when one GPU is lost, after printing the header with the CUDA version.
    _rc, out, _err = run([program, "-q"])
    system["cuda_version"] = _nvidia.cuda_version_from_q(out)
    return system, gpus


def pick_error(errors):
    """The failure that explains the most; a mismatch keeps the library version whoever saw it."""
    if not errors:
        return _nvidia.NvidiaError("unavailable", "neither NVML nor nvidia-smi is installed")
    ranked = sorted(
        errors, key=lambda e: _ERROR_PRIORITY.index(e.kind) if e.kind in _ERROR_PRIORITY else len(_ERROR_PRIORITY)
    )
    best = ranked[0]
    if best.kind in ("library_not_found", "unavailable"):
        # Nothing could be asked: every reason counts.
        return _nvidia.NvidiaError(best.kind, "; ".join(str(e) for e in errors))
    if best.library_version is None:
        best.library_version = next(
            (e.library_version for e in errors if e.kind == best.kind and e.library_version), None
        )
    return best


def gather(module):
    p = module.params
    root = p["root"]
    run = Runner(module, p["timeout"])

    pci = _nvidia.read_pci_devices(root)
    lspci_program = p["lspci"]
    if lspci_program is None:
        lspci_program = "lspci" if os.path.realpath(root) == "/" else ""
    lspci = {}
    lspci_path = find_program(module, lspci_program)
    if lspci_path and pci:
        rc, out, _err = run([lspci_path, "-Dnn", "-d", f"{_nvidia.NVIDIA_VENDOR_ID:04x}:"])
        if rc == 0:
            lspci = _nvidia.parse_lspci(out)

    driver = _nvidia.read_driver(root)
    proc_gpus = _nvidia.read_proc_gpus(root)
    library_version = _nvidia.read_library_version(root)

    backend, system, queried, errors = None, None, None, []
    if p["use_nvml"]:
        try:
            pynvml = import_pynvml()
            system, queried = _nvidia.call_with_timeout(lambda: _nvidia.nvml_collect(pynvml), p["timeout"])
            backend = "nvml"
        except _nvidia.NvidiaError as exc:
            errors.append(exc)
    smi_path = find_program(module, "nvidia-smi" if p["nvidia_smi"] is None else p["nvidia_smi"])
    if backend is None and smi_path:
        try:
            system, queried = query_nvidia_smi(run, smi_path)
            backend = "nvidia-smi"
        except _nvidia.NvidiaError as exc:
            errors.append(exc)
    elif backend is None:
        errors.append(
            _nvidia.NvidiaError(
                "unavailable",
                "nvidia-smi: not installed" if p["nvidia_smi"] != "" else 'nvidia-smi: not used (nvidia_smi="")',
            )
        )

    facts = _nvidia.build_facts(
        pci=pci,
        lspci=lspci,
        driver=driver,
        proc_gpus=proc_gpus,
        backend=backend,
        system=system,
        queried=queried,
        query_error=None if backend else pick_error(errors),
        library_version=library_version,
    )
    facts["backend_errors"] = [str(exc) for exc in errors]
    return facts


def main():
    module = AnsibleModule(
        argument_spec=dict(
            root=dict(type="path", default="/"),
            use_nvml=dict(type="bool", default=True),
            nvidia_smi=dict(type="str"),
            lspci=dict(type="str"),
            timeout=dict(type="int", default=30),
        ),
        supports_check_mode=True,
    )
    if module.params["timeout"] < 1:
        module.fail_json(msg=f"timeout must be at least 1 second, got {module.params['timeout']}")
    if not os.path.isdir(module.params["root"]):
        module.fail_json(
            msg=f"root {module.params['root']} is not a directory: give the directory holding sys/ and proc/"
        )
    module.exit_json(changed=False, ansible_facts=dict(sovereign_gpu=gather(module)))


if __name__ == "__main__":
    main()
