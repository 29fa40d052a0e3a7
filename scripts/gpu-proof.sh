#!/usr/bin/env bash
# The prepared run for a machine with an NVIDIA GPU (issue 13, "With a GPU"). NOT RUN YET: no GPU was lent to the
# session that wrote it. One run, about 3 minutes, prints what the issue's note and docs/benchmarks.md need:
#   1. the card and driver (nvidia-smi), and fresh recordings for tests/unit/plugins/modules/gpu_fixtures/;
#   2. sovereign.mlops.gpu_facts against the real card (needs ansible-core importable);
#   3. the GPU health gate (roles/nvidia_gpu/files/sovereign_gpu_health.py) with the role's expected table;
#   4. the NVML exporter's /metrics (nvml_up 1, the GPU count, XID counter families);
#   5. the runtime serving one model on cuda and on cpu: an OIP request whose cuda output is checked against
#      the cpu output, /metrics showing GPU memory, forward time (c=1) and c=16 throughput on each device.
# Usage, from the repository root:  bash scripts/gpu-proof.sh [OUT_DIR]     (default: $OUT, else /tmp/gpu-proof-out)
#   PYTHON=/path/to/python   a Python with torch (a CUDA build), uvicorn, httptools, prometheus-client, pyyaml
#                            (default: python3); nvidia-ml-py for steps 3-4 (the gate runs without it, less ECC).
#   GPU_PROOF_DRY_RUN=1      step 5 on a CPU-only machine, "cuda" served on cpu: checks this script, proves nothing.
# Exit status: 0 when every step that could run passed; the summary names the steps that could not run and why.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-/tmp/gpu-proof-out}}
mkdir -p "$OUT_DIR/recorded"
SUMMARY=$OUT_DIR/summary.txt
: >"$SUMMARY"
FAILED=0
note() { echo "$*" | tee -a "$SUMMARY"; }
step() { echo; echo "=== $* ($(date -u +%T))"; }

step "1. card, driver, recordings"
if ! command -v nvidia-smi >/dev/null; then
  note "1 card: NO nvidia-smi on this machine; nothing GPU-side can run"; FAILED=1
