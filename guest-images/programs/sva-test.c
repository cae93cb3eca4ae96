// SPDX-License-Identifier: Apache-2.0
/*
 * sva-test: drives the project's SVA DMA engine (`vmm run --dma-engine`; the register interface
 * is docs/sva-engine.md) from a user process, on the process's own virtual addresses, through
 * Linux's uio_pci_generic_sva driver (PCI driver name "uio_pci_sva").
 *
 * What it does, in order:
 *   1. loads uio_pci_generic_sva (modprobe) unless its driver is registered;
 *   2. finds the engine (PCI 1234:5356, or --device BDF), moves it from another driver to
 *      uio_pci_sva (unbind, then new_id / bind) and finds its UIO device /dev/uioN;
 *   3. opens /dev/uioN: the driver binds the calling process's mm to the function
 *      (iommu_sva_bind_device), and /sys/bus/pci/devices/BDF/pasid shows the PASID it got;
 *   4. maps the engine's registers (UIO map 0 = BAR 0, at mmap offset 0 * page size), resets
 *      and enables the engine with a descriptor ring in its own anonymous memory, named by its
 *      own PASID (RING_PASID), submits descriptors carrying that PASID and polls the completion
 *      records (never longer than --timeout), then verifies the data with the CPU.
 *
 * The driver keeps ONE binding handle and ONE pasid per device, not per open file: every open()
 * overwrites them, and every release() unbinds whatever handle was stored last. So when two
 * processes have the device open, the first close() drops the other process's binding, and the
 * second one unbinds an already freed handle. sva-test therefore
 *   - opens /dev/uioN and reads the pasid attribute under an flock() on the device's sysfs
 *     directory, so the value read is its own;
 *   - closes through the same lock, after opening the device once more: that second open takes
 *     another reference on its OWN binding and makes it the stored handle again, so the two
 *     closes that follow release exactly its own two references (see sva_close()).
 * A process killed while it has the device open skips this, as any other user of the driver.
 *
 * Exit status: 0 success (or the --expect'ed status came), 1 wrong data, unexpected completion
 * status, engine halted or timeout, 2 usage error or the system cannot run the test (no driver,
 * no engine, the kernel refuses SVA, a system call failed). Errors are one line on stderr.
 *
 * --simulate replaces the engine by a thread of this program that executes the ring on the
 * processes' memory with process_vm_readv/writev (no IOMMU, no PASID translation, no page
 * requests): it exercises sva-test's own submission, completion and verification logic where
 * no engine exists.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif
#ifndef MAP_SYNC
#define MAP_SYNC 0x80000
#endif

/* ---- The engine's interface (docs/sva-engine.md) ------------------------------------------ */

#define ENGINE_VENDOR 0x1234
#define ENGINE_DEVICE 0x5356
#define DRIVER_MODULE "uio_pci_generic_sva"
#define DRIVER_NAME "uio_pci_sva"
#define DRIVER_DIR "/sys/bus/pci/drivers/" DRIVER_NAME
#define PCI_DEVICES "/sys/bus/pci/devices"

/* BAR 0 registers (64-bit, little-endian). */
#define REG_ID 0x000
#define REG_CAPS 0x008
#define REG_CTRL 0x010
#define REG_STATUS 0x018
#define REG_RING_BASE 0x020
#define REG_RING_SIZE 0x028
#define REG_RING_HEAD 0x030
#define REG_RING_TAIL 0x038
#define REG_RING_PASID 0x040
#define REG_ERROR 0x048
#define REG_ERROR_ADDR 0x050
#define REG_INT_STATUS 0x058
#define REG_COMPLETED 0x060
#define REG_PAGE_REQUESTS 0x068
#define REG_ATS_TRANSLATIONS 0x070
#define REG_ATC_INVALIDATIONS 0x078
#define REGS_SIZE 0x1000 /* the register block; BAR 0 is 16 KiB */

#define ENGINE_ID 0x0000000145415653ull /* "SVAE", interface version 1 */
#define CAPS_COPY (1ull << 0)
#define CAPS_FILL (1ull << 1)
#define CAPS_COMPARE (1ull << 2)
#define CAPS_ATS (1ull << 8)
#define CAPS_PRI (1ull << 9)
#define CAPS_PASID_BITS(c) (((c) >> 16) & 0x1f)
#define CAPS_MAX_RING(c) (((c) >> 32) & 0xffff)

#define CTRL_ENABLE (1ull << 0)
#define CTRL_RESET (1ull << 1)

#define STATUS_ENABLED (1ull << 0)
#define STATUS_HALTED (1ull << 1)
#define STATUS_BUSY (1ull << 2)
#define STATUS_WAITING_PAGE (1ull << 3)
#define STATUS_PRI_STOPPED (1ull << 4)

#define PASID_MASK 0xfffffu
#define PASID_VALID (1u << 31)

enum opcode { OP_NOP = 0, OP_COPY = 1, OP_FILL = 2, OP_COMPARE = 3 };

#define DESC_INTERRUPT (1u << 0)
#define DESC_NO_PAGE_REQUEST (1u << 1)
#define MAX_DESC_LEN (1ull << 30)

/* A ring entry, 64 bytes. */
struct desc {
	uint8_t opcode;
	uint8_t flags;
	uint16_t reserved0;
	uint32_t pasid;	   /* bits 19:0 PASID, bit 31 valid, bit 30 privileged */
	uint64_t src;	   /* COPY/COMPARE: source; FILL: the 8-byte pattern */
	uint64_t dst;	   /* COPY/FILL: destination; COMPARE: second source */
	uint64_t len;	   /* bytes, at most 1 GiB */
	uint64_t completion; /* completion record address, 8-byte aligned */
	uint64_t reserved1[3];
};
_Static_assert(sizeof(struct desc) == 64, "descriptor layout");

/* A completion record, 32 bytes; the engine writes `status` last. */
struct completion {
	uint8_t status;
	uint8_t fault_flags; /* bit 0 the faulting access was a write, bit 1 a read */
	uint16_t reserved0;
	uint32_t result; /* COMPARE: 0 equal, 1 different */
	uint64_t bytes_done;
	uint64_t fault_addr;
	uint64_t reserved1;
};
_Static_assert(sizeof(struct completion) == 32, "completion record layout");

enum status {
	ST_NONE = 0,
	ST_SUCCESS = 1,
	ST_PAGE_INVALID = 2,
	ST_PAGE_FAILURE = 3,
	ST_TRANSLATION_FAULT = 4,
	ST_BAD_DESCRIPTOR = 5,
	ST_ABORTED = 6,
};
static const char *const status_names[] = {
	"NONE", "SUCCESS", "PAGE_INVALID", "PAGE_FAILURE", "TRANSLATION_FAULT", "BAD_DESCRIPTOR",
	"ABORTED",
};
#define N_STATUS ((int)(sizeof(status_names) / sizeof(status_names[0])))

static const char *status_name(unsigned s)
{
	static char buf[16];

	if (s < (unsigned)N_STATUS)
		return status_names[s];
	snprintf(buf, sizeof(buf), "%u", s);
	return buf;
}

/* ---- Options --------------------------------------------------------------------------- */

enum mode { MODE_ANON, MODE_FILE, MODE_DAX };
static const char *const mode_names[] = {"anon", "file", "dax"};
static const char *const op_names[] = {"nop", "copy", "fill", "compare"};

#define EXIT_FAIL 1
#define EXIT_SETUP 2
#define MAX_PROCS 256
#define DEFAULT_SIZE (64ull << 20)
#define DEFAULT_PROCS_SIZE (1ull << 20)
#define MAX_SIZE (16ull << 30)

static struct options {
	const char *device;
	enum opcode op;
	uint64_t size;
	bool size_set;
	enum mode mode;
	const char *path;
	bool touch;
	unsigned rounds;
	bool fsync;
	int expect;
	bool expect_set;
	bool munmap_race;
	bool remap;
	unsigned procs;
	bool no_page_request;
	bool verbose;
	unsigned timeout_s;
	bool simulate;
} opt = {
	.op = OP_COPY,
	.size = DEFAULT_SIZE,
	.mode = MODE_ANON,
	.rounds = 1,
	.expect = ST_SUCCESS,
	.timeout_s = 60,
};

