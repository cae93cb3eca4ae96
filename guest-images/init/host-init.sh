#!/bin/sh
# /init of the nested-KVM host initramfs (busybox-static + the host kernel's modules).
#
# The outer `vmm host` (vmm/src/host.rs) boots this under QEMU TCG with an emulated AMD SVM CPU,
# so that kvm-amd gives a real /dev/kvm one level down. Protocol with host.rs (version 2):
#
#   ttyS0         kernel console and this script's diagnostics (logged by the outer process)
#   ttyS1         batch: the command's stdout if that is a terminal outside;
#                 interactive: the command's terminal (a socket to the outer vmm, which
#                 forwards its terminal in raw mode)
#   ttyS2         batch: the command's stderr if that is a terminal outside (and not the same
#                 terminal as stdout: then stderr shares ttyS1, keeping the order of the two)
#   9p "host"     the outer machine's /, mounted read-write at /host, then chroot'ed into
#   9p "vmmrun"   the run directory, mounted at /run/vmm (and bound to /run/vmm in the chroot):
#     config        shell assignments (VMM_PROTO, VMM_MODE, VMM_STDOUT_TTY, ...), written outside
#     cmd.sh        the command: run by the chroot's /bin/sh (sets env, cwd, execs argv)
#     status        written here: the command's exit status (0..255), decimal
#     error         written here when the host could not be set up: one line
#     ready         created here when an interactive command's terminal is set up
#     started       created here just before the command runs (a host crash before it is retried)
#     stop          created outside to stop the run (Ctrl-C, SIGTERM): the command's session gets
#                   SIGTERM, then the host reports its status and powers off as usual
#     stdout/stderr the command's streams that are not terminals outside (relayed by cat)
#
# Everything the outer process needs to tell success from failure is in `status`/`error`; the
# machine powers off (poweroff -f) right after writing them.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

RUN=/run/vmm
HOST=/host
MSIZE=512000
run_mounted=0

msg() {
	echo "host-init: $*" >&2
}

# msg with the host's uptime, for the console log.
stamp() {
	read -r up _ </proc/uptime
	msg "$* (uptime $up s)"
}

halt_host() {
	sync
	poweroff -f
	# poweroff should not return; if it does, exiting init panics the kernel, which (panic=-1,
	# QEMU -no-reboot) also ends the machine.
	exit 1
}

fail() {
	msg "error: $*"
	if [ "$run_mounted" = 1 ]; then
		echo "$*" >"$RUN/error"
	fi
	halt_host
}

# --- busybox applets and the basic file systems -------------------------------------------------
for bb in /usr/bin/busybox /bin/busybox; do
	if [ -x "$bb" ]; then
		"$bb" mkdir -p /proc /sys /dev /run /usr/bin /usr/sbin
		"$bb" --install -s 2>/dev/null # applets the image did not link already
		break
	fi
done
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Interleaved CXL regions map each granule run on its own (vmm/src/cxl_interleave.rs): a 1 GiB
# region at 4 KiB granularity is 262144 mappings, far above the default limit of 65530.
echo 4194304 > /proc/sys/vm/max_map_count
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1

# --- modules: KVM (AMD SVM) and 9p over virtio --------------------------------------------------
# The image's list (/etc/vmm/modules, from guest-images/images.conf) or the built-in one.
release=$(uname -r)
moddir=/lib/modules/$release
modules="irqbypass ccp kvm kvm-amd netfs 9pnet 9pnet_virtio 9p virtio_net"
[ -s /etc/vmm/modules ] && modules=$(cat /etc/vmm/modules)
for m in $modules; do
	name=$(echo "$m" | tr - _)
	[ -d "/sys/module/$name" ] && continue # built in or already loaded as a dependency
	if [ -f "$moddir/modules.dep" ] && modprobe "$m" 2>/dev/null; then
		continue
	fi
	file=$(find "$moddir" \( -name "$m.ko" -o -name "$name.ko" \) 2>/dev/null | head -n 1)
	[ -n "$file" ] || fail "module $m not found under $moddir"
	insmod "$file" || fail "insmod $file failed (is SVM enabled in the QEMU CPU model?)"
