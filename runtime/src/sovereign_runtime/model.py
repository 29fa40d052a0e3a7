"""Finding, loading and describing the model: MLflow model directories, TorchScript and torch.export files,
and MLflow registry URIs (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) resolved once, at start.

Formats, by what the file holds (not by its name):

* MLflow model directory (an ``MLmodel`` file with a ``pytorch`` flavor). MLflow 3 writes
  ``data/model.pt2`` (torch.export) by default, ``data/model.pth`` with ``serialization_format="pickle"``
  (a pickled ``nn.Module``, or a TorchScript archive when the model was scripted).
* A TorchScript archive (``torch.jit.save``), a torch.export archive (``torch.export.save``), or a
  pickled module (``torch.save``; needs ``--allow-pickle``, pickle runs code from the file).

Input/output names, datatypes and shapes come from the MLflow signature (tensor-based), else from the
golden file, else the model is described as one input of unknown shape.

The CUDA path (device selection, moving the module) is written for real but was only ever run on CPU
in this repository's tests; there is no GPU on the machines they run on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .logs import log_event
from .protocol import NUMPY_TO_OIP, OIP_TO_TORCH, RequestError, TensorSpec, tensor_from_json
from .registry import RegistryError, Schedule, with_retries

GOLDEN_FILE = "golden.json"
_REGISTRY = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")


class ModelLoadError(Exception):
    """The model could not be found, fetched or loaded: the server cannot serve anything. ``fields`` adds
    to the ``load_failed`` log line (the tracking server and cause, when it could not be reached)."""

    def __init__(self, message: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or {}


@dataclass
class Golden:
    """A known input and its expected output: readiness requires the model to reproduce it."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    rtol: float = 1e-4
    atol: float = 1e-5
    source: str = ""
    # The same rows by entity key (``[{"name": "customer_id", ...}]``), for a model served with a feature
    # service: start-up and the deploy's smoke test replay them through the online store.
    entity_inputs: list[dict[str, Any]] | None = None


@dataclass
class LoadedModel:
    module: Any  # a callable: nn.Module, ScriptModule or the GraphModule of an ExportedProgram
    name: str
    version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec] | None
    device: torch.device
    format: str
    source: str  # what was loaded (path, or registry URI -> version)
    sha256: str
    batch_dim: bool = True  # dim 0 of every input is the batch dimension
    static_batch: int | None = None  # torch.export programs traced with a fixed batch size
    golden: Golden | None = None
    load_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# URI resolution


@dataclass
class Resolved:
    path: Path
    registry_name: str | None = None
    registry_version: str | None = None
    tmpdir: str | None = None  # downloaded copy to remove once loaded


def resolve(
    uri: str,
    tracking_uri: str | None,
    schedule: Schedule | None = None,
    on_retry: Callable[[str, dict[str, Any]], None] | None = None,
) -> Resolved:
    """Local paths load in place; any other URI is fetched once through MLflow (the ``mlflow`` extra), on
    the registry retry schedule (see registry.py)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri and not uri.startswith(("models:", "runs:", "mlflow-artifacts:")):
        path = Path(uri)
        if not path.exists():
            raise ModelLoadError(f"model path {uri!r} does not exist")
        return Resolved(path)
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(f"{uri!r} needs mlflow: pip install 'sovereign-runtime[mlflow]' ({exc})") from None
    try:
        return with_retries(lambda: _fetch(uri, tracking_uri), tracking_uri, schedule or Schedule(), on_retry)
    except RegistryError as exc:
        raise ModelLoadError(str(exc), exc.fields) from None
    except ModelLoadError:
        raise
    except Exception as exc:  # the server answered, and said no (unknown model, version, alias, ...)
        where = tracking_uri or "the default tracking URI"
        raise ModelLoadError(f"could not fetch {uri!r} from MLflow ({where}): {exc}") from None


def _fetch(uri: str, tracking_uri: str | None) -> Resolved:
    """One attempt: resolve a registry URI to its immutable version, download it to a temporary dir."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name = version = None
    fetch = uri
    m = _REGISTRY.match(uri)
    if m:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        name = m["name"]
        if m["alias"]:
            mv = client.get_model_version_by_alias(name, m["alias"])
        elif m["version"] == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelLoadError(f"registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, m["version"])
        version = str(mv.version)
        fetch = f"models:/{name}/{version}"  # immutable from here on
    tmpdir = tempfile.mkdtemp(prefix="sovereign-runtime-")
    try:
        # registry_uri too: for models:/ URIs MLflow otherwise asks the process-wide registry URI.
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=fetch, dst_path=tmpdir, tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)  # a failed attempt leaves nothing behind
        raise
    return Resolved(Path(local), name, version, tmpdir)