static void usage(FILE *f)
{
	fprintf(f,
		"usage: sva-test [OPTIONS]\n"
		"Drives the SVA DMA engine (PCI 1234:5356, docs/sva-engine.md; not in the VMM yet) through\n"
		"uio_pci_generic_sva on this process's own virtual addresses, tagged with the PASID\n"
		"the kernel bound to its address space, and verifies the result with the CPU.\n"
		"Without options: copies 64 MiB into a freshly mapped, never-touched anonymous\n"
		"buffer (every destination page is a PRI page request) and checks every byte.\n"
		"\n"
		"  --device BDF        the engine to use (default: the first PCI function 1234:5356)\n"
		"  --op copy|fill|compare\n"
		"                      copy: source -> destination; fill: an 8-byte pattern into the\n"
		"                      destination; compare: source with the destination, equal and\n"
		"                      then with one byte changed (default: copy)\n"
		"  --size BYTES        bytes per round, suffix K, M or G (default 64M; with --procs\n"
		"                      per process, default 1M; with --remap one page); split into\n"
		"                      descriptors of at most 1 GiB\n"
		"  --mode anon|file|dax\n"
		"                      the destination: private anonymous memory (default), or FILE\n"
		"                      mapped MAP_SHARED (dax: MAP_SYNC, refused unless FILE is on a\n"
		"                      DAX file system); the file is created and sized to --size\n"
		"  --path FILE         the file of --mode file|dax\n"
		"  --touch             write every destination page with the CPU first (no page\n"
		"                      requests for it)\n"
		"  --rounds N          repeat N times, with a new pattern each round (default 1)\n"
		"  --fsync             between rounds, msync(MS_SYNC) and fsync the file, so the next\n"
		"                      device write faults through PRI (page_mkwrite) again; the file is\n"
		"                      read back at the end (--mode file|dax)\n"
		"  --expect STATUS     the completion status expected: SUCCESS (default),\n"
		"                      PAGE_INVALID, PAGE_FAILURE, TRANSLATION_FAULT, BAD_DESCRIPTOR,\n"
		"                      ABORTED; exit 0 if it is the first non-SUCCESS status that came\n"
		"  --munmap-race       submit a copy into a never-touched buffer, munmap() it at once,\n"
		"                      and wait for the completion (expects PAGE_INVALID)\n"
		"  --remap             ATS coherence: copy into a page, replace the page under the same\n"
		"                      virtual address (mmap MAP_FIXED), copy again; the new page must\n"
		"                      hold the new data and the old page keep the old data\n"
		"  --procs N           N processes (at most %d) each bind their own PASID and copy and\n"
		"                      verify concurrently through one ring; the PASIDs must differ\n"
		"  --no-page-request   set NO_PAGE_REQUEST in the descriptors (a missing page ends the\n"
		"                      descriptor with TRANSLATION_FAULT)\n"
		"  --timeout SECONDS   give up when a completion is this late and the engine's\n"
		"                      counters did not move meanwhile (default 60)\n"
		"  --simulate          no engine: a thread of this program executes the ring on the\n"
		"                      processes' memory (tests sva-test itself; no IOMMU involved)\n"
		"  -v, --verbose       say what is done, with the engine's registers\n"
		"  -h, --help          this text\n"
		"\n"
		"Prints one summary line, e.g. `sva-test: copy anon 67108864 bytes pasid=3\n"
		"status=SUCCESS page_requests=16384 ats_translations=16400 atc_invalidations=0 ok`\n"
		"(the engine's counters: differences over the run). Exit status: 0 ok, 1 wrong data,\n"
		"unexpected status, engine halted or timeout, 2 usage error or the system cannot run\n"
		"the test (no driver, no engine, the kernel refuses SVA).\n",
		MAX_PROCS);
}

/* ---- Errors and clean-up ----------------------------------------------------------------- */

static char prefix[64] = "sva-test";

struct engine;
struct binding;
struct shared;

/* What die() must undo: an engine we enabled (reset it: nothing may DMA into memory that goes
 * away with us), our binding (released through sva_close()), children waiting for us. */
static struct {
	struct engine *owned;
	struct binding *binding;
	struct shared *shared;
} cleanup;

static void release_everything(void);

static void __attribute__((noreturn, format(printf, 2, 3))) die(int code, const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);
	fprintf(stderr, "%s: ", prefix);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	release_everything();
	exit(code);
}

static void __attribute__((format(printf, 1, 2))) verbose(const char *fmt, ...)
{
	va_list ap;

	if (!opt.verbose)
		return;
	printf("%s: ", prefix);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_us(long us)
{
	struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};

	nanosleep(&ts, NULL);
}

/* ---- Small sysfs helpers ---------------------------------------------------------------- */

/* Reads a small file into buf (NUL-terminated, trailing newline removed); -1 and errno. */
static int read_text(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, len - 1);
	int e = errno;
	close(fd);
	if (n < 0) {
		errno = e;
		return -1;
	}
	buf[n] = '\0';
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = '\0';
	return 0;
}

/* Writes text to a sysfs file in one write(); -1 and errno. */
static int write_text(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, text, strlen(text));
	int e = errno;
	close(fd);
	if (n < 0) {
		errno = e;
		return -1;
	}
	return 0;
}

static bool exists(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0;
}

/* The hexadecimal number in a sysfs file (vendor, device); -1 if unreadable. */
static long read_hex(const char *path)
{
	char buf[32], *end;
	long v;

	if (read_text(path, buf, sizeof(buf)) < 0)
		return -1;
	errno = 0;
	v = strtol(buf, &end, 16);
	if (errno || end == buf || *end)
		return -1;
	return v;
}

/* The name of the driver bound to a PCI function ("" if none). */
static void bound_driver(const char *bdf, char *name, size_t len)
{
	char link[PATH_MAX], target[PATH_MAX];
	ssize_t n;

	snprintf(link, sizeof(link), PCI_DEVICES "/%s/driver", bdf);
	n = readlink(link, target, sizeof(target) - 1);
	if (n < 0) {
		name[0] = '\0';
		return;
	}
	target[n] = '\0';
	const char *base = strrchr(target, '/');
	base = base ? base + 1 : target;
	size_t n_base = strnlen(base, len - 1);
	memcpy(name, base, n_base);
	name[n_base] = '\0';
}

/* ---- Finding and binding the engine ------------------------------------------------------ */

/* The device the test runs on. */
static struct device {
	char bdf[16];
	char devdir[64];       /* /sys/bus/pci/devices/BDF */
	char uio[16];	       /* uioN */
	char devnode[32];      /* /dev/uioN */
	uint64_t map_size;     /* UIO map 0 */
	uint64_t map_offset;
} dev;

/* Runs `modprobe uio_pci_generic_sva`; its first line of output goes to msg. Returns its exit
 * status (127: could not run it). */
static int run_modprobe(char *msg, size_t len)
{
	int fds[2];
	pid_t pid;
	int status;

	msg[0] = '\0';
	if (pipe2(fds, O_CLOEXEC) < 0)
		die(EXIT_SETUP, "pipe: %s", strerror(errno));
	fflush(stdout);
	pid = fork();
	if (pid < 0)
		die(EXIT_SETUP, "fork: %s", strerror(errno));
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);

		dup2(null, 0);
		dup2(fds[1], 1);
		dup2(fds[1], 2);
		execlp("modprobe", "modprobe", DRIVER_MODULE, (char *)NULL);
		dprintf(2, "cannot run modprobe: %s\n", strerror(errno));
		_exit(127);
	}
	close(fds[1]);
	size_t got = 0;
	for (;;) {
		ssize_t n = read(fds[0], msg + got, len - 1 - got);
		if (n <= 0)
			break;
		got += n;
		if (got == len - 1) {
			char sink[256];
			while (read(fds[0], sink, sizeof(sink)) > 0)
				;
			break;
		}
	}
	msg[got] = '\0';
	close(fds[0]);
	char *nl = strchr(msg, '\n');
	if (nl)
		*nl = '\0';
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

/* Loads uio_pci_generic_sva unless its PCI driver is registered; fails in one line naming the
 * kernel when it cannot (Linux before 7.x has no such driver). */
