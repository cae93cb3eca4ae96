// SPDX-License-Identifier: GPL-2.0-only
/*
 * Linked into the VFIO selftests by guest-images/kbuild/build.sh.
 */
#include <stdio.h>
#include <stdlib.h>

/* calloc() that aborts the test on failure (see selftest-compat.h). */
void *calloc_assert(size_t nmemb, size_t size)
{
	void *p = calloc(nmemb, size);

	if (!p) {
		fprintf(stderr, "calloc(%zu, %zu) failed\n", nmemb, size);
		exit(1);
	}
	return p;
}

/*
 * lib/iommu.c's default_iommu_mode is "iommufd", used by vfio_pci_device_test and by
 * vfio_pci_driver_test's device probe. Debian's kernel has no iommufd (CONFIG_IOMMUFD unset),
 * so let $VFIO_SELFTESTS_IOMMU_MODE (e.g. vfio_type1v2_iommu) choose it at start-up.
 */
extern const char *default_iommu_mode;

__attribute__((constructor)) static void iommu_mode_from_env(void)
{
	const char *mode = getenv("VFIO_SELFTESTS_IOMMU_MODE");

	if (mode && *mode)
		default_iommu_mode = mode;
}
