/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Force-included into the VFIO selftests by guest-images/kbuild/build.sh.
 *
 * linux-source 7.2.13's lib/vfio_pci_device.c calls calloc_assert(), which that source does not
 * define (a helper missing from the stable backport); selftest-compat.c provides it. Should a
 * later source define it, this declaration clashes at compile time: then drop it.
 */
#include <stddef.h>

void *calloc_assert(size_t nmemb, size_t size);
