#!/usr/bin/env bash
# Run a command as on the slow machine of our kind (2 vCPUs, AVX2 only, ~67 GFLOP/s float32 matmul), from a faster
# one: MKL and oneDNN kept to AVX2 kernels, and the command's CPU time capped by a cgroup (v1 `cpu` controller,
# root only) at QUOTA of one CPU, so that a 2048^3 matmul on 2 threads gives about 67 GFLOP/s.
#
#   scripts/slow_machine.sh make test
#   QUOTA=0.84 scripts/slow_machine.sh .venv/bin/deltatune quickstart
#
# The cap slows everything alike, so work that is not matmul (elementwise kernels, Python, process start-up) runs
# slower than on the real slow machine: times measured here are an upper bound for it. Measure the quota first:
# `scripts/slow_machine.sh .venv/bin/python -c "..."` with the matmul in benchmarks/roofline.py, and adjust QUOTA.
set -euo pipefail
QUOTA="${QUOTA:-0.84}"
CG=/sys/fs/cgroup/cpu/deltatune-slow
if [ ! -w /sys/fs/cgroup/cpu ] && [ ! -d "$CG" ]; then
    echo "slow_machine.sh: needs root and the cgroup v1 cpu controller at /sys/fs/cgroup/cpu" >&2
    exit 2
fi
mkdir -p "$CG"
period=$(cat "$CG/cpu.cfs_period_us")
awk -v q="$QUOTA" -v p="$period" 'BEGIN { printf "%d\n", q * p }' > "$CG/cpu.cfs_quota_us"
echo $$ > "$CG/cgroup.procs"
export MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
export DELTATUNE_MACHINE_NOTE="emulated slow kind: MKL/oneDNN AVX2 kernels, CPU time capped at ${QUOTA} CPU (scripts/slow_machine.sh)"
exec "$@"
