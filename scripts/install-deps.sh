#!/usr/bin/env bash
# Installs what building and testing the VMM needs on a Debian (bookworm or newer) machine:
# QEMU for the nested-KVM host, and the archive tools the guest-image builder calls.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
command -v iasl >/dev/null && command -v acpiexec >/dev/null || need+=(acpica-tools)
command -v apt-get >/dev/null || { echo "install-deps: apt-get not found (Debian-based host required)" >&2; exit 1; }
if [ "${#need[@]}" -gt 0 ]; then
    echo "install-deps: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "install-deps: cargo not found; install Rust 1.85+ (rustup)" >&2; exit 1; }