# --------------------------------------------------------------------------------------------------
# Loading


def pick_device(wanted: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else CPU. ``cuda`` without a GPU is an error, not a fallback."""
    if wanted == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if wanted == "cuda":
        raise ModelLoadError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device("cpu")


def sniff(path: Path) -> str:
    """What a torch file holds: 'pt2' (torch.export), 'torchscript', or 'pickle' (torch.save of a module)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path} is not a torch archive: {exc}") from None
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "pt2"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "pickle"
    raise ModelLoadError(f"{path}: unrecognised torch archive (not TorchScript, torch.export or torch.save)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_file(path: Path, kind: str, device: torch.device, allow_pickle: bool) -> tuple[Any, dict[str, Any]]:
    details: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices and the like: not actionable here
        if kind == "torchscript":
            module = torch.jit.load(str(path), map_location=device)
        elif kind == "pt2":
            program = torch.export.load(str(path))
            # ExportedProgram.module() wraps the graph in guards, pytree flattening and pre/post hooks:
            # 81 us per call on the benchmark MLP. Its graph called directly, the way ExportedProgram
            # itself calls it (lifted parameters first), takes 24 us (eager nn.Sequential: 29 us).
            # Requests are validated against the same static dimensions before they get here
            # (_export_input_shapes), so the guards have nothing left to catch.
            module = _lifted_forward(program, device)
            if module is None:  # a program shape the fast path does not handle: the standard wrapper
                module = program.module().to(device) if device.type != "cpu" else program.module()
                details["pt2_call"] = "ExportedProgram.module()"
            else:
                details["pt2_call"] = "graph_module"
            details["export_input_shapes"] = _export_input_shapes(program)
        else:
            if not allow_pickle:
                raise ModelLoadError(
                    f"{path} is a pickled module; unpickling runs code from the file. Pass --allow-pickle "
                    "(SOVEREIGN_RUNTIME_ALLOW_PICKLE=true) if you trust it, or save it as torch.export / TorchScript"
                )
            module = torch.load(str(path), map_location=device, weights_only=False)
            if not isinstance(module, torch.nn.Module):
                raise ModelLoadError(f"{path} holds a {type(module).__name__}, not a torch.nn.Module")
    if kind != "pt2":  # nn.Module or ScriptModule (the pt2 path handled its device above)
        module = module.eval().to(device)
    return module, details


def _lifted_forward(program: Any, device: torch.device) -> Any:
    """The exported graph as a plain callable: flat tensors in, tuple of tensors out; None when the
    program has inputs/outputs this does not cover (mutated buffers, tokens, nested or keyword inputs)."""
    try:
        from torch.export.graph_signature import InputKind, OutputKind

        in_spec, out_spec = program.call_spec.in_spec, program.call_spec.out_spec
        args_spec, kwargs_spec = in_spec.children_specs
        if kwargs_spec.num_leaves or not all(c.is_leaf() for c in args_spec.children_specs):
            return None
        if not (out_spec.is_leaf() or all(c.is_leaf() for c in out_spec.children_specs)):
            return None
        sig = program.graph_signature
        if any(o.kind != OutputKind.USER_OUTPUT for o in sig.output_specs):
            return None
        lifted = []
        for i, spec in enumerate(sig.input_specs):
            if spec.kind == InputKind.USER_INPUT:
                if any(s.kind != InputKind.USER_INPUT for s in sig.input_specs[i:]):
                    return None  # user inputs interleaved with lifted ones
                break
            if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                return None
            tensor = program.state_dict.get(spec.target)
            if tensor is None:
                tensor = program.constants.get(spec.target)
            if not isinstance(tensor, torch.Tensor):
                return None
            lifted.append(tensor.detach().to(device))
        graph_forward = program.graph_module.forward
    except Exception:  # private-ish API changed shape: use the standard wrapper
        return None
    params = tuple(lifted)

    def forward(*inputs: torch.Tensor) -> Any:
        return graph_forward(*params, *inputs)

    return forward


def _export_input_shapes(program: Any) -> list[tuple[int, ...]]:
    """Static sizes of the user inputs of an ExportedProgram; -1 for symbolic (dynamic) dimensions."""
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if val is None or not hasattr(val, "shape"):
                continue
            shapes.append(tuple(d if isinstance(d, int) else -1 for d in val.shape))
    return shapes


def _signature_specs(raw: Any, kind: str) -> list[TensorSpec] | None:
    """MLflow tensor-based signature (a JSON string in MLmodel) to specs; None for column-based ones."""
    if not raw:
        return None
    entries = json.loads(raw) if isinstance(raw, str) else raw
    specs = []
    for i, entry in enumerate(entries):
        if entry.get("type") != "tensor":
            log_event("signature_ignored", logging.WARNING, reason="column-based signature; use a tensor signature")
            return None
        ts = entry["tensor-spec"]
        datatype = NUMPY_TO_OIP.get(str(ts["dtype"]))
        if datatype is None or datatype not in OIP_TO_TORCH:
            raise ModelLoadError(f"signature {kind} {i}: unsupported dtype {ts['dtype']!r}")
        specs.append(TensorSpec(entry.get("name") or f"{kind}__{i}", datatype, tuple(int(d) for d in ts["shape"])))
    return specs


def _golden_specs(tensors: list[dict[str, Any]]) -> list[TensorSpec]:
    """Specs from golden tensors: names and datatypes as given, the batch dimension left free."""
    return [TensorSpec(t["name"], t["datatype"], (-1, *t["shape"][1:])) for t in tensors]


def read_golden(path: Path) -> Golden:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"golden file {path}: {exc}") from None
    if not isinstance(raw, dict) or not raw.get("inputs") or not raw.get("outputs"):
        raise ModelLoadError(f"golden file {path}: needs non-empty 'inputs' and 'outputs' lists of OIP tensors")
    try:
        for item in [*raw["inputs"], *raw["outputs"]]:
            tensor_from_json(item)
    except RequestError as exc:
        raise ModelLoadError(f"golden file {path}: {exc.message}") from None
    entity = raw.get("entity_inputs")
    if entity is not None and (type(entity) is not list or not all(type(i) is dict for i in entity)):
        raise ModelLoadError(f"golden file {path}: 'entity_inputs' must be a list of OIP tensors")
    rtol, atol = float(raw.get("rtol", 1e-4)), float(raw.get("atol", 1e-5))
    return Golden(raw["inputs"], raw["outputs"], rtol, atol, str(path), entity or None)