static void ensure_driver(void)
{
	char msg[256];
	struct utsname u;

	if (exists(DRIVER_DIR))
		return;
	int rc = run_modprobe(msg, sizeof(msg));
	if (exists(DRIVER_DIR)) {
		verbose("loaded %s", DRIVER_MODULE);
		return;
	}
	uname(&u);
	if (rc == 0)
		snprintf(msg, sizeof(msg), "it loaded, yet registered no %s driver", DRIVER_NAME);
	else if (!msg[0])
		snprintf(msg, sizeof(msg), "modprobe %s exited with %d", DRIVER_MODULE, rc);
	die(EXIT_SETUP,
	    "the kernel refuses SVA: this kernel (%s) lacks the %s driver (%s), so it cannot "
	    "bind a process's address space to a device; the 7.2 guest profile has it",
	    u.release, DRIVER_MODULE, msg);
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Accepts DDDD:BB:DD.F or BB:DD.F. */
static bool normalize_bdf(const char *in, char *out, size_t len)
{
	unsigned dom = 0, bus, slot, fn;
	char extra;

	if (sscanf(in, "%4x:%2x:%2x.%1x%c", &dom, &bus, &slot, &fn, &extra) != 4) {
		dom = 0;
		if (sscanf(in, "%2x:%2x.%1x%c", &bus, &slot, &fn, &extra) != 3)
			return false;
	}
	if (slot > 0x1f || fn > 7)
		return false;
	snprintf(out, len, "%04x:%02x:%02x.%x", dom, bus, slot, fn);
	return true;
}

/* Sets dev.bdf: --device, or the first engine in bus order. */
static void find_device(void)
{
	char path[PATH_MAX];

	if (opt.device) {
		if (!normalize_bdf(opt.device, dev.bdf, sizeof(dev.bdf)))
			die(EXIT_SETUP, "--device %s: not a PCI address like 0000:00:12.0",
			    opt.device);
		snprintf(path, sizeof(path), PCI_DEVICES "/%s", dev.bdf);
		if (!exists(path))
			die(EXIT_SETUP, "no PCI function %s (--device)", dev.bdf);
	} else {
		DIR *d = opendir(PCI_DEVICES);
		struct dirent *e;
		char *names[1024];
		size_t n = 0;

		if (!d)
			die(EXIT_SETUP, "cannot list %s: %s", PCI_DEVICES, strerror(errno));
		while ((e = readdir(d)) && n < 1024) {
			if (e->d_name[0] == '.')
				continue;
			names[n] = strdup(e->d_name);
			if (!names[n])
				die(EXIT_SETUP, "out of memory");
			n++;
		}
		closedir(d);
		qsort(names, n, sizeof(names[0]), cmp_str);
		for (size_t i = 0; i < n; i++) {
			snprintf(path, sizeof(path), PCI_DEVICES "/%s/vendor", names[i]);
			long v = read_hex(path);
			snprintf(path, sizeof(path), PCI_DEVICES "/%s/device", names[i]);
			long d_id = read_hex(path);
			if (!dev.bdf[0] && v == ENGINE_VENDOR && d_id == ENGINE_DEVICE)
				snprintf(dev.bdf, sizeof(dev.bdf), "%s", names[i]);
			free(names[i]);
		}
		if (!dev.bdf[0])
			die(EXIT_SETUP,
			    "no SVA DMA engine: no PCI function %04x:%04x (start the VM with "
			    "`vmm run --iommu vtd --dma-engine`)",
			    ENGINE_VENDOR, ENGINE_DEVICE);
	}
	snprintf(dev.devdir, sizeof(dev.devdir), PCI_DEVICES "/%s", dev.bdf);
	snprintf(path, sizeof(path), "%s/vendor", dev.devdir);
	long v = read_hex(path);
	snprintf(path, sizeof(path), "%s/device", dev.devdir);
	long d_id = read_hex(path);
	if (v != ENGINE_VENDOR || d_id != ENGINE_DEVICE)
		die(EXIT_SETUP, "%s is PCI %04lx:%04lx, not the SVA DMA engine %04x:%04x", dev.bdf,
		    v, d_id, ENGINE_VENDOR, ENGINE_DEVICE);
	verbose("engine %s", dev.bdf);
}

/* Moves the engine to uio_pci_sva: unbinds another driver, then adds the engine's ID to the
 * driver (new_id; EEXIST: the ID is known already, so bind the function by name). */
static void bind_driver(void)
{
	char drv[64], path[PATH_MAX];

	bound_driver(dev.bdf, drv, sizeof(drv));
	if (!strcmp(drv, DRIVER_NAME)) {
		verbose("%s is bound to %s already", dev.bdf, DRIVER_NAME);
		return;
	}
	if (drv[0]) {
		snprintf(path, sizeof(path), "%s/driver/unbind", dev.devdir);
		if (write_text(path, dev.bdf) < 0)
			die(EXIT_SETUP, "cannot unbind %s from %s: %s", dev.bdf, drv,
			    strerror(errno));
		verbose("unbound %s from %s", dev.bdf, drv);
	}
	char id[16];
	snprintf(id, sizeof(id), "%04x %04x", ENGINE_VENDOR, ENGINE_DEVICE);
	if (write_text(DRIVER_DIR "/new_id", id) < 0) {
		if (errno != EEXIST)
			die(EXIT_SETUP, "cannot add %s to %s/new_id: %s", id, DRIVER_DIR,
			    strerror(errno));
		/* The ID is there: the function was unbound since. Bind it by name; a concurrent
		 * binder may win (EBUSY, EEXIST, ENODEV): the check below decides. */
		if (write_text(DRIVER_DIR "/bind", dev.bdf) < 0)
			verbose("bind %s: %s", dev.bdf, strerror(errno));
	}
	bound_driver(dev.bdf, drv, sizeof(drv));
	if (strcmp(drv, DRIVER_NAME))
		die(EXIT_SETUP, "%s did not bind to %s (%s; see dmesg for the probe error)",
		    dev.bdf, DRIVER_NAME, drv[0] ? drv : "no driver");
	verbose("bound %s to %s", dev.bdf, DRIVER_NAME);
}

/* Finds the function's UIO device and its map 0 (BAR 0). */
static void find_uio(void)
{
	char path[PATH_MAX], buf[64];
	double deadline = now() + 5;

	snprintf(path, sizeof(path), "%s/uio", dev.devdir);
	while (!dev.uio[0]) {
		DIR *d = opendir(path);
		struct dirent *e;

		while (d && (e = readdir(d))) {
			size_t n = strlen(e->d_name);
			if (!strncmp(e->d_name, "uio", 3) && isdigit((unsigned char)e->d_name[3]) &&
			    n < sizeof(dev.uio))
				memcpy(dev.uio, e->d_name, n + 1);
		}
		if (d)
			closedir(d);
		if (!dev.uio[0]) {
			if (now() > deadline)
				die(EXIT_SETUP, "%s has no UIO device (%s is missing)", dev.bdf,
				    path);
			sleep_us(10000);
		}
	}
	snprintf(dev.devnode, sizeof(dev.devnode), "/dev/%s", dev.uio);
	while (!exists(dev.devnode)) {
		if (now() > deadline)
			die(EXIT_SETUP, "%s does not exist (is devtmpfs mounted on /dev?)",
			    dev.devnode);
		sleep_us(10000);
	}
	snprintf(path, sizeof(path), "/sys/class/uio/%s/maps/map0/size", dev.uio);
	if (read_text(path, buf, sizeof(buf)) < 0)
		die(EXIT_SETUP,
		    "%s has no UIO map 0: %s maps only BARs whose resource flags are exactly "
		    "MEM|SIZEALIGN (BAR 0 must be 32-bit non-prefetchable memory)",
		    dev.uio, DRIVER_NAME);
	dev.map_size = strtoull(buf, NULL, 0);
	snprintf(path, sizeof(path), "/sys/class/uio/%s/maps/map0/offset", dev.uio);
	if (read_text(path, buf, sizeof(buf)) == 0)
		dev.map_offset = strtoull(buf, NULL, 0);
	if (dev.map_size < dev.map_offset + REGS_SIZE)
		die(EXIT_SETUP, "%s map 0 is %#" PRIx64 " bytes: too small for the registers",
		    dev.uio, dev.map_size);
	verbose("%s: %s, map 0 %#" PRIx64 " bytes at offset %#" PRIx64, dev.bdf, dev.devnode,
		dev.map_size, dev.map_offset);
}

/* The function must sit behind an IOMMU to be bound (iommu_sva_bind_device() needs its group). */
static void check_iommu(void)
{
	char path[PATH_MAX];

	snprintf(path, sizeof(path), "%s/iommu_group", dev.devdir);
	if (!exists(path))
		die(EXIT_SETUP,
		    "the kernel refuses SVA for %s: the function is behind no IOMMU (no "
		    "iommu_group; start the VM with --iommu vtd)",
		    dev.bdf);
}

/* flock()s a sysfs directory: a lock between sva-test processes (each open() gets its own open
 * file description, so forked children exclude each other too). -1 and errno on failure. */
static int lock_dir(const char *path, bool nonblock)
{
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	while (flock(fd, LOCK_EX | (nonblock ? LOCK_NB : 0)) < 0) {
		if (errno == EINTR)
			continue;
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

/* ---- The simulated engine (--simulate) ------------------------------------------------- */

/* State shared by the processes of a --simulate run (MAP_SHARED, made before any fork). */
struct sim {
	uint64_t regs[REGS_SIZE / 8];
	uint32_t next_pasid;
	pid_t pid_of[MAX_PROCS + 2]; /* by PASID */
	volatile int stop;
};
static struct sim *sim;
static pthread_t sim_thread;
static bool sim_running;

static void sim_init(void)
{
	sim = mmap(NULL, sizeof(*sim), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sim == MAP_FAILED)
		die(EXIT_SETUP, "mmap: %s", strerror(errno));
	sim->regs[REG_ID / 8] = ENGINE_ID;
	sim->regs[REG_CAPS / 8] = CAPS_COPY | CAPS_FILL | CAPS_COMPARE | (20ull << 16) |
				  (4096ull << 32);
	snprintf(dev.bdf, sizeof(dev.bdf), "simulated");
	dev.map_size = REGS_SIZE;
}

static uint32_t sim_bind(void)
{
	uint32_t pasid = __atomic_add_fetch(&sim->next_pasid, 1, __ATOMIC_SEQ_CST);

	if (pasid >= MAX_PROCS + 2)
		die(EXIT_SETUP, "too many simulated bindings");
	sim->pid_of[pasid] = getpid();
	return pasid;
}

static uint64_t sim_reg(unsigned off)
{
	return __atomic_load_n(&sim->regs[off / 8], __ATOMIC_ACQUIRE);
}

static void sim_set(unsigned off, uint64_t v)
{
	__atomic_store_n(&sim->regs[off / 8], v, __ATOMIC_RELEASE);
}

/* Moves len bytes between our buffer and address addr of the process owning pasid; returns the
 * bytes moved (short: the address is not mapped there). */
static uint64_t sim_xfer(uint32_t pasid, uint64_t addr, void *buf, uint64_t len, bool write)
{
	if (!(pasid & PASID_VALID) || (pasid & PASID_MASK) >= MAX_PROCS + 2)
		return 0;
	pid_t pid = sim->pid_of[pasid & PASID_MASK];
	uint64_t done = 0;

	if (!pid)
		return 0;
	while (done < len) {
		struct iovec local = {(char *)buf + done, len - done};
		struct iovec remote = {(void *)(uintptr_t)(addr + done), len - done};
		ssize_t n = write ? process_vm_writev(pid, &local, 1, &remote, 1, 0)
				  : process_vm_readv(pid, &local, 1, &remote, 1, 0);
		if (n <= 0)
			break;
		done += n;
	}
	return done;
}

/* Executes one descriptor and writes its completion record (status byte last). */
static void sim_execute(const struct desc *d)
{
	static uint8_t a[1 << 16], b[1 << 16];
	struct completion c = {.status = ST_SUCCESS};
	uint64_t done = 0;

	if (d->opcode > OP_COMPARE || d->reserved0 || d->reserved1[0] || d->reserved1[1] ||
	    d->reserved1[2] || d->len > MAX_DESC_LEN || (d->pasid & ~(PASID_VALID | PASID_MASK)))
		c.status = ST_BAD_DESCRIPTOR;
	while (c.status == ST_SUCCESS && done < d->len && d->opcode != OP_NOP) {
		uint64_t n = d->len - done < sizeof(a) ? d->len - done : sizeof(a);
		uint64_t got;

		if (d->opcode == OP_FILL) {
			for (uint64_t i = 0; i < n; i++)
				b[i] = d->src >> (8 * ((done + i) % 8));
		} else {
			got = sim_xfer(d->pasid, d->src + done, a, n, false);
			if (got < n) {
				c.status = ST_PAGE_INVALID;
				c.fault_flags = 2;
				c.fault_addr = d->src + done + got;
				break;
			}
		}
		if (d->opcode == OP_COMPARE) {
			got = sim_xfer(d->pasid, d->dst + done, b, n, false);
			if (got < n) {
				c.status = ST_PAGE_INVALID;
				c.fault_flags = 2;
				c.fault_addr = d->dst + done + got;
				break;
			}
			if (memcmp(a, b, n)) {
				c.result = 1;
				break;
			}
		} else {
			got = sim_xfer(d->pasid, d->dst + done, d->opcode == OP_COPY ? a : b, n,
				       true);
			if (got < n) {
				c.status = ST_PAGE_INVALID;
				c.fault_flags = 1;
				c.fault_addr = d->dst + done + got;
				done += got;
				break;
			}
		}
		done += n;
	}
	c.bytes_done = done;
	if (d->completion) {
		/* Everything but the status, then the status. */
		sim_xfer(d->pasid, d->completion + 1, (uint8_t *)&c + 1, sizeof(c) - 1, true);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		sim_xfer(d->pasid, d->completion, &c.status, 1, true);
	}
}

static void *sim_main(void *unused)
{
	(void)unused;
	while (!sim->stop) {
		uint64_t ctrl = sim_reg(REG_CTRL), st = sim_reg(REG_STATUS);

		if (ctrl & CTRL_RESET) {
			for (unsigned off = REG_STATUS; off < REGS_SIZE; off += 8)
				sim_set(off, 0);
			sim_set(REG_CTRL, ctrl & ~(CTRL_RESET | CTRL_ENABLE));
			continue;
		}
		if (!(ctrl & CTRL_ENABLE)) {
			sim_set(REG_STATUS, st & ~STATUS_ENABLED);
			sleep_us(100);
			continue;
		}
		uint64_t size = sim_reg(REG_RING_SIZE), base = sim_reg(REG_RING_BASE);
		if (!(st & STATUS_ENABLED)) {
			if (size < 2 || size > 4096 || (size & (size - 1)) || (base & 63)) {
				sim_set(REG_ERROR, 3);
				st |= STATUS_HALTED;
			}
			sim_set(REG_STATUS, st | STATUS_ENABLED);
			continue;
		}
		uint64_t head = sim_reg(REG_RING_HEAD), tail = sim_reg(REG_RING_TAIL);
		if ((st & STATUS_HALTED) || head == tail) {
			sleep_us(50);
			continue;
		}
		if (tail >= size) {
			sim_set(REG_ERROR, 2);
			sim_set(REG_STATUS, st | STATUS_HALTED);
			continue;
		}
		struct desc d;
		uint32_t ring_pasid = (uint32_t)sim_reg(REG_RING_PASID);
		if (sim_xfer(ring_pasid, base + head * 64, &d, sizeof(d), false) != sizeof(d)) {
			sim_set(REG_ERROR, 1);
			sim_set(REG_ERROR_ADDR, base + head * 64);
			sim_set(REG_STATUS, st | STATUS_HALTED);
			continue;
		}
		sim_set(REG_STATUS, st | STATUS_BUSY);
		sim_execute(&d);
		sim_set(REG_RING_HEAD, (head + 1) % size);
		sim_set(REG_COMPLETED, sim_reg(REG_COMPLETED) + 1);
		sim_set(REG_STATUS, st & ~STATUS_BUSY);
	}
	return NULL;
}

static void sim_start(void)
{
	int e = pthread_create(&sim_thread, NULL, sim_main, NULL);

	if (e)
		die(EXIT_SETUP, "pthread_create: %s", strerror(e));
	sim_running = true;
}

static void sim_stop(void)
{
	if (!sim_running)
		return;
	sim->stop = 1;
	pthread_join(sim_thread, NULL);
	sim_running = false;
}

/* ---- Binding: open /dev/uioN, read the PASID, release ------------------------------------ */

struct binding {
	int fd;		/* /dev/uioN, -1 when simulated or closed */
	uint32_t pasid; /* the PASID of our address space */
	volatile uint8_t *regs;
	void *map;	/* the UIO map 0 mapping */
	size_t map_len;
};

/* Opens /dev/uioN, which binds our mm, and reads the PASID the driver stored, both under the
 * device lock (the driver's pasid attribute is the LAST opener's). */
static void sva_open(struct binding *b)
{
	char path[PATH_MAX], buf[32], *end;

	b->fd = -1;
	if (opt.simulate) {
		b->pasid = sim_bind();
		b->regs = (volatile uint8_t *)sim->regs;
		return;
	}
	int lock = lock_dir(dev.devdir, false);
	if (lock < 0)
		die(EXIT_SETUP, "flock %s: %s", dev.devdir, strerror(errno));
	b->fd = open(dev.devnode, O_RDWR | O_CLOEXEC);
	if (b->fd < 0) {
		int e = errno;
		close(lock);
		die(EXIT_SETUP, "the kernel refuses SVA for %s: open %s: %s%s", dev.bdf,
		    dev.devnode, strerror(e),
		    e == EINVAL ? " (uio_pci_generic_sva reports every iommu_sva_bind_device() "
				  "failure so: it needs VT-d scalable mode with PASID, ATS and "
				  "PRI enabled for the function; see dmesg)"
				: "");
	}
	cleanup.binding = b;
	snprintf(path, sizeof(path), "%s/pasid", dev.devdir);
	int r = read_text(path, buf, sizeof(buf));
	int e = errno;
	close(lock);
	if (r < 0)
		die(EXIT_SETUP, "cannot read %s: %s", path, strerror(e));
	errno = 0;
	long v = strtol(buf, &end, 10);
	if (errno || end == buf || *end || v <= 0 || v > (long)PASID_MASK)
		die(EXIT_SETUP, "%s reads \"%s\" after binding: not a PASID", path, buf);
	b->pasid = (uint32_t)v;

	/* UIO map N is mmapped at offset N * page size. */
	long page = sysconf(_SC_PAGESIZE);
	b->map_len = (dev.map_size + page - 1) & ~(uint64_t)(page - 1);
	b->map = mmap(NULL, b->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, b->fd, 0 * page);
	if (b->map == MAP_FAILED) {
		b->map = NULL;
		die(EXIT_SETUP, "mmap %s map 0: %s", dev.devnode, strerror(errno));
	}
	b->regs = (volatile uint8_t *)b->map + dev.map_offset;
}

/* Releases our binding, and only ours (see the comment at the top): under the device lock,
 * open the device once more (our binding gains a reference and becomes the driver's stored
 * handle again), then close both files: the two release() calls drop our two references. The
 * register mapping goes first: it holds the file open, and its release would come late. */
static void sva_close(struct binding *b)
{
	if (b->map) {
		munmap(b->map, b->map_len);
		b->map = NULL;
	}
	b->regs = NULL;
	if (cleanup.binding == b)
		cleanup.binding = NULL;
	if (b->fd < 0)
		return;
	int lock = lock_dir(dev.devdir, false);
	int again = open(dev.devnode, O_RDWR | O_CLOEXEC);
	close(b->fd);
	if (again >= 0)
		close(again);
	if (lock >= 0)
		close(lock);
	b->fd = -1;
}

/* ---- Driving the engine ---------------------------------------------------------------- */

struct engine {
	volatile uint8_t *regs;
	struct desc *ring;
	uint32_t ring_size;
	uint32_t *tail; /* the next free ring slot (ours, or shared between --procs processes) */
	int *lock;	/* spin lock around submissions when shared, else NULL */
};

/* Register accesses are plain 64-bit MOVs, written out: the compiler may otherwise turn a
 * volatile 64-bit load into an SSE MOVQ, which a hypervisor's MMIO emulation need not
 * support (KVM answers it with #UD). */
static uint64_t rd(const struct engine *e, unsigned off)
{
	uint64_t v;
	__asm__ volatile("movq %1, %0" : "=r"(v) : "m"(*(volatile uint64_t *)(e->regs + off)));
	return v;
}

static void wr(const struct engine *e, unsigned off, uint64_t v)
{
	__asm__ volatile("movq %1, %0" : "=m"(*(volatile uint64_t *)(e->regs + off)) : "r"(v)
			 : "memory");
}

static void status_text(uint64_t st, char *buf, size_t len)
{
	snprintf(buf, len, "%#" PRIx64 "%s%s%s%s%s", st, st & STATUS_ENABLED ? " ENABLED" : "",
		 st & STATUS_HALTED ? " HALTED" : "", st & STATUS_BUSY ? " BUSY" : "",
		 st & STATUS_WAITING_PAGE ? " WAITING_PAGE" : "",
		 st & STATUS_PRI_STOPPED ? " PRI_STOPPED" : "");
}

static const char *error_text(uint64_t err)
{
	switch (err) {
	case 0: return "none";
	case 1: return "ring fetch failed";
	case 2: return "RING_TAIL out of range";
	case 3: return "RING_BASE/RING_SIZE invalid";
	case 4: return "descriptor reserved field not zero";
	default: return "unknown";
	}
}

/* One line describing the engine's state, for errors and -v. */
static void engine_state(const struct engine *e, char *buf, size_t len)
{
	char st[80];

	status_text(rd(e, REG_STATUS), st, sizeof(st));
	uint64_t err = rd(e, REG_ERROR);
	snprintf(buf, len,
		 "STATUS=%s ERROR=%" PRIu64 " (%s) ERROR_ADDR=%#" PRIx64 " HEAD=%" PRIu64
		 " TAIL=%" PRIu64 " COMPLETED=%" PRIu64 " PAGE_REQUESTS=%" PRIu64,
		 st, err, error_text(err), rd(e, REG_ERROR_ADDR), rd(e, REG_RING_HEAD),
		 rd(e, REG_RING_TAIL), rd(e, REG_COMPLETED), rd(e, REG_PAGE_REQUESTS));
}

/* Resets the engine: stops it, aborts the descriptor in flight, zeroes ring and counters. */
static void engine_reset(const struct engine *e)
{
	double deadline = now() + 5;

	wr(e, REG_CTRL, CTRL_RESET);
	while ((rd(e, REG_CTRL) & CTRL_RESET) ||
	       (rd(e, REG_STATUS) & (STATUS_ENABLED | STATUS_BUSY))) {
		if (now() > deadline)
			die(EXIT_FAIL, "the engine did not reset within 5 s");
		sleep_us(100);
	}
}

/* Checks the ID, resets the engine and enables it on `ring` (ring_size entries, in the address
 * space of ring_pasid). */
static void engine_start(struct engine *e, uint32_t ring_pasid)
{
	char state[320];
	uint64_t id = rd(e, REG_ID), caps = rd(e, REG_CAPS);

	if (id != ENGINE_ID)
		die(EXIT_SETUP, "%s register ID reads %#" PRIx64 ", not %#llx (\"SVAE\" v1)",
		    dev.bdf, id, ENGINE_ID);
	uint64_t need = opt.op == OP_COPY ? CAPS_COPY : opt.op == OP_FILL ? CAPS_FILL
									 : CAPS_COMPARE;
	if (!(caps & need))
		die(EXIT_SETUP, "the engine does not support %s (CAPS=%#" PRIx64 ")",
		    op_names[opt.op], caps);
	if (CAPS_MAX_RING(caps) && e->ring_size > CAPS_MAX_RING(caps))
		die(EXIT_SETUP, "the engine's largest ring is %" PRIu64 " entries",
		    CAPS_MAX_RING(caps));
	verbose("CAPS=%#" PRIx64 ": ATS %s, PRI %s, %" PRIu64 "-bit PASIDs", caps,
		caps & CAPS_ATS ? "present" : "absent", caps & CAPS_PRI ? "present" : "absent",
		(uint64_t)CAPS_PASID_BITS(caps));
	cleanup.owned = e;
	engine_reset(e);
	wr(e, REG_RING_BASE, (uintptr_t)e->ring);
	wr(e, REG_RING_SIZE, e->ring_size);
	wr(e, REG_RING_PASID, PASID_VALID | (ring_pasid & PASID_MASK));
	*e->tail = 0;
	wr(e, REG_CTRL, CTRL_ENABLE);
	double deadline = now() + 5;
	while (!(rd(e, REG_STATUS) & (STATUS_ENABLED | STATUS_HALTED))) {
		if (now() > deadline)
			die(EXIT_FAIL, "the engine did not become ENABLED within 5 s");
		sleep_us(100);
	}
	if (rd(e, REG_STATUS) & STATUS_HALTED) {
		engine_state(e, state, sizeof(state));
		die(EXIT_FAIL, "the engine halted when enabled: %s", state);
	}
	verbose("engine enabled: ring %p, %u entries, RING_PASID %u", (void *)e->ring,
		e->ring_size, ring_pasid);
}

static void engine_stop(struct engine *e)
{
	wr(e, REG_CTRL, 0);
	if (cleanup.owned == e)
		cleanup.owned = NULL;
}

static void spin_lock(int *l)
{
	double deadline = now() + opt.timeout_s;

	while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) {
		if (now() > deadline)
			die(EXIT_FAIL, "the ring lock stayed taken for %u s (a process died in it?)",
			    opt.timeout_s);
		sched_yield();
	}
}

static void spin_unlock(int *l)
{
	__atomic_store_n(l, 0, __ATOMIC_RELEASE);
}

/* Puts a descriptor into the ring and rings the doorbell. */
static void submit(struct engine *e, const struct desc *d)
{
	double deadline = now() + opt.timeout_s;

	if (e->lock)
		spin_lock(e->lock);
	uint32_t slot = *e->tail, next = (slot + 1) % e->ring_size;
	/* Never fill the ring: HEAD == TAIL means empty. */
	while (next == rd(e, REG_RING_HEAD)) {
		if (now() > deadline) {
			if (e->lock)
				spin_unlock(e->lock);
			die(EXIT_FAIL, "the ring stayed full for %u s", opt.timeout_s);
		}
		sleep_us(100);
	}
	memcpy(&e->ring[slot], d, sizeof(*d));
	/* The descriptor must be in memory before the engine learns of it. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	*e->tail = next;
	wr(e, REG_RING_TAIL, next);
	if (e->lock)
		spin_unlock(e->lock);
}

/* Waits for a completion record's status. A halted engine ends the test, and so does
 * --timeout seconds without progress: no completion and no change of the engine's COMPLETED,
 * PAGE_REQUESTS and ATS_TRANSLATIONS counters (a 64 MiB first-touch copy is 16384 page
 * requests, slow under nested virtualization, yet never silent for long). */
static unsigned wait_completion(struct engine *e, struct completion *c, const char *what)
{
	/* Every process of --procs polls: register reads exit to the VMM, and under nested
	 * virtualization N processes reading every 20 ms starve the kernel's fault handling.
	 * Look every 20 ms x N, and sleep up to 1 ms x N/8 between looks at the record. */
	unsigned procs = opt.procs > 1 ? opt.procs : 1;
	double interval = 0.02 * procs;
	long max_pause = 1000L * (procs > 8 ? procs / 8 : 1);
	double start = now(), deadline = start + opt.timeout_s, next_check = start + interval;
	/* A long wait says how it is going every 30 s (one process only: --procs' outputs are
	 * counted line by line), so whoever watches the output sees progress, not silence. */
	double next_report = start + 30;
	uint64_t progress = 0;
	long pause = 20;
	char state[320];

	for (;;) {
		uint8_t st = __atomic_load_n(&c->status, __ATOMIC_ACQUIRE);
		if (st)
			return st;
		double t = now();
		if (t > next_check) {
			/* Register reads exit to the VMM: look only every interval. */
			if (rd(e, REG_STATUS) & STATUS_HALTED) {
				engine_state(e, state, sizeof(state));
				die(EXIT_FAIL, "the engine halted during the %s: %s", what, state);
			}
			uint64_t p = rd(e, REG_COMPLETED) + rd(e, REG_PAGE_REQUESTS) +
				     rd(e, REG_ATS_TRANSLATIONS);
			if (p != progress) {
				progress = p;
				deadline = t + opt.timeout_s;
			}
			if (procs == 1 && t > next_report) {
				engine_state(e, state, sizeof(state));
				printf("sva-test: waiting for the %s for %.0f s: %s\n", what, t - start,
				       state);
				fflush(stdout);
				next_report = t + 30;
			}
			next_check = t + interval;
		}
		if (t > deadline) {
			engine_state(e, state, sizeof(state));
			die(EXIT_FAIL,
			    "timeout: no completion for the %s and no engine progress for %u s "
			    "(%.0f s in all): %s",
			    what, opt.timeout_s, t - start, state);
		}
		sleep_us(pause);
		if (pause < max_pause)
			pause *= 2;
	}
}

/* ---- Memory and patterns --------------------------------------------------------------- */

static long page_size;

static uint64_t mix64(uint64_t z)
{
	z += 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Fills buf with the pattern of seed: byte i is byte (i % 8) of word mix64(seed + i / 8). */
static void fill_pattern(uint8_t *buf, uint64_t len, uint64_t seed)
{
	uint64_t i = 0;

	for (; i + 8 <= len; i += 8) {
		uint64_t w = mix64(seed + i / 8);
		memcpy(buf + i, &w, 8);
	}
	if (i < len) {
		uint64_t w = mix64(seed + i / 8);
		memcpy(buf + i, &w, len - i);
	}
}

static void *map_anon(uint64_t len, bool shared)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		die(EXIT_SETUP, "mmap %" PRIu64 " bytes: %s", len, strerror(errno));
	return p;
}

/* A never-touched anonymous destination: base pages only (no THP), so every page the device
 * writes first is one page request. */
static void *map_fresh(uint64_t len)
{
	void *p = map_anon(len, false);

	madvise(p, len, MADV_NOHUGEPAGE);
	return p;
}

/* Writes every page of [p, p+len) with the CPU (keeping its contents). */
static void touch(uint8_t *p, uint64_t len)
{
	for (uint64_t off = 0; off < len; off += page_size) {
		volatile uint8_t *b = p + off;
		*b = *b;
	}
}

/* The destination: anonymous, or the --path file mapped shared (and MAP_SYNC for dax). */
static int dst_fd = -1;

static uint8_t *map_destination(uint64_t len)
{
	if (opt.mode == MODE_ANON)
		return map_fresh(len);
	dst_fd = open(opt.path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (dst_fd < 0)
		die(EXIT_SETUP, "open %s: %s", opt.path, strerror(errno));
	if (ftruncate(dst_fd, len) < 0)
		die(EXIT_SETUP, "ftruncate %s to %" PRIu64 " bytes: %s", opt.path, len,
		    strerror(errno));
	int flags = opt.mode == MODE_DAX ? MAP_SHARED_VALIDATE | MAP_SYNC : MAP_SHARED;
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, dst_fd, 0);
	if (p == MAP_FAILED) {
		if (opt.mode == MODE_DAX && errno == EOPNOTSUPP)
			die(EXIT_SETUP,
			    "--mode dax: %s is not on a DAX file system (mmap MAP_SYNC: %s)",
			    opt.path, strerror(errno));
		die(EXIT_SETUP, "mmap %s: %s", opt.path, strerror(errno));
	}
	return p;
}

/* Reports the first byte where got differs from want (exit 1), if any. */
static void check_bytes(const uint8_t *got, const uint8_t *want, uint64_t len, const char *what)
{
	if (!memcmp(got, want, len))
		return;
	uint64_t i = 0;
	while (got[i] == want[i])
		i++;
	die(EXIT_FAIL, "%s: wrong byte at offset %#" PRIx64 " (page %" PRIu64
		       "): %#04x, expected %#04x",
	    what, i, i / page_size, got[i], want[i]);
}

/* ---- One run: the descriptors of a round ------------------------------------------------ */

/* The descriptors of one operation over len bytes: at most 1 GiB each. */
#define MAX_CHUNKS ((MAX_SIZE + MAX_DESC_LEN - 1) / MAX_DESC_LEN)

struct job {
	struct engine *e;
	uint32_t pasid;
	struct completion *comp; /* MAX_CHUNKS records, in our memory (touched) */
	uint64_t status;	 /* first non-SUCCESS status of the last run_op(), or SUCCESS */
	struct completion first_bad; /* its record */
	unsigned chunk_of_bad;
	uint32_t results;	 /* COMPARE: bit i set if chunk i reported "different" */
};

/* Submits op over [src, dst) in chunks, then waits for all; records the outcome in j. */
static void run_op(struct job *j, enum opcode op, uint64_t src, uint64_t dst, uint64_t len,
		   bool wait_later, const char *what)
{
	unsigned n = (len + MAX_DESC_LEN - 1) / MAX_DESC_LEN;

	memset(j->comp, 0, n * sizeof(*j->comp));
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	for (unsigned i = 0; i < n; i++) {
		uint64_t off = (uint64_t)i * MAX_DESC_LEN;
		struct desc d = {
			.opcode = op,
			.flags = opt.no_page_request ? DESC_NO_PAGE_REQUEST : 0,
			.pasid = PASID_VALID | j->pasid,
			.src = op == OP_FILL ? src : src + off,
			.dst = dst + off,
			.len = len - off < MAX_DESC_LEN ? len - off : MAX_DESC_LEN,
			.completion = (uintptr_t)&j->comp[i],
		};
		submit(j->e, &d);
	}
	if (wait_later)
		return;
	j->status = ST_SUCCESS;
	j->results = 0;
	for (unsigned i = 0; i < n; i++) {
		unsigned st = wait_completion(j->e, &j->comp[i], what);
		if (st != ST_SUCCESS && j->status == ST_SUCCESS) {
			j->status = st;
			j->first_bad = j->comp[i];
			j->chunk_of_bad = i;
		}
		if (st == ST_SUCCESS && j->comp[i].result)
			j->results |= 1u << i;
	}
}

/* After run_op(): exits unless the status is the expected one. Returns whether it was SUCCESS
 * (the data can be checked). */
static bool check_status(const struct job *j, const char *what)
{
	if ((int)j->status == opt.expect)
		return j->status == ST_SUCCESS;
	if (j->status == ST_SUCCESS)
		die(EXIT_FAIL, "%s: status SUCCESS, expected %s", what, status_name(opt.expect));
	const struct completion *c = &j->first_bad;
	die(EXIT_FAIL,
	    "%s: descriptor %u completed with %s (fault address %#" PRIx64 "%s, %" PRIu64
	    " bytes done), expected %s",
	    what, j->chunk_of_bad, status_name(j->status), c->fault_addr,
	    c->fault_flags & 1 ? ", write" : c->fault_flags & 2 ? ", read" : "", c->bytes_done,
	    status_name(opt.expect));
}

struct counters {
	uint64_t page_requests, ats_translations, atc_invalidations;
};

static struct counters read_counters(const struct engine *e)
{
	return (struct counters){
		rd(e, REG_PAGE_REQUESTS),
		rd(e, REG_ATS_TRANSLATIONS),
		rd(e, REG_ATC_INVALIDATIONS),
	};
}

static void print_summary(const char *what, const struct job *j, uint64_t bytes,
			  struct counters before, const char *extra)
{
	struct counters after = read_counters(j->e);
	char rounds[32] = "";
	char fault[96] = "";

	if (opt.rounds > 1)
		snprintf(rounds, sizeof(rounds), " rounds=%u", opt.rounds);
	if (j->status != ST_SUCCESS)
		snprintf(fault, sizeof(fault), " fault_addr=%#" PRIx64 " bytes_done=%" PRIu64,
			 j->first_bad.fault_addr, j->first_bad.bytes_done);
	printf("%s: %s %" PRIu64 " bytes%s pasid=%u status=%s%s page_requests=%" PRIu64
	       " ats_translations=%" PRIu64 " atc_invalidations=%" PRIu64 "%s%s ok\n",
	       prefix, what, bytes, rounds, j->pasid, status_name(j->status), fault,
	       after.page_requests - before.page_requests,
	       after.ats_translations - before.ats_translations,
	       after.atc_invalidations - before.atc_invalidations, extra,
	       opt.simulate ? " (simulated engine)" : "");
}

/* The default test and its variants: --op, --mode, --touch, --rounds, --fsync. */
static void run_rounds(struct job *j, const char *label)
{
	uint64_t len = opt.size;
	char what[96];
	uint8_t *src = NULL, *dst = map_destination(len);
	uint8_t *want = NULL;

	snprintf(what, sizeof(what), "%s%s %s", label, op_names[opt.op], mode_names[opt.mode]);
	if (opt.op != OP_FILL)
		src = map_anon(len, false);
	if (opt.op == OP_FILL)
		want = map_anon(len, false);
	if (opt.touch)
		touch(dst, len);
	struct counters before = read_counters(j->e);
	for (unsigned r = 0; r < opt.rounds; r++) {
		uint64_t seed = mix64(((uint64_t)r << 32) ^ (uint64_t)getpid() << 8 ^ 0x5356);
		struct counters c0 = read_counters(j->e);
		bool ok = false;
		double device_s = 0; /* the device's time for the round's copy (--op copy) */

		switch (opt.op) {
		case OP_COPY: {
			fill_pattern(src, len, seed);
			double t0 = now();
			run_op(j, OP_COPY, (uintptr_t)src, (uintptr_t)dst, len, false, what);
			device_s = now() - t0;
			ok = check_status(j, what);
			if (ok)
				check_bytes(dst, src, len, what);
			break;
		}
		case OP_FILL: {
			uint64_t pattern = mix64(seed);
			for (uint64_t i = 0; i < len; i++)
				want[i] = pattern >> (8 * (i % 8));
			run_op(j, OP_FILL, pattern, (uintptr_t)dst, len, false, what);
			ok = check_status(j, what);
			if (ok)
				check_bytes(dst, want, len, what);
			break;
		}
		case OP_COMPARE: {
			/* Equal first: a file gets the data through write(), so its mapping
			 * stays untouched and the device's reads fault through PRI. */
			fill_pattern(src, len, seed);
			if (dst_fd >= 0) {
				if (pwrite(dst_fd, src, len, 0) != (ssize_t)len)
					die(EXIT_SETUP, "write %s: %s", opt.path, strerror(errno));
			} else {
				memcpy(dst, src, len);
			}
			run_op(j, OP_COMPARE, (uintptr_t)src, (uintptr_t)dst, len, false, what);
			ok = check_status(j, what);
			if (!ok)
				break;
			if (j->results)
				die(EXIT_FAIL, "%s: equal buffers compared different (chunk mask %#x)",
				    what, j->results);
			/* Then one byte changed. */
			uint64_t at = mix64(seed ^ 1) % len;
			dst[at] ^= 0x5a;
			run_op(j, OP_COMPARE, (uintptr_t)src, (uintptr_t)dst, len, false, what);
			dst[at] ^= 0x5a;
			if (!check_status(j, what))
				break;
			if (j->results != 1u << (at / MAX_DESC_LEN))
				die(EXIT_FAIL,
				    "%s: byte %#" PRIx64 " changed, yet the result was %s",
				    what, at, j->results ? "wrong chunk" : "equal");
			break;
		}
		case OP_NOP:
			break;
		}
		if (opt.verbose) {
			struct counters c1 = read_counters(j->e);
			char rate[64] = "";
			if (device_s > 0)
				snprintf(rate, sizeof(rate), " seconds=%.3f MiB/s=%.1f", device_s,
					 (double)len / (1 << 20) / device_s);
			verbose("round %u: status=%s page_requests+%" PRIu64
				" ats_translations+%" PRIu64 " atc_invalidations+%" PRIu64 "%s",
				r + 1, status_name(j->status), c1.page_requests - c0.page_requests,
				c1.ats_translations - c0.ats_translations,
				c1.atc_invalidations - c0.atc_invalidations, rate);
		}
		if (opt.fsync && dst_fd >= 0) {
			/* Writeback write-protects the pages: the next device write must fault
			 * (page_mkwrite) through a page request again. */
			if (msync(dst, len, MS_SYNC) < 0 || fsync(dst_fd) < 0)
				die(EXIT_SETUP, "msync/fsync %s: %s", opt.path, strerror(errno));
		}
		if (!ok)
			break;
	}
	char extra[64] = "";
	if (dst_fd >= 0 && j->status == ST_SUCCESS && opt.op != OP_COMPARE) {
		/* The file itself (not the mapping) must hold the last device write. */
		const uint8_t *expect = opt.op == OP_COPY ? src : want;
		uint8_t *buf = map_anon(1 << 20, false);
		if (msync(dst, len, MS_SYNC) < 0)
			die(EXIT_SETUP, "msync %s: %s", opt.path, strerror(errno));
		for (uint64_t off = 0; off < len; off += 1 << 20) {
			uint64_t n = len - off < (1 << 20) ? len - off : (1 << 20);
			if (pread(dst_fd, buf, n, off) != (ssize_t)n)
				die(EXIT_SETUP, "read %s: %s", opt.path, strerror(errno));
			check_bytes(buf, expect + off, n, "the file read back");
		}
		snprintf(extra, sizeof(extra), " file=%s", opt.path);
	}
	print_summary(what, j, len, before, extra);
}

/* --munmap-race: the destination disappears while the copy is outstanding. */
static void run_munmap_race(struct job *j)
{
	uint64_t len = opt.size;
	uint8_t *src = map_anon(len, false), *dst = map_fresh(len);
	char extra[96];

	fill_pattern(src, len, 7);
	fflush(stdout); /* nothing may allocate memory while the range is unmapped */
	struct counters before = read_counters(j->e);
	run_op(j, OP_COPY, (uintptr_t)src, (uintptr_t)dst, len, true, "munmap-race copy");
	if (munmap(dst, len) < 0)
		die(EXIT_SETUP, "munmap: %s", strerror(errno));
	unsigned n = (len + MAX_DESC_LEN - 1) / MAX_DESC_LEN;
	j->status = ST_SUCCESS;
	for (unsigned i = 0; i < n; i++) {
		unsigned st = wait_completion(j->e, &j->comp[i], "munmap-race copy");
		if (st != ST_SUCCESS && j->status == ST_SUCCESS) {
			j->status = st;
			j->first_bad = j->comp[i];
			j->chunk_of_bad = i;
		}
	}
	if ((int)j->status != opt.expect) {
		if (j->status == ST_SUCCESS)
			die(EXIT_FAIL,
			    "munmap-race: the copy completed with SUCCESS (finished before munmap?), "
			    "expected %s",
			    status_name(opt.expect));
		check_status(j, "munmap-race copy");
	}
	if (j->status != ST_SUCCESS) {
		uint64_t fa = j->first_bad.fault_addr;
		if (fa < (uintptr_t)dst || fa >= (uintptr_t)dst + len)
			die(EXIT_FAIL,
			    "munmap-race: fault address %#" PRIx64
			    " is outside the unmapped destination [%p, +%#" PRIx64 ")",
			    fa, (void *)dst, len);
	}
	snprintf(extra, sizeof(extra), " unmapped=[%p,+%#" PRIx64 ")", (void *)dst, len);
	print_summary("munmap-race copy anon", j, len, before, extra);
}

/* --remap: after the device cached the translation of a page, the page under that virtual
 * address is replaced; the device must write the new page, never the old one. */
static void run_remap(struct job *j)
{
	uint64_t len = opt.size_set ? (opt.size + page_size - 1) & ~(uint64_t)(page_size - 1)
				    : (uint64_t)page_size;
	int fd = memfd_create("sva-test-remap", MFD_CLOEXEC);
	char extra[96];

	if (fd < 0 || ftruncate(fd, len) < 0)
		die(EXIT_SETUP, "memfd: %s", strerror(errno));
	/* The old pages stay reachable through a second mapping after the remap. */
	uint8_t *va = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	uint8_t *old = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (va == MAP_FAILED || old == MAP_FAILED)
		die(EXIT_SETUP, "mmap memfd: %s", strerror(errno));
	uint8_t *src_a = map_anon(len, false), *src_b = map_anon(len, false);
	fill_pattern(src_a, len, 0xa);
	fill_pattern(src_b, len, 0xb);
	if (opt.touch)
		touch(va, len);

	struct counters before = read_counters(j->e);
	run_op(j, OP_COPY, (uintptr_t)src_a, (uintptr_t)va, len, false, "remap: first copy");
	if (!check_status(j, "remap: first copy"))
		die(EXIT_FAIL, "remap: the first copy did not succeed");
	check_bytes(va, src_a, len, "remap: first copy");
	struct counters mid = read_counters(j->e);

	if (mmap(va, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
		 0) != va)
		die(EXIT_SETUP, "mmap MAP_FIXED: %s", strerror(errno));
	madvise(va, len, MADV_NOHUGEPAGE);
	if (opt.touch)
		touch(va, len);
	struct counters remapped = read_counters(j->e);
	run_op(j, OP_COPY, (uintptr_t)src_b, (uintptr_t)va, len, false, "remap: second copy");
	if (!check_status(j, "remap: second copy"))
		die(EXIT_FAIL, "remap: the second copy did not succeed");
	check_bytes(va, src_b, len, "remap: the new page");
	for (uint64_t i = 0; i < len; i++) {
		if (old[i] != src_a[i])
			die(EXIT_FAIL,
			    "remap: the OLD page changed at offset %#" PRIx64
			    " (%s): the device used a stale translation",
			    i, old[i] == src_b[i] ? "it holds the second copy's data" : "garbage");
	}
	snprintf(extra, sizeof(extra), " remap_invalidations=%" PRIu64 " old_page=unchanged",
		 remapped.atc_invalidations - mid.atc_invalidations);
	print_summary("remap copy", j, len, before, extra);
	munmap(old, len);
	close(fd);
}

/* ---- --procs: several processes, each its own PASID, one ring ---------------------------- */

enum child_state { CHILD_STARTING, CHILD_BOUND, CHILD_OK, CHILD_FAILED };

/* Shared between the parent and its children (MAP_SHARED, made before fork). The parent owns
 * the engine and the ring (its PASID is RING_PASID); each child puts descriptors carrying its
 * own PASID into that ring. */
struct shared {
	int submit_lock;
	uint32_t tail;
	volatile int go; /* 0 wait, 1 start, -1 give up */
	struct {
		volatile int state;
		uint32_t pasid;
		pid_t pid;
	} child[MAX_PROCS];
};

static void child_main(unsigned idx, struct shared *sh, struct desc *ring, uint32_t ring_size)
{
	struct binding b;
	struct engine e = {.ring = ring, .ring_size = ring_size, .tail = &sh->tail,
			   .lock = &sh->submit_lock};
	struct job j = {.e = &e};
	char what[64];

	snprintf(prefix, sizeof(prefix), "sva-test: proc %u", idx);
	cleanup.shared = NULL;
	sh->child[idx].pid = getpid();
	sva_open(&b);
	sh->child[idx].pasid = b.pasid;
	__atomic_store_n(&sh->child[idx].state, CHILD_BOUND, __ATOMIC_RELEASE);
	e.regs = b.regs;
	j.pasid = b.pasid;
	j.comp = map_anon(page_size, false);

	uint64_t len = opt.size;
	uint8_t *src = map_anon(len, false), *dst = map_fresh(len);
	double deadline = now() + opt.timeout_s;
	while (sh->go == 0) {
		if (now() > deadline)
			die(EXIT_FAIL, "the parent did not start the engine within %u s",
			    opt.timeout_s);
		sleep_us(1000);
	}
	if (sh->go < 0) {
		sva_close(&b);
		_exit(EXIT_SETUP);
	}
	if (opt.touch)
		touch(dst, len);
	snprintf(what, sizeof(what), "copy anon");
	for (unsigned r = 0; r < opt.rounds; r++) {
		fill_pattern(src, len, mix64(((uint64_t)idx << 32) | r));
		run_op(&j, OP_COPY, (uintptr_t)src, (uintptr_t)dst, len, false, what);
		if (!check_status(&j, what))
			break;
		check_bytes(dst, src, len, what);
	}
	printf("%s: pid %d pasid=%u %s %" PRIu64 " bytes%s status=%s ok\n", prefix,
	       (int)getpid(), b.pasid, what, len, opt.rounds > 1 ? " (every round)" : "",
	       status_name(j.status));
	fflush(stdout);
	sva_close(&b);
	__atomic_store_n(&sh->child[idx].state, CHILD_OK, __ATOMIC_RELEASE);
	_exit(0);
}

static void run_procs(void)
{
	unsigned n = opt.procs;
	uint32_t ring_size = 64;
	struct shared *sh = map_anon(sizeof(*sh), true);
	pid_t pids[MAX_PROCS];

	while (ring_size < 2 * (n + 1))
		ring_size *= 2;
	struct desc *ring = map_anon(ring_size * sizeof(struct desc), true);
	memset(ring, 0, ring_size * sizeof(struct desc)); /* present in our page tables */
	cleanup.shared = sh;
	fflush(stdout);
	for (unsigned i = 0; i < n; i++) {
		pids[i] = fork();
		if (pids[i] < 0) {
			sh->go = -1;
			die(EXIT_SETUP, "fork: %s", strerror(errno));
		}
		if (pids[i] == 0)
			child_main(i, sh, ring, ring_size);
	}

	/* Every child bound (or one gave up): then we bind, own the ring, and start. */
	double deadline = now() + opt.timeout_s;
	for (;;) {
		unsigned bound = 0;
		for (unsigned i = 0; i < n; i++) {
			int st;
			if (__atomic_load_n(&sh->child[i].state, __ATOMIC_ACQUIRE) >= CHILD_BOUND)
				bound++;
			else if (waitpid(pids[i], &st, WNOHANG) == pids[i]) {
				pids[i] = 0;
				die(EXIT_FAIL, "proc %u exited before it was bound (status %d)", i,
				    WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
			}
		}
		if (bound == n)
			break;
		if (now() > deadline)
			die(EXIT_FAIL, "%u of %u processes bound within %u s", bound, n,
			    opt.timeout_s);
		sleep_us(1000);
	}
	struct binding b;
	sva_open(&b);
	struct engine e = {.regs = b.regs, .ring = ring, .ring_size = ring_size, .tail = &sh->tail,
			   .lock = &sh->submit_lock};
	if (opt.simulate)
		sim_start();
	engine_start(&e, b.pasid);
	struct counters before = read_counters(&e);
	__atomic_store_n(&sh->go, 1, __ATOMIC_RELEASE);

	unsigned failed = 0;
	for (unsigned i = 0; i < n; i++) {
		int st;
		while (waitpid(pids[i], &st, 0) < 0 && errno == EINTR)
			;
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
			failed++;
	}
	cleanup.shared = NULL;
	struct counters after = read_counters(&e);

	/* Every PASID (the children's and ours, the ring's) must be its own. */
	uint32_t pasids[MAX_PROCS + 1];
	for (unsigned i = 0; i < n; i++)
		pasids[i] = sh->child[i].pasid;
	pasids[n] = b.pasid;
	for (unsigned i = 0; i <= n; i++)
		for (unsigned k = i + 1; k <= n; k++)
			if (pasids[i] == pasids[k])
				die(EXIT_FAIL, "%s %u and %s %u got the same PASID %u",
				    i == n ? "the parent" : "proc", i,
				    k == n ? "the parent" : "proc", k, pasids[i]);
	if (failed)
		die(EXIT_FAIL, "%u of %u processes failed", failed, n);
	engine_stop(&e);
	sim_stop();
	sva_close(&b);
	printf("%s: procs=%u copy anon %" PRIu64 " bytes each pasids=%u distinct ring_pasid=%u "
	       "page_requests=%" PRIu64 " ats_translations=%" PRIu64 " atc_invalidations=%" PRIu64
	       "%s ok\n",
	       prefix, n, opt.size, n + 1, b.pasid, after.page_requests - before.page_requests,
	       after.ats_translations - before.ats_translations,
	       after.atc_invalidations - before.atc_invalidations,
	       opt.simulate ? " (simulated engine)" : "");
}

/* ---- Clean-up --------------------------------------------------------------------------- */

static void release_everything(void)
{
	if (cleanup.shared)
		cleanup.shared->go = -1;
	if (cleanup.owned) {
		/* Abort whatever is in flight: no DMA into memory that goes away with us. */
		wr(cleanup.owned, REG_CTRL, CTRL_RESET);
		cleanup.owned = NULL;
	}
	if (opt.simulate && sim_running)
		sim->stop = 1; /* exit() ends the thread; it may be inside a descriptor */
	if (cleanup.binding)
		sva_close(cleanup.binding);
}

/* ---- Arguments -------------------------------------------------------------------------- */

static void usage_error(const char *fmt, const char *arg)
{
	fprintf(stderr, "sva-test: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, " (see sva-test --help)\n");
	exit(EXIT_SETUP);
}

/* BYTES with an optional K, M or G suffix (powers of 1024). */
static bool parse_size(const char *s, uint64_t *out)
{
	char *end;
	uint64_t v, mult = 1;

	if (!isdigit((unsigned char)s[0]))
		return false;
	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno)
		return false;
	switch (toupper((unsigned char)*end)) {
	case 'K': mult = 1ull << 10; end++; break;
	case 'M': mult = 1ull << 20; end++; break;
	case 'G': mult = 1ull << 30; end++; break;
	default: break;
	}
	if ((*end == 'i' || *end == 'B') && mult > 1)
		end += *end == 'i' && end[1] == 'B' ? 2 : 1;
	if (*end || v > UINT64_MAX / mult)
		return false;
	*out = v * mult;
	return true;
}

static bool parse_uint(const char *s, unsigned min, unsigned max, unsigned *out)
{
	char *end;
	unsigned long v;

	if (!isdigit((unsigned char)s[0]))
		return false;
	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || *end || v < min || v > max)
		return false;
	*out = v;
	return true;
}

static void parse_args(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		char *a = argv[i], *val = NULL;
		char name[32];

		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			usage(stdout);
			exit(0);
		}
		if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) {
			opt.verbose = true;
			continue;
		}
		if (strncmp(a, "--", 2))
			usage_error("unexpected argument `%s`", a);
		snprintf(name, sizeof(name), "%s", a);
		char *eq = strchr(name, '=');
		if (eq) {
			*eq = '\0';
			val = strchr(a, '=') + 1;
		}
		static const char *const with_value[] = {
			"--device", "--op", "--size", "--mode", "--path", "--rounds", "--expect",
			"--procs", "--timeout",
		};
		bool needs = false;
		for (size_t k = 0; k < sizeof(with_value) / sizeof(with_value[0]); k++)
			needs |= !strcmp(name, with_value[k]);
		if (needs && !val) {
			if (i + 1 >= argc)
				usage_error("%s needs a value", name);
			val = argv[++i];
		} else if (!needs && val) {
			usage_error("%s takes no value", name);
		}

		if (!strcmp(name, "--device")) {
			opt.device = val;
		} else if (!strcmp(name, "--op")) {
			if (!strcmp(val, "copy"))
				opt.op = OP_COPY;
			else if (!strcmp(val, "fill"))
				opt.op = OP_FILL;
			else if (!strcmp(val, "compare"))
				opt.op = OP_COMPARE;
			else
				usage_error("--op %s: expected copy, fill or compare", val);
		} else if (!strcmp(name, "--size")) {
			if (!parse_size(val, &opt.size) || opt.size == 0 || opt.size > MAX_SIZE)
				usage_error("--size %s: expected 1 byte to 16G, e.g. 4096, 64K, 64M",
					    val);
			opt.size_set = true;
		} else if (!strcmp(name, "--mode")) {
			if (!strcmp(val, "anon"))
				opt.mode = MODE_ANON;
			else if (!strcmp(val, "file"))
				opt.mode = MODE_FILE;
			else if (!strcmp(val, "dax"))
				opt.mode = MODE_DAX;
			else
				usage_error("--mode %s: expected anon, file or dax", val);
		} else if (!strcmp(name, "--path")) {
			opt.path = val;
		} else if (!strcmp(name, "--rounds")) {
			if (!parse_uint(val, 1, 1000000, &opt.rounds))
				usage_error("--rounds %s: expected 1 to 1000000", val);
		} else if (!strcmp(name, "--expect")) {
			int found = -1;
			for (int s = 1; s < N_STATUS; s++)
				if (!strcasecmp(val, status_names[s]))
					found = s;
			if (found < 0)
				usage_error("--expect %s: expected SUCCESS, PAGE_INVALID, "
					    "PAGE_FAILURE, TRANSLATION_FAULT, BAD_DESCRIPTOR or "
					    "ABORTED",
					    val);
			opt.expect = found;
			opt.expect_set = true;
		} else if (!strcmp(name, "--procs")) {
			if (!parse_uint(val, 1, MAX_PROCS, &opt.procs))
				usage_error("--procs %s: expected 1 to 256", val);
		} else if (!strcmp(name, "--timeout")) {
			if (!parse_uint(val, 1, 86400, &opt.timeout_s))
				usage_error("--timeout %s: expected 1 to 86400 seconds", val);
		} else if (!strcmp(name, "--touch")) {
			opt.touch = true;
		} else if (!strcmp(name, "--fsync")) {
			opt.fsync = true;
		} else if (!strcmp(name, "--munmap-race")) {
			opt.munmap_race = true;
		} else if (!strcmp(name, "--remap")) {
			opt.remap = true;
		} else if (!strcmp(name, "--no-page-request")) {
			opt.no_page_request = true;
		} else if (!strcmp(name, "--simulate")) {
			opt.simulate = true;
		} else {
			usage_error("unknown option %s", name);
		}
	}

	/* Combinations. */
	if ((opt.mode != MODE_ANON) != (opt.path != NULL))
		usage_error("%s", opt.path ? "--path needs --mode file or dax"
					   : "--mode file|dax needs --path FILE");
	if (opt.fsync && opt.mode == MODE_ANON)
		usage_error("%s", "--fsync needs --mode file or dax");
	if (opt.op == OP_FILL && opt.size % 8)
		usage_error("%s", "--op fill needs a --size that is a multiple of 8");
	if (opt.munmap_race + opt.remap + (opt.procs > 0) > 1)
		usage_error("%s", "--munmap-race, --remap and --procs exclude each other");
	if ((opt.munmap_race || opt.remap || opt.procs) &&
	    (opt.op != OP_COPY || opt.mode != MODE_ANON))
		usage_error("%s", "--munmap-race, --remap and --procs copy anonymous memory "
				  "(no --op, --mode)");
	if ((opt.munmap_race || opt.remap) && opt.rounds > 1)
		usage_error("%s", "--munmap-race and --remap run one round");
	if (opt.munmap_race && opt.touch)
		usage_error("%s", "--munmap-race needs a never-touched destination (no --touch)");
	if (opt.munmap_race && !opt.expect_set)
		opt.expect = ST_PAGE_INVALID;
	if ((opt.remap || opt.procs) && opt.expect != ST_SUCCESS)
		usage_error("%s", "--remap and --procs expect SUCCESS");
	if (opt.procs && !opt.size_set)
		opt.size = DEFAULT_PROCS_SIZE;
}