done
[ -c /dev/kvm ] || fail "/dev/kvm missing after loading kvm-amd"
stamp "modules loaded"

# --- the run directory and this machine's root ---------------------------------------------------
mkdir -p "$RUN" "$HOST"
mount -t 9p -o "trans=virtio,version=9p2000.L,msize=$MSIZE" vmmrun "$RUN" ||
	fail "cannot mount the run directory (9p tag vmmrun)"
run_mounted=1
[ -f "$RUN/config" ] || fail "run directory has no config"
. "$RUN/config"
[ "${VMM_PROTO:-}" = 2 ] ||
	fail "host initramfs speaks protocol 2, the vmm wrote '${VMM_PROTO:-}': rebuild the host image"

mount -t 9p -o "trans=virtio,version=9p2000.L,cache=mmap,msize=$MSIZE" host "$HOST" ||
	fail "cannot mount the outer root file system (9p tag host)"
mount -t proc proc "$HOST/proc" || fail "cannot mount /proc in the chroot"
mount -t sysfs sysfs "$HOST/sys" || fail "cannot mount /sys in the chroot"
mount -t devtmpfs devtmpfs "$HOST/dev" || fail "cannot mount /dev in the chroot"
mkdir -p "$HOST/dev/pts" "$HOST/dev/shm"
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts "$HOST/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$HOST/dev/shm"
[ -e "$HOST/dev/fd" ] || ln -s /proc/self/fd "$HOST/dev/fd"
[ -e "$HOST/dev/stdin" ] || ln -s /proc/self/fd/0 "$HOST/dev/stdin"
[ -e "$HOST/dev/stdout" ] || ln -s /proc/self/fd/1 "$HOST/dev/stdout"
[ -e "$HOST/dev/stderr" ] || ln -s /proc/self/fd/2 "$HOST/dev/stderr"
mount -t cgroup2 cgroup2 "$HOST/sys/fs/cgroup" 2>/dev/null
# /tmp stays the outer machine's (over 9p): paths users pass there (backing files, kernels,
# sockets' directories) must mean the same file inside and out.
mount -t tmpfs -o mode=755 tmpfs "$HOST/run" || fail "cannot mount a tmpfs on /run in the chroot"
mkdir -p "$HOST/run/vmm"
mount -o bind "$RUN" "$HOST/run/vmm" || fail "cannot bind the run directory into the chroot"
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
# The user-mode network of `vmm run --nic` (host.rs user_network_args): slirp's fixed addresses,
# its gateway 10.0.2.2 being the outer machine's loopback.
for dev in /sys/class/net/*; do
	name=${dev##*/}
	[ "$name" = lo ] && continue
	ip addr add 10.0.2.15/24 dev "$name" && ip link set "$name" up &&
		ip route add default via 10.0.2.2 dev "$name" || msg "cannot configure $name"
	break
done
hostname vmm-host
stamp "file systems mounted"

# --- the command ---------------------------------------------------------------------------------
# Streams that are terminals outside are serial ttys here (raw; ttyS1 stdout, ttyS2 stderr).
# Streams that are not are pipes here, relayed by cat into $RUN/stdout / $RUN/stderr (9p: every
# write has reached the outer file when it returns); the outer vmm follows those files.
relays=""
relay() { # relay NAME: prints the fifo the command should write to
	mkfifo "/run/$1.fifo"
	(cat "/run/$1.fifo" >"$RUN/$1"; : >"/run/$1.done") &
	relays="$relays /run/$1.done"
}

