#!/bin/sh
# /init of the vmm guest images (busybox sh; see guest-images/src/protocol.rs).
#
# Protocol with the VMM:
#   * once the file systems are mounted and the modules of /etc/vmm/modules and /vmm/modules are
#     loaded, write byte 0x01 to I/O port 0x500 ("init reached");
#   * command mode, when /vmm/args exists (the VMM appends a second cpio archive with it; a shell
#     fragment `set -- 'cmd' 'arg' ...`): source /vmm/env if present, run the command with stdin
#     /dev/null, stdout /dev/ttyS1 and stderr /dev/ttyS2 (both raw, no echo), write its exit
#     status as one byte to I/O port 0x501, power off;
#   * otherwise an interactive login shell on the console; power off when it exits.
# init must never exit: the kernel panics when it does.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() {
	echo "init: $*" >/dev/console
}

mount -t proc -o nosuid,nodev,noexec proc /proc || say "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || say "cannot mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || say "cannot mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,mode=0620,ptmxmode=0666 devpts /dev/pts || say "cannot mount /dev/pts"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp || say "cannot mount /tmp"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || say "cannot mount /run"
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
hostname -F /etc/hostname 2>/dev/null

# load_modules FILE: modprobe every module named in FILE (one per line, optional arguments).
load_modules() {
	[ -r "$1" ] || return 0
	while read -r mod args; do
		case "$mod" in
		'' | '#'*) continue ;;
		esac
		# shellcheck disable=SC2086 # module arguments are split on purpose
		modprobe "$mod" $args </dev/null || say "modprobe $mod failed"
	done <"$1"
}
load_modules /etc/vmm/modules
load_modules /vmm/modules

# Drivers the image carries but loads only for their device (no udev here): the PVRDMA function
# of `vmm run --rdma-nic` (15ad:0820) gets vmw_pvrdma and the user-space verbs and RDMA CM
# interfaces rdma-core needs.
for dev in /sys/bus/pci/devices/*; do
	[ "$(cat "$dev/vendor" 2>/dev/null):$(cat "$dev/device" 2>/dev/null)" = "0x15ad:0x0820" ] || continue
	for mod in vmw_pvrdma ib_uverbs rdma_ucm; do
		modprobe "$mod" </dev/null || say "modprobe $mod failed"
	done
	break
done

# Where systemd mounts them, so trace events, the kernel's debugfs knobs (CXL poison, ...) and
# configfs need no manual step (configfs is a module, loaded above from /etc/vmm/modules).
mount -t debugfs -o nosuid,nodev,noexec debugfs /sys/kernel/debug || say "cannot mount debugfs"
mount -t tracefs -o nosuid,nodev,noexec tracefs /sys/kernel/tracing || say "cannot mount tracefs"
mount -t configfs -o nosuid,nodev,noexec configfs /sys/kernel/config || say "cannot mount configfs"
# The loopback interface is up, as on a distribution.
ip link set lo up || say "cannot bring lo up"

# configure_nic MAC ADDR/PREFIX: bring the interface with that MAC up with that address
# (`vmm run --nic ...,ip=ADDR/PREFIX` passes vmm.nic=MAC,ADDR/PREFIX on the kernel command line).
configure_nic() {
	tries=0
	while [ "$tries" -lt 20 ]; do
		for dev in /sys/class/net/*; do
			[ "$(cat "$dev/address" 2>/dev/null)" = "$1" ] || continue
			name=${dev##*/}
			ip link set "$name" up || say "cannot bring $name up"
			ip addr add "$2" dev "$name" || say "cannot give $name the address $2"
			return 0
		done
		tries=$((tries + 1))
		sleep 0.1
	done
	say "no network interface with MAC $1"
}
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	vmm.nic=*,*)
		spec=${arg#vmm.nic=}
		configure_nic "${spec%%,*}" "${spec#*,}"
		;;
	esac
done

# outb PORT VALUE: write the byte VALUE (0-255) to I/O port PORT.
outb() {
	# shellcheck disable=SC2059 # the format is the octal escape of the byte
	printf "\\$(printf '%03o' "$2")" | dd of=/dev/port bs=1 seek="$1" count=1 conv=notrunc 2>/dev/null
}

outb $((0x500)) 1

if [ -f /vmm/args ]; then
	for tty in /dev/ttyS1 /dev/ttyS2; do
		stty -F "$tty" raw -echo || say "cannot put $tty in raw mode"
	done
	(
		HOME=/root
		TERM=linux
		export HOME TERM
		if [ -f /vmm/env ]; then
			. /vmm/env
		fi
		. /vmm/args
		"$@"
	) </dev/null >/dev/ttyS1 2>/dev/ttyS2
	status=$?
	outb $((0x501)) $((status & 255))
else
	cd /root 2>/dev/null
	HOME=/root TERM=linux setsid cttyhack sh -l
fi

poweroff -f
# Not reached unless poweroff failed; never let init exit.
echo o >/proc/sysrq-trigger 2>/dev/null
while :; do
	sleep 3600
done
