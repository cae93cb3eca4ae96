#!/bin/sh
# Boot-time benchmark: our VMM vs QEMU -M microvm vs QEMU -M q35 (see bench/boot.py).
# Usage: bench/boot.sh [-n RUNS] [--help]
exec python3 "$(dirname "$0")/boot.py" "$@"
