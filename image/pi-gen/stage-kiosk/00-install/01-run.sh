#!/bin/bash -e
# pi-gen runs this on the build host with ROOTFS_DIR set; KIOSK_SRCDIR (and KIOSK_WHEELHOUSE, else the
# checkout's out/wheelhouse-cp313-aarch64) come from pi-gen's config file.
"${KIOSK_SRCDIR:?set KIOSK_SRCDIR to the kiosk checkout in the pi-gen config}/image/install-kiosk.sh" \
  ${KIOSK_WHEELHOUSE:+--wheelhouse "$KIOSK_WHEELHOUSE"} "${ROOTFS_DIR}"
