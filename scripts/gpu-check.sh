#!/usr/bin/env bash
# Real-GPU check for spillway's telemetry (issue 5, item 6).
#
# Run on a machine with an NVIDIA GPU and its driver (libnvidia-ml.so.1):
#   scripts/gpu-check.sh            # COST_SECS=10 by default
#   COST_SECS=60 scripts/gpu-check.sh
#
# It builds the release binary, prints one live line and one JSON summary
# read through NVML (every metric the devices support), checks that the GPU
# status is "ok" and that the core metrics are present for every device, and
# prints the sampler's cost at the default 250 ms rate over COST_SECS seconds
# (NVML + sysinfo, NVML initialisation reported apart).
# Exit status: 0 when the NVML path works; 1 when it does not (the status
# line says why); 2 when the build fails.
set -euo pipefail
cd "$(dirname "$0")/.."

COST_SECS="${COST_SECS:-10}"
BIN=target/release/spillway

echo "== GPUs the driver sees"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L || true
    nvidia-smi --query-gpu=driver_version,name,memory.total,power.limit --format=csv || true
else
    echo "nvidia-smi not found (NVML may still be installed)"
fi

echo "== cargo build --release"
cargo build --release || exit 2

echo "== spillway gpu --once (one window, human line)"
"$BIN" gpu --once

echo "== spillway gpu --once --json (window of ${COST_SECS} s: summary + sampler cost)"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
"$BIN" gpu --once --json --window-ms "$((COST_SECS * 1000))" >"$out"

if ! command -v python3 >/dev/null 2>&1; then
    cat "$out"
    if grep -q '"status":"ok"' "$out" && grep -q '"devices":\[{' "$out"; then
        echo "GPU status ok (install python3 for the per-metric check)"
        exit 0
    fi
    echo "GPU status is not ok: see the summary above"
    exit 1
fi

python3 - "$out" <<'PY'
import json, sys

doc = json.load(open(sys.argv[1]))
gpu = (doc.get("gpu") or {}).get("summary") or {}
print(json.dumps(doc, indent=2, sort_keys=True))
print()
status = gpu.get("status", "no gpu:batch window")
print(f"GPU status: {status}")
devices = gpu.get("devices") or []
core = [
    "utilization_gpu_percent", "utilization_memory_percent", "memory_used_bytes",
    "temperature_celsius", "power_watts", "sm_clock_mhz", "memory_clock_mhz",
    "throttled_percent",
]
# May be absent: unsupported on some devices (fans on datacenter GPUs, the
# energy counter before Volta, PCIe counters on vGPUs), and the slow metrics
# are only read on the first tick and every slow interval.
optional = [
    "power_avg_watts", "fan_speed_percent", "compute_processes_count",
    "pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second",
]
ok = status == "ok" and bool(devices)
for d in devices:
    name = f"gpu{d.get('index')} {d.get('name')} {d.get('uuid')}"
    missing = [m for m in core if m not in d]
    absent = [m for m in optional if m not in d]
    print(f"{name}: status {d.get('status')}, {d.get('samples')} samples, "
          f"memory_total_bytes {d.get('memory_total_bytes')}, "
          f"power_limit_watts {d.get('power_limit_watts')}, "
          f"throttle_reasons {d.get('throttle_reasons')}")
    if missing:
        print(f"  MISSING core metrics: {', '.join(missing)}")
        ok = False
    if absent:
        print(f"  not reported (unsupported or not sampled): {', '.join(absent)}")
    if d.get("status") != "ok":
        ok = False
s = doc.get("sampler") or {}
print(f"sampler cost at 250 ms: {s.get('ticks')} ticks, {s.get('samples')} samples, "
      f"{s.get('per_tick_us', 0):.0f} us per tick, {s.get('per_sample_us', 0):.0f} us per sample, "
      f"{s.get('cpu_percent', 0):.3f}% of one core; NVML init {s.get('init_ms', 0):.1f} ms")
sys.exit(0 if ok else 1)
PY
