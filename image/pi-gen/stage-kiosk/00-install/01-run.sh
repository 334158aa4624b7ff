#!/bin/bash -e
# pi-gen runs this on the build host with ROOTFS_DIR set; KIOSK_SRCDIR comes from pi-gen's config file.
"${KIOSK_SRCDIR:?set KIOSK_SRCDIR to the kiosk checkout in the pi-gen config}/image/install-kiosk.sh" "${ROOTFS_DIR}"
