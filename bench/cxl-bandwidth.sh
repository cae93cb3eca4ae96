#!/bin/sh
# CXL memory bandwidth benchmark (not a test): sequential write and read bandwidth of CXL Type 3
# memory vs ordinary RAM in the same guest, in our VMM and in QEMU's cxl-type3 (see
# bench/cxl-bandwidth.py for exactly what runs).
#
# Usage: bench/cxl-bandwidth.sh [--size 256M] [--rounds 3] [--repeat 9] [--qemu-size 1M]
#                               [--qemu-max-secs 10] [--no-qemu] [--help for the rest]
#   Needs target/debug/vmm (cargo build -p vmm), rustc (memio is built statically once into
#   target/bench/memio), qemu-system-x86_64. Where /dev/kvm cannot run a stock guest, both VMMs
#   run inside ONE nested host (bench/boot.sh does the same); about 30 minutes here. Backing
#   files go to a tmpfs (/dev/shm; the nested host's /tmp is the outer one, over 9p).
#
# Prints one row per measured memory (write/read MB/s, MB = 10^6 bytes: a run's best round and
# its mean, each the median over the runs; the first-touch rate; the NUMA node of its pages),
# then the ratios CXL/RAM, medians (min-max) of the per-run best rates of adjacent runs:
#   ratio ours CXL/RAM (node 1 / node 0)       the CXL RAM region (NUMA node 1) vs node 0 RAM;
#                                              goal >= 0.9
#   ratio ours CXL/RAM (devdax / node 0)       the same region as /dev/dax0.0
#   ratio ours 2-way 4 KiB region / node 0     a second guest with two 256 MiB devices: the
#                                              kernel's `cxl create-region -w 2 -g 4096` RAM
#                                              region (node 1) vs node 0, first touch too;
#                                              goal >= 0.95; then the same with THP off for our
#                                              VMM (node 0 on 4 KiB host pages like the region:
#                                              the interleaved mapping's own cost); then 256 B
#                                              (shadow copy)
#   ratio QEMU CXL/RAM (devdax / anon, u64)    QEMU 7.2 pmem-only cxl-type3 as devdax vs its
#                                              RAM (emulated MMIO: smaller size, time-capped,
#                                              64-bit loads/stores; or why it could not run)
# Also written to target/bench/cxl-bandwidth-results.{txt,json}; logs in target/bench/cxl-logs/.
exec python3 "$(dirname "$0")/cxl-bandwidth.py" "$@"