# Wait (at most ~2 s) for the relays: a background child of the command may hold a pipe open.
wait_relays() {
	for r in $relays; do
		n=0
		while [ ! -e "$r" ] && [ "$n" -lt 40 ]; do
			usleep 50000
			n=$((n + 1))
		done
	done
}

# Settle a tty's pending output (stty's tcsetattr uses TCSADRAIN: it returns once the UART has
# handed every byte to QEMU).
drain() {
	stty -F "$1" clocal 2>/dev/null
}

# Wait for the command started in the background as PID and return its status; meanwhile a
# watcher turns the outer vmm's stop request ($RUN/stop) into SIGTERM for the command's session.
# (The command runs in the background only so that the watcher can run beside it: its
# redirections are its own, given where it starts.)
wait_command() { # wait_command PID
	(
		while kill -0 "$1" 2>/dev/null; do
			if [ -e "$RUN/stop" ]; then
				stamp "stop requested: SIGTERM to the command"
				kill -TERM -"$1" 2>/dev/null || kill -TERM "$1" 2>/dev/null
				break
			fi
			usleep 100000
		done
	) </dev/null >/dev/console 2>&1 &
	watcher=$!
	wait "$1"
	cmd_status=$?
	kill "$watcher" 2>/dev/null
	wait "$watcher" 2>/dev/null
	return "$cmd_status"
}

setup_tty() { # setup_tty DEV raw|sane
	if [ "$2" = raw ]; then
		stty -F "$1" raw -echo clocal -crtscts || fail "stty $1 failed"
	else
		stty -F "$1" sane clocal -crtscts || fail "stty $1 failed"
	fi
	if [ -n "${VMM_ROWS:-}" ] && [ -n "${VMM_COLS:-}" ]; then
		stty -F "$1" rows "$VMM_ROWS" cols "$VMM_COLS"
	fi
}

if [ "$VMM_MODE" = interactive ]; then
	tty=/dev/ttyS1
	# Keep the port open for the whole run: opening a closed port flushes what it received.
	exec 3<>"$tty"
	if [ "${VMM_TERM_RAW:-0}" = 1 ]; then
		setup_tty "$tty" raw
	else
		setup_tty "$tty" sane
	fi
	if [ "${VMM_STDERR_TTY:-0}" = 1 ]; then
		err=$tty
	else
		relay stderr
		err=/run/stderr.fifo
	fi
	: >"$RUN/ready" # the outer vmm starts forwarding input now (earlier input would be lost)
	: >"$RUN/started"
	setsid -c chroot "$HOST" /bin/sh /run/vmm/cmd.sh <"$tty" >"$tty" 2>"$err" 3<&- &
	wait_command $!
	status=$?
	wait_relays
	drain "$tty"
else
	exec 3<>/dev/ttyS1 4<>/dev/ttyS2
	setup_tty /dev/ttyS1 raw
	setup_tty /dev/ttyS2 raw
	out=/dev/ttyS1
	err=/dev/ttyS2
	if [ "${VMM_STDOUT_TTY:-0}" != 1 ]; then
		relay stdout
		out=/run/stdout.fifo
	fi
	if [ "${VMM_STDERR_SAME:-0}" = 1 ]; then
		err=$out # one terminal outside: one port, so stdout and stderr keep their order
	elif [ "${VMM_STDERR_TTY:-0}" != 1 ]; then
		relay stderr
		err=/run/stderr.fifo
	fi
	: >"$RUN/started"
	setsid chroot "$HOST" /bin/sh /run/vmm/cmd.sh </dev/null >"$out" 2>"$err" 3<&- 4<&- &
	wait_command $!
	status=$?
	wait_relays
	drain /dev/ttyS1
	drain /dev/ttyS2
fi

stamp "command exited with status $status"

# Stop whatever the command left running, flush file data written through 9p, report.
kill -TERM -1 2>/dev/null
usleep 100000
kill -KILL -1 2>/dev/null
sync
echo "$status" >"$RUN/status"
halt_host