else
  nvidia-smi | tee "$OUT_DIR/nvidia-smi.txt"
  fields=$(paste -sd, tests/unit/plugins/modules/gpu_fixtures/query-gpu-fields.txt)
  nvidia-smi --query-gpu="$fields" --format=csv,noheader,nounits >"$OUT_DIR/recorded/nvidia-smi-query-gpu.csv"
  echo "rc=$?" >>"$OUT_DIR/recorded/nvidia-smi-query-gpu.rc"
  nvidia-smi -q >"$OUT_DIR/recorded/nvidia-smi-q.txt" 2>&1
  (lspci -Dnn -d 10de: || true) >"$OUT_DIR/recorded/lspci-Dnn.txt" 2>&1
  (cat /proc/driver/nvidia/version; cat /proc/driver/nvidia/gpus/*/information) >"$OUT_DIR/recorded/proc.txt" 2>&1
  for d in /sys/bus/pci/devices/*; do
    grep -q 0x10de "$d/vendor" 2>/dev/null || continue
    (echo "== $d"; cd "$d" && grep . vendor device class subsystem_* revision numa_node; readlink driver) 2>/dev/null
  done >"$OUT_DIR/recorded/sysfs.txt"
  (journalctl -k -b --no-pager -o short-monotonic 2>/dev/null || dmesg 2>/dev/null) | grep -E 'NVRM|nvidia' \
    >"$OUT_DIR/recorded/kernel-nvidia.txt" || true
  note "1 card: $(nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | paste -sd';')"
fi
"$PY" - <<'EOF' >"$OUT_DIR/python.txt" 2>&1
import sys
print("python", sys.version.split()[0])
for name in ("torch", "pynvml", "uvicorn", "httptools", "prometheus_client", "yaml", "ansible"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"), getattr(getattr(module, "version", None), "cuda", ""))
    except Exception as exc:
        print(name, "MISSING", exc)
try:
    import torch
    print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
except Exception as exc:
    print("torch/cuda:", exc)
EOF
cat "$OUT_DIR/python.txt"

step "2. gpu_facts against the real card"
if "$PY" -c "import ansible" 2>/dev/null; then
  ANSIBLE_COLLECTIONS_PATH=$ROOT/collections "$PY" -m ansible adhoc -i localhost, -c local localhost \
    -m sovereign.mlops.gpu_facts -e "ansible_python_interpreter=$PY" >"$OUT_DIR/gpu_facts.txt" 2>&1 \
    || ANSIBLE_COLLECTIONS_PATH=$ROOT/collections "$(dirname "$(command -v "$PY")")/ansible" -i localhost, -c local \
      localhost -m sovereign.mlops.gpu_facts -e "ansible_python_interpreter=$PY" >"$OUT_DIR/gpu_facts.txt" 2>&1
  rc=$?
  cat "$OUT_DIR/gpu_facts.txt"
  note "2 gpu_facts: rc=$rc $(grep -E '^ {12}(gpu_count|usable_gpu_count|backend):' "$OUT_DIR/gpu_facts.txt" | tr -s ' ' | paste -sd' ')"
  [ $rc -eq 0 ] || FAILED=1
else
  note "2 gpu_facts: NOT RUN (ansible-core is not importable by $PY)"
fi

step "3. health gate"
"$PY" - "$ROOT/roles/nvidia_gpu/defaults/main.yml" "$OUT_DIR/expected.json" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
try:
    import yaml
    table = yaml.safe_load(text)["nvidia_gpu_health_expected"]
except ImportError:  # the table's flow-style lines, without PyYAML
    table = [dict(match=m.group(1).encode().decode("unicode_escape"), dtype=m.group(2), tflops=float(m.group(3)))
             for m in re.finditer(r'- \{match: "([^"]+)", dtype: (\w+), tflops: ([\d.]+)\}', text)]
json.dump(table, open(sys.argv[2], "w"), indent=1)
print(len(table), "expected figures")
EOF
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
"$PY" roles/nvidia_gpu/files/sovereign_gpu_health.py --result "$OUT_DIR/health.json" --expected "$OUT_DIR/expected.json" \
  --expected-gpus "${gpus:-0}" --metrics-file "$OUT_DIR/health.prom" 2>&1 | tee "$OUT_DIR/health.txt"
rc=${PIPESTATUS[0]}
note "3 health gate: rc=$rc $(head -1 "$OUT_DIR/health.txt")"
grep -E '^  GPU ' "$OUT_DIR/health.txt" | tee -a "$SUMMARY"
[ "$rc" -eq 0 ] || FAILED=1

step "4. NVML exporter"
if "$PY" -c "import pynvml, prometheus_client" 2>/dev/null; then
  "$PY" roles/nvidia_gpu/files/sovereign_gpu_exporter.py --port 19835 --expected-gpus "${gpus:-0}" --interval 2 \
    >"$OUT_DIR/exporter.log" 2>&1 &
  exporter=$!
  sleep 5
  curl -sf http://127.0.0.1:19835/metrics >"$OUT_DIR/exporter.prom"; rc=$?
  kill "$exporter" 2>/dev/null
  note "4 exporter: rc=$rc $(grep -E '^sovereign_gpu_(exporter_nvml_up|count|expected_count|exporter_xid_watch_up)' "$OUT_DIR/exporter.prom" | paste -sd' ')"
  grep -E '^sovereign_gpu_(memory_used|temperature|power_watts|ecc_errors|utilization)' "$OUT_DIR/exporter.prom" | head -12 | tee -a "$SUMMARY"
  grep -q 'sovereign_gpu_exporter_nvml_up{error=""} 1.0' "$OUT_DIR/exporter.prom" || FAILED=1
else
  note "4 exporter: NOT RUN (nvidia-ml-py or prometheus-client missing for $PY)"
fi

step "5. runtime on cuda vs cpu"
PYTHONPATH=$ROOT/runtime/src${PYTHONPATH:+:$PYTHONPATH} "$PY" - "$OUT_DIR" <<'EOF' 2>&1 | tee "$OUT_DIR/runtime.txt"
"""One TorchScript MLP (512->2048->2048->512, a golden file made on CPU), served twice: --device cuda and cpu."""
import http.client, json, os, re, signal, subprocess, sys, threading, time
from pathlib import Path

out = Path(sys.argv[1])
try:
    import torch
except ImportError as exc:
    sys.exit(f"5 runtime: NOT RUN (no torch: {exc})")
dry = os.environ.get("GPU_PROOF_DRY_RUN") == "1"  # CPU-only check of this script: "cuda" runs on cpu
if not torch.cuda.is_available() and not dry:
    sys.exit(f"5 runtime: NOT RUN (torch {torch.__version__} sees no CUDA device)")
model_dir = out / "model"
model_dir.mkdir(exist_ok=True)
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
                          torch.nn.Linear(2048, 512)).eval()
torch.jit.script(mlp).save(str(model_dir / "mlp.ts"))
x = torch.linspace(-1, 1, 4 * 512).reshape(4, 512)
with torch.no_grad():
    y = mlp(x)
oip = lambda name, t: {"name": name, "datatype": "FP32", "shape": list(t.shape), "data": t.reshape(-1).tolist()}
golden = {"inputs": [oip("input__0", x)], "outputs": [oip("output__0", y)], "rtol": 1e-3, "atol": 1e-4}
(model_dir / "mlp.ts.golden.json").write_text(json.dumps(golden))
body = json.dumps({"inputs": [oip("input__0", x)]}).encode()
one = json.dumps({"inputs": [oip("input__0", x[:1])]}).encode()


def start(device, port):
    argv = [sys.executable, "-m", "sovereign_runtime", "serve", "--model-uri", str(model_dir / "mlp.ts"),
            "--model-name", "mlp", "--device", device, "--port", str(port), "--torch-threads", "1"]
    return subprocess.Popen(argv, stdout=open(out / f"runtime-{device}.log", "w"), stderr=subprocess.STDOUT)


def get(port, path, data=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST" if data else "GET", path, body=data, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def wait_ready(port, proc, limit=180):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if get(port, "/v2/health/ready")[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def load(port, concurrency, seconds, payload):
    counts, stop = [0] * concurrency, time.monotonic() + seconds
    def worker(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            conn.request("POST", "/v2/models/mlp/infer", body=payload, headers={"content-type": "application/json"})
            r = conn.getresponse(); r.read()
            counts[i] += r.status == 200
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    [t.start() for t in threads]; [t.join() for t in threads]
    return sum(counts) / seconds


def metric(text, name):
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


procs = {"cuda": start("cpu" if dry else "cuda", 18101), "cpu": start("cpu", 18102)}
ports = {"cuda": 18101, "cpu": 18102}
report = {}
try:
    for device, proc in procs.items():
        if not wait_ready(ports[device], proc):
            print(f"5 runtime: {device} did not get ready; see {out}/runtime-{device}.log"); sys.exit(1)
    outputs = {d: json.loads(get(p, "/v2/models/mlp/infer", body)[1])["outputs"][0]["data"] for d, p in ports.items()}
    diff = max(abs(a - b) for a, b in zip(outputs["cuda"], outputs["cpu"]))
    report["max_abs_diff_cuda_vs_cpu"] = diff
    for device, port in ports.items():
        for _ in range(200):
            get(port, "/v2/models/mlp/infer", one)
        text = get(port, "/metrics")[1].decode()
        s = metric(text, "sovereign_runtime_compute_duration_seconds_sum")
        c = metric(text, "sovereign_runtime_compute_duration_seconds_count")
        report[device] = {
            "forward_ms_mean_c1": round(1000 * s / c, 3) if s and c else None,
            "req_per_s_c1": round(load(port, 1, 5, one), 1),
            "req_per_s_c16": round(load(port, 16, 10, one), 1),
            "gpu_memory_allocated_bytes": metric(text, "sovereign_runtime_gpu_memory_allocated_bytes"),
            "gpu_memory_reserved_bytes": metric(text, "sovereign_runtime_gpu_memory_reserved_bytes"),
        }
    ok = diff <= 1e-3 and (dry or (report["cuda"]["gpu_memory_allocated_bytes"] or 0) > 0)
    report["dry_run"] = dry
    report["ok"] = ok
    print(json.dumps(report, indent=1))
    (out / "runtime.json").write_text(json.dumps(report, indent=1))
    print(f"5 runtime: {'ok' if ok else 'FAILED'}: cuda vs cpu max |diff| {diff:.2e}; GPU memory allocated "
          f"{report['cuda']['gpu_memory_allocated_bytes']} B; forward c=1 cuda {report['cuda']['forward_ms_mean_c1']} ms"
          f" vs cpu {report['cpu']['forward_ms_mean_c1']} ms; c=16 cuda {report['cuda']['req_per_s_c16']} req/s vs cpu"
          f" {report['cpu']['req_per_s_c16']} req/s")
    sys.exit(0 if ok else 1)
finally:
    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
EOF
rc=${PIPESTATUS[0]}
grep '^5 runtime' "$OUT_DIR/runtime.txt" >>"$SUMMARY" || note "5 runtime: rc=$rc (see $OUT_DIR/runtime.txt)"
[ "$rc" -eq 0 ] || FAILED=1

echo; echo "=== summary (also in $SUMMARY)"; cat "$SUMMARY"
exit $FAILED