def load(
    uri: str,
    *,
    name: str | None = None,
    version: str | None = None,
    device: str = "auto",
    tracking_uri: str | None = None,
    golden_file: str | None = None,
    allow_pickle: bool = False,
    registry: Schedule | None = None,
    on_retry: Callable[[str, dict[str, Any]], None] | None = None,
) -> LoadedModel:
    t0 = time.perf_counter()
    dev = pick_device(device)
    res = resolve(uri, tracking_uri, registry, on_retry)
    try:
        model = _load_resolved(res, uri, name, version, dev, golden_file, allow_pickle)
    finally:
        if res.tmpdir:
            shutil.rmtree(res.tmpdir, ignore_errors=True)
    model.load_seconds = time.perf_counter() - t0
    return model


def _load_resolved(
    res: Resolved,
    uri: str,
    name: str | None,
    version: str | None,
    dev: torch.device,
    golden_file: str | None,
    allow_pickle: bool,
) -> LoadedModel:
    path = res.path
    sig_in = sig_out = None
    golden_path = Path(golden_file) if golden_file else None
    if path.is_dir():
        mlmodel = path / "MLmodel"
        if not mlmodel.is_file():
            raise ModelLoadError(f"{path} is a directory without an MLmodel file")
        import yaml

        meta = yaml.safe_load(mlmodel.read_text()) or {}
        flavor = (meta.get("flavors") or {}).get("pytorch")
        if not flavor:
            raise ModelLoadError(f"{mlmodel}: no 'pytorch' flavor (found {sorted(meta.get('flavors') or {})})")
        data = path / flavor.get("model_data", "data")
        candidates = [data / "model.pt2", data / "model.pth"] if data.is_dir() else [data]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            raise ModelLoadError(f"{path}: no model.pt2 or model.pth under {data}")
        signature = meta.get("signature") or {}
        sig_in = _signature_specs(signature.get("inputs"), "input")
        sig_out = _signature_specs(signature.get("outputs"), "output")
        if golden_path is None:  # next to MLmodel, or logged with log_model(extra_files=[...golden.json])
            golden_path = next(
                (p for p in (path / GOLDEN_FILE, path / "extra_files" / GOLDEN_FILE) if p.is_file()), None
            )
        fmt_prefix = "mlflow-"
    else:
        weights = path
        if golden_path is None and Path(f"{path}.golden.json").is_file():
            golden_path = Path(f"{path}.golden.json")
        fmt_prefix = ""
    kind = sniff(weights)
    module, details = _load_file(weights, kind, dev, allow_pickle)
    golden = read_golden(golden_path) if golden_path else None
    if golden and path.is_dir() and golden_path and golden_path.is_relative_to(path):
        golden.source = f"model:{golden_path.relative_to(path)}"  # the download dir is temporary

    inputs = sig_in or (_golden_specs(golden.inputs) if golden else None)
    outputs = sig_out or (_golden_specs(golden.outputs) if golden else None)
    if inputs is None:
        inputs = [TensorSpec("input__0", "", None)]
    batch_dim = all(s.shape is None or (len(s.shape) > 0 and s.shape[0] == -1) for s in inputs)
    static_batch = None
    export_shapes = details.pop("export_input_shapes", None)
    if export_shapes and len(export_shapes) == len(inputs):
        # The traced program is the truth: its static dimensions override a looser signature.
        inputs = [_merge_shape(spec, shape) for spec, shape in zip(inputs, export_shapes, strict=True)]
        if batch_dim and all(len(s) > 0 and s[0] != -1 for s in export_shapes):
            static_batch = export_shapes[0][0]
            log_event(
                "static_batch",
                logging.WARNING,
                batch=static_batch,
                reason="torch.export traced the batch dimension as a constant (an input_example of batch 1?); "
                "requests must have exactly this batch size and dynamic batching is off",
            )
    if res.registry_name:
        name = name or res.registry_name
        version = version or res.registry_version
        source = f"models:/{res.registry_name}/{res.registry_version} (from {uri})"
    else:
        source = str(path)
    default_name = path.name if path.is_dir() else path.stem
    return LoadedModel(
        module=module,
        name=name or default_name,
        version=version or "1",
        inputs=inputs,
        outputs=outputs,
        device=dev,
        format=fmt_prefix + kind,
        source=source,
        sha256=_sha256(weights),
        batch_dim=batch_dim,
        static_batch=static_batch,
        golden=golden,
        details=details,
    )


def _merge_shape(spec: TensorSpec, exported: tuple[int, ...]) -> TensorSpec:
    if spec.shape is not None and len(spec.shape) != len(exported):
        return spec
    base = spec.shape or exported
    return TensorSpec(spec.name, spec.datatype, tuple(e if e != -1 else b for e, b in zip(exported, base, strict=True)))


def normalise_outputs(out: Any, specs: list[TensorSpec] | None) -> list[torch.Tensor]:
    """A model's return value (tensor, tuple/list of tensors, or dict) as a list in output-spec order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return list(out)
    if isinstance(out, dict):
        if specs and all(s.name in out for s in specs):
            return [out[s.name] for s in specs]
        return list(out.values())
    raise TypeError(f"model returned {type(out).__name__}, expected tensor(s)")


def cuda_memory(device: torch.device) -> tuple[int, int]:
    """(allocated, reserved) bytes on the model's CUDA device. Untested here: no GPU on this machine."""
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
