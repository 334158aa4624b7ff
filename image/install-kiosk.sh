#!/bin/sh
# install-kiosk.sh [--files-only] ROOTFS: install the kiosk into an image's root file system.
#
# Called by the rpi-image-gen layer (image/layer/voice-kiosk.yaml) as a customize hook, and by the
# pi-gen stage (image/pi-gen/stage-kiosk). Runs on the build host as root; ROOTFS is the target's
# root. It installs:
#   - the kiosk into a virtual environment, /opt/kiosk/venv (built inside the target with its own
#     Python, then the build-only packages are purged);
#   - systemd/: the units, sysusers, tmpfiles, the journald and watchdog drop-ins;
#   - hw/: udev rules, asound.conf, the config.txt lines; image/: the provisioning script and the
#     slot-shared declaration for the A/B layout;
#   - the service user (at build time: the device's root is read-only) and the image's default site
#     config, which provisioning installs on first boot.
# --files-only skips the steps that need the target's own programs (the virtual environment and
# purging build packages); the test suite uses it on a scratch directory.
#
# Environment (rpi-image-gen exports the layer's variables): IGconf_kiosk_api_url,
# IGconf_kiosk_mode, IGconf_kiosk_language, IGconf_kiosk_hw_watchdog_sec.
set -eu

FILES_ONLY=0
if [ "${1:-}" = "--files-only" ]; then
  FILES_ONLY=1
  shift
fi
ROOT=${1:?usage: install-kiosk.sh [--files-only] ROOTFS}
SRC=$(cd "$(dirname "$0")/.." && pwd)

API_URL=${IGconf_kiosk_api_url:-https://voice.example.com}
MODE=${IGconf_kiosk_mode:-push_to_talk}
LANGUAGE=${IGconf_kiosk_language:-en}
HW_WATCHDOG_SEC=${IGconf_kiosk_hw_watchdog_sec:-15}
BUILD_PACKAGES="python3-dev build-essential portaudio19-dev libspeexdsp-dev swig"

log() { echo "install-kiosk: $*" >&2; }

put() {  # put MODE SOURCE (relative to the checkout) DESTINATION (absolute, inside ROOT)
  install -D -m "$1" "$SRC/$2" "$ROOT$3"
}

install_venv() {
  log "building the virtual environment in /opt/kiosk/venv"
  rm -rf "$ROOT/opt/kiosk/src"
  mkdir -p "$ROOT/opt/kiosk/src"
  (cd "$SRC" && tar --exclude='__pycache__' -cf - pyproject.toml README.md kiosk) | tar -C "$ROOT/opt/kiosk/src" -xf -
  # System site packages for python3-lgpio (gpiozero's pin factory on Pi 4 and Pi 5), which comes from
  # the distribution; the kiosk's own dependencies in the venv still take precedence.
  chroot "$ROOT" python3 -m venv --system-site-packages /opt/kiosk/venv
  chroot "$ROOT" /opt/kiosk/venv/bin/pip install --no-cache-dir --quiet /opt/kiosk/src
  rm -rf "$ROOT/opt/kiosk/src"
  # shellcheck disable=SC2086 # a list of package names
  chroot "$ROOT" apt-get purge -y -qq --autoremove $BUILD_PACKAGES
  chroot "$ROOT" apt-get clean
}

install_files() {
  log "installing systemd/, hw/ and image/ files"
  put 0644 systemd/kiosk.service /etc/systemd/system/kiosk.service
  put 0644 systemd/kiosk-provision.service /etc/systemd/system/kiosk-provision.service
  put 0644 systemd/kiosk-cooldown.service /etc/systemd/system/kiosk-cooldown.service
  put 0644 systemd/kiosk.sysusers.conf /usr/lib/sysusers.d/kiosk.conf
  put 0644 systemd/kiosk.tmpfiles.conf /usr/lib/tmpfiles.d/kiosk.conf
  put 0644 systemd/journald-kiosk.conf /etc/systemd/journald.conf.d/kiosk.conf
  put 0644 systemd/system-watchdog.conf /etc/systemd/system.conf.d/kiosk-watchdog.conf
  sed -i "s/^RuntimeWatchdogSec=.*/RuntimeWatchdogSec=${HW_WATCHDOG_SEC}s/" \
    "$ROOT/etc/systemd/system.conf.d/kiosk-watchdog.conf"
  put 0644 systemd/kiosk.env.example /usr/share/kiosk/kiosk.env.example
  put 0755 image/kiosk-provision /usr/libexec/kiosk/kiosk-provision
  put 0644 image/slot-shared.conf /etc/rpi-image-gen/slot-shared.d/50-kiosk.conf
  put 0644 hw/99-kiosk-audio.rules /etc/udev/rules.d/99-kiosk-audio.rules
  put 0644 hw/asound.conf /etc/asound.conf
  put 0644 docs/appliance.md /opt/kiosk/docs/appliance.md
  # Mount points for the slot-shared binds; the image ships nothing inside them.
  mkdir -p "$ROOT/etc/kiosk" "$ROOT/var/lib/kiosk"
}

install_boot_config() {
  firmware="$ROOT/boot/firmware"
  if [ -f "$firmware/config.txt" ]; then
    if ! grep -q "^dtparam=watchdog=on" "$firmware/config.txt"; then
      cat "$SRC/hw/config.txt.snippet" >>"$firmware/config.txt"
    fi
  else
    log "no $firmware/config.txt yet: add hw/config.txt.snippet where the image's config.txt is made"
  fi
  if [ -f "$firmware/cmdline.txt" ] && ! grep -q "watchdog_disarm=0" "$firmware/cmdline.txt"; then
    sed -i '1 s/$/ watchdog_disarm=0/' "$firmware/cmdline.txt"
  fi
}

install_user() {
  log "creating the kiosk user"
  systemd-sysusers --root="$ROOT" "$ROOT/usr/lib/sysusers.d/kiosk.conf"
}

install_default_config() {
  mkdir -p "$ROOT/usr/share/kiosk"
  cat >"$ROOT/usr/share/kiosk/kiosk.toml.default" <<EOF
# The image's default site config, installed as /etc/kiosk/kiosk.toml on first boot unless the
# boot partition's kiosk-provision/kiosk.toml provides one. Every setting: \`kiosk config\`.

[audio]
# One device for both directions: one full-duplex stream keeps the echo reference aligned. With a
# separate USB speaker, set playback_device = "kiosk_speaker" (hw/asound.conf).
capture_device = "kiosk_array"
playback_device = "kiosk_array"
headset_capture_device = "kiosk_headset"
headset_playback_device = "kiosk_headset"

[interaction]
mode = "$MODE"

[session]
api_url = "$API_URL"

[spool]
directory = "/var/lib/kiosk/spool"
language = "$LANGUAGE"
EOF
}

enable_units() {
  # What `systemctl enable` would do, without a running systemd in the build host's chroot.
  wants="$ROOT/etc/systemd/system/multi-user.target.wants"
  mkdir -p "$wants"
  ln -sf /etc/systemd/system/kiosk.service "$wants/kiosk.service"
  ln -sf /etc/systemd/system/kiosk-provision.service "$wants/kiosk-provision.service"
}

[ -d "$ROOT" ] || { log "$ROOT is not a directory"; exit 1; }
install_files
install_boot_config
install_user
install_default_config
enable_units
if [ "$FILES_ONLY" -eq 0 ]; then
  install_venv
fi
log "done"
