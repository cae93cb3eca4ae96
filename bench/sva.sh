#!/bin/sh
# SVA benchmark (not a test): in ONE VM (`--iommu vtd --dma-engine --ioat`), the copy throughput
# of the SVA DMA engine on pre-touched pages and on first-touch pages (every destination page a
# PRI page request the guest kernel serves: the cost of PRI), the page-fault round trip as the
# device sees it (page request sent -> group response held, from `vmm ctl dma-engine-state`),
# and the I/OAT engine of part 1 copying through the same VT-d unit (dmatest, DMA-API IOVAs),
# then the ratios.
#
# Usage: bench/sva.sh [SIZE]     (default 64M per copy; needs target/debug/vmm and the images:
#                                 cargo build -p vmm && target/debug/vmm images build)
#   VMM=path/to/vmm overrides the binary. Where /dev/kvm cannot run a stock guest the VM runs in
#   the nested host (about 2 minutes here). Results: target/bench/sva-results.txt.
set -eu
cd "$(dirname "$0")/.."
SIZE=${1:-64M}
VMM=${VMM:-target/debug/vmm}
OUT=target/bench
mkdir -p "$OUT"
SOCK=$OUT/sva-bench.sock
LOG=$OUT/sva-bench.log
rm -f "$SOCK"
script='
sva-test -v --touch --rounds 3 --size '"$SIZE"' 2>&1 | sed -n "s/^sva-test: round \([0-9]*\):.*MiB\/s=\([0-9.]*\).*/pretouched \1 \2/p"
sva-test -v --size '"$SIZE"' 2>&1 | sed -n "s/^sva-test: round \([0-9]*\):.*page_requests+\([0-9]*\).*MiB\/s=\([0-9.]*\).*/firsttouch \1 \3 \2/p"
modprobe dmatest iterations=64 test_buf_size=1048576 threads_per_chan=1 noverify=1 norandom=1 run=1
cat /sys/module/dmatest/parameters/wait > /dev/null
dmesg | sed -n "s/.*dmatest: .*summary.* \([0-9]*\) KB\/s .*/ioat-kbs \1/p"
echo BENCH-DONE
sleep 5
'
"$VMM" run --memory=2G --iommu=vtd --dma-engine --ioat --control="$SOCK" -- sh -c "$script" > "$LOG" 2>&1 &
pid=$!
while ! grep -q BENCH-DONE "$LOG" 2>/dev/null; do
  kill -0 $pid 2>/dev/null || { echo "bench/sva.sh: the VM ended early; see $LOG" >&2; exit 1; }
  sleep 1
done
"$VMM" ctl --control="$SOCK" dma-engine-state > "$OUT/sva-engine-state.json"
wait $pid || true
python3 - "$LOG" "$OUT/sva-engine-state.json" "$SIZE" <<'PY' | tee "$OUT/sva-results.txt"
import json, statistics, sys
log, state, size = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
pre = [float(l.split()[2]) for l in open(log) if l.startswith("pretouched ")]
first = [l.split() for l in open(log) if l.startswith("firsttouch ")]
ioat = [int(l.split()[1]) / 1024 for l in open(log) if l.startswith("ioat-kbs ")]
if not pre or not first or not ioat:
    sys.exit(f"bench/sva.sh: missing results in {log}")
rt = state["engines"][0]["counters"]["page_request_round_trip_us"]
p, f, i = statistics.median(pre), float(first[0][2]), statistics.median(ioat)
print(f"SVA copy, pre-touched pages ({size}, median of {len(pre)} rounds): {p:9.1f} MiB/s")
print(f"SVA copy, first-touch pages ({size}, {first[0][3]} page requests): {f:9.1f} MiB/s")
print(f"I/OAT copy through VT-d (dmatest, 1 MiB buffers, median of {len(ioat)} channels): {i:9.1f} MiB/s")
print(f"page-fault round trip seen by the device: mean {rt['mean']:.1f} us, max {rt['max']:.1f} us over {rt['count']} requests")
print(f"ratio first-touch / pre-touched (the cost of PRI): {f / p:.3f}")
print(f"ratio SVA pre-touched / I/OAT:                     {p / i:.3f}")
PY
