#!/bin/sh
# Compiles the out-of-tree kernel modules and kernel selftests of a guest image with the compiler
# that built its kernel, and our own programs (guest-images/programs/*.c) with that compiler. Run by guest-images/src/kbuild.rs, which unpacks the pinned build root
# (sid's gcc, binutils, pahole, kernel headers and kbuild; every ELF program wrapped to run on
# the build root's own ld.so and libraries) and the needed members of linux-source.
#
# Environment: ROOT (build root), SRC (kernel source tree, partial), WORK (scratch directory),
# OUT (results: <module>.ko, <selftest>, <program>), SUPPORT (selftest-compat.{c,h}), KREL
# (kernel release), MODULES (source files, or driver directories ending in /, relative to
# SRC), SELFTESTS (<suite>/<test> under
# tools/testing/selftests), PROGRAMS (names of PROGRAM_DIR/<name>.c), JOBS. SRC is empty when
# only PROGRAMS are built, and KREL may then be another kernel's (a 6.12 image compiling its
# programs with the 7.2 build root).
#
# Reproducibility: nothing here depends on the directory names (-ffile-prefix-map maps ROOT,
# SRC and WORK away; modules are built with ROOT mounted at a fixed path, see below, and stripped
# of debug info), the date or the locale.
set -eu
export LC_ALL=C TZ=UTC SOURCE_DATE_EPOCH=0 KBUILD_BUILD_TIMESTAMP=@0
export KBUILD_BUILD_USER=vmm KBUILD_BUILD_HOST=vmm
export PATH="$ROOT/usr/bin:/usr/bin:/bin"
unset CFLAGS CPPFLAGS LDFLAGS MAKEFLAGS MFLAGS GCC_EXEC_PREFIX COMPILER_PATH LIBRARY_PATH CPATH \
    C_INCLUDE_PATH LD_LIBRARY_PATH || true

HDR="$ROOT/usr/src/linux-headers-$KREL"
if [ ! -f "$HDR/.config" ]; then
    if [ -n "$MODULES" ]; then
        echo "no $HDR/.config: pin linux-headers-$KREL in the build root" >&2
        exit 1
    fi
    # Programs only: the compiler of the build root's kernel (there must be exactly one).
    set -- "$ROOT"/usr/src/linux-headers-*/.config
    if [ $# -ne 1 ] || [ ! -f "$1" ]; then
        echo "the build root must hold exactly one kernel's linux-headers (found: $*)" >&2
        exit 1
    fi
    HDR=${1%/.config}
fi

# The compiler named and versioned by the kernel's configuration, e.g.
# CONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-16 (Debian 16.2.0-4) 16.2.0".
cc_text=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\(.*\)"$/\1/p' "$HDR/.config")
CC=${cc_text%% *}
have=$("$CC" --version | head -n 1) || have="(cannot run $CC)"
if [ "$have" != "$cc_text" ]; then
    echo "the build root's $CC is '$have' but $KREL was built with '$cc_text': pin that compiler in images.lock" >&2
    exit 1
fi
CROSS=${CC%gcc*}

MAP="-ffile-prefix-map=$ROOT= -ffile-prefix-map=$SRC=linux-source -ffile-prefix-map=$WORK=build"
mkdir -p "$OUT"

# build_modules HEADERS: every module of MODULES, against the kernel headers at HEADERS.
build_modules() {
    for m in $MODULES; do
        case "$m" in
        */)
            # A driver directory: built by its own Makefile, with every CONFIG_ symbol its obj-
            # lines name set to m (Debian leaves them unset); the module is named after it.
            name=$(basename "$m")
            dir="$WORK/module-$name"
            mkdir -p "$dir"
            cp -R "$SRC/$m." "$dir/"
            configs=$(sed -n 's/.*obj-\$(\(CONFIG_[A-Za-z0-9_]*\)).*/\1=m/p' "$dir/Makefile" | sort -u)
            ;;
        *)
            name=$(basename "$m" .c)
            dir="$WORK/module-$name"
            mkdir -p "$dir"
            cp "$SRC/$m" "$dir/"
            echo "obj-m := $name.o" > "$dir/Kbuild"
            configs=
            ;;
        esac
        echo "building $name.ko" >&2
        # shellcheck disable=SC2086 # one word per CONFIG_X=m
        make -s -j"$JOBS" -C "$1" M="$dir" KCFLAGS="$MAP" $configs modules
        "${CROSS}strip" --strip-debug -o "$OUT/$name.ko" "$dir/$name.ko"
    done
}

