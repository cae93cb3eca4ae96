#!/bin/sh
# RDMA NIC benchmark (not a test): perftest's ib_write_bw and ib_write_lat between two guests
# over our PVRDMA NIC (`vmm run --rdma-nic`) and between two QEMU guests running Linux rxe over
# virtio-net (the setup users pick today), with both figures and the ratios (bandwidth goal:
# ours >= 2x). See bench/rdma.py for exactly what runs.
#
# Usage: bench/rdma.sh [--size 65536] [--iters 2000] [--lat-iters 1000] [--no-qemu] [--no-vmm]
#                      [--help for the rest]
#   Needs target/release/vmm (cargo build --release -p vmm; --vmm PATH for another build) and
#   qemu-system-x86_64. Where /dev/kvm cannot
#   run a stock guest, both setups run inside ONE nested host with 2 vCPUs.
#
# The host-native benchmark of the RoCE engine itself (messages/s and bytes/s on one core):
#   cargo bench -p devices --features harness --bench roce_engine
#
# Results: stdout and target/bench/rdma-results.{txt,json}; logs in target/bench/rdma-logs/.
exec python3 "$(dirname "$0")/rdma.py" "$@"