/* ---- main ------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	page_size = sysconf(_SC_PAGESIZE);
	parse_args(argc, argv);
	/* Killed by SIGPIPE mid-run would skip the clean-up; a failed write is enough. */
	signal(SIGPIPE, SIG_IGN);

	int engine_lock = -1;
	if (opt.simulate) {
		sim_init();
	} else {
		ensure_driver();
		find_device();
		check_iommu();
		bind_driver();
		find_uio();
		/* One sva-test per engine: a second would reset it under the first. */
		char path[PATH_MAX];
		snprintf(path, sizeof(path), "%s/uio/%s", dev.devdir, dev.uio);
		engine_lock = lock_dir(path, true);
		if (engine_lock < 0)
			die(EXIT_SETUP, "%s", errno == EWOULDBLOCK
				? "the engine is in use by another sva-test"
				: "cannot lock the engine's UIO directory");
	}

	if (opt.procs) {
		run_procs();
		return 0;
	}

	struct binding b;
	sva_open(&b);
	verbose("bound: pasid %u", b.pasid);
	uint32_t ring_size = 64;
	uint32_t tail = 0;
	struct desc *ring = map_anon(ring_size * sizeof(struct desc), false);
	memset(ring, 0, ring_size * sizeof(struct desc)); /* present: ring fetches never fault */
	struct engine e = {.regs = b.regs, .ring = ring, .ring_size = ring_size, .tail = &tail};
	struct job j = {.e = &e, .pasid = b.pasid, .comp = map_anon(page_size, false)};
	memset(j.comp, 0, page_size);
	if (opt.simulate)
		sim_start();
	engine_start(&e, b.pasid);

	if (opt.munmap_race)
		run_munmap_race(&j);
	else if (opt.remap)
		run_remap(&j);
	else
		run_rounds(&j, "");

	if (opt.verbose) {
		char state[320];
		engine_state(&e, state, sizeof(state));
		verbose("%s", state);
	}
	engine_stop(&e);
	sim_stop();
	sva_close(&b);
	if (engine_lock >= 0)
		close(engine_lock);
	return 0;
}