# Modules are compiled with the build root bind-mounted on /usr/src in a private mount namespace
# (this script again, with the argument modules-in-namespace), so the headers sit at the same
# path, /usr/src/usr/src/linux-headers-*, in every build. kbuild names every header by its
# absolute path, and the kernel's UBSAN records (CONFIG_UBSAN_BOUNDS, _SHIFT) keep that path in
# the module where gcc's prefix maps do not reach: through the build root's own path a module's
# bytes would depend on the directory it was built in.
# build_in ROOT_PATH: the headers' Makefile includes the common headers by their installed path.
build_in() {
    sed -i "s| /usr/src/| $1/usr/src/|g; s|=/usr/src/|=$1/usr/src/|g" "$HDR/Makefile"
    MAP="$MAP -ffile-prefix-map=$1="
    build_modules "$1/usr/src/linux-headers-$KREL"
}
if [ "${1:-}" = modules-in-namespace ]; then
    mount --bind "$ROOT" /usr/src
    build_in /usr/src
    exit 0
fi
if [ -n "$MODULES" ]; then
    if [ -d /usr/src ] && unshare --user --map-root-user --mount true 2>/dev/null; then
        unshare --user --map-root-user --mount sh "$0" modules-in-namespace
    else
        echo "warning: no private mount namespace here (unshare --user --mount failed):" \
            "building modules through the build root's own path; their bytes depend on it" >&2
        build_in "$ROOT"
    fi
fi

# Selftests: static programs (the guest's glibc is older than the build root's), compiled like
# the suite's Makefile does (its lib/ sources included) against the build root's libc and the
# kernel's uapi headers (linux-libc-dev of the same kernel).
CFLAGS="-O2 -Wall -Wno-address-of-packed-member -D_GNU_SOURCE= -I$SRC/tools/testing/selftests -I$SRC/tools/include $MAP"
for t in $SELFTESTS; do
    suite=${t%%/*}
    test=${t#*/}
    sdir="$SRC/tools/testing/selftests/$suite"
    obj="$WORK/selftest-$suite"
    mkdir -p "$obj"
    libs=""
    extra=""
    case $suite in
    vfio)
        # lib/libvfio.mk: lib/*.c and, on x86, the ioat and dsa drivers; -luuid.
        extra="-I$sdir/lib/include -include $SUPPORT/selftest-compat.h"
        libs=""
        for c in "$sdir"/lib/*.c "$sdir"/lib/drivers/*/*.c; do
            rel=${c#"$sdir/lib/"}
            o="$obj/lib-$(echo "${rel%.c}" | tr / -).o"
            [ -f "$o" ] || "$CC" --sysroot="$ROOT" $CFLAGS $extra -c "$c" -o "$o"
            libs="$libs $o"
        done
        [ -f "$obj/compat.o" ] || "$CC" --sysroot="$ROOT" $CFLAGS -c "$SUPPORT/selftest-compat.c" -o "$obj/compat.o"
        libs="$libs $obj/compat.o -luuid"
        ;;
    *)
        echo "selftest suite $suite is not supported by guest-images/kbuild/build.sh" >&2
        exit 1
        ;;
    esac
    echo "building $test" >&2
    "$CC" --sysroot="$ROOT" $CFLAGS $extra -c "$sdir/$test.c" -o "$obj/$test.o"
    # shellcheck disable=SC2086 # $libs is a list of objects and a flag
    "$CC" --sysroot="$ROOT" -static -pthread -o "$OUT/$test" "$obj/$test.o" $libs
done

# Our own programs: one C file each, static (the guests' glibc is older than the build root's),
# warnings are errors. -ffile-prefix-map keeps the scratch paths out of the binary (assert()
# messages name the file); the linker's build ID hashes the contents, so equal inputs give
# equal bytes.
for p in $PROGRAMS; do
    echo "building $p" >&2
    "$CC" --sysroot="$ROOT" -O2 -Wall -Wextra -Werror $MAP -ffile-prefix-map="$PROGRAM_DIR"=programs \
        -static -pthread -o "$OUT/$p" "$PROGRAM_DIR/$p.c"
    "${CROSS}strip" --strip-debug "$OUT/$p"
done
