#!/bin/sh
# install-kiosk.sh [--files-only] [--wheelhouse DIR] ROOTFS: install the kiosk into an image's root file system.
#
# Called by the rpi-image-gen layer (image/layer/voice-kiosk.yaml) as a customize hook, and by the
# pi-gen stage (image/pi-gen/stage-kiosk). Runs on the build host as root; ROOTFS is the target's
# root. It installs:
#   - the kiosk into a virtual environment, /opt/kiosk/venv, built inside the target with its own Python
#     from a wheelhouse (scripts/wheelhouse) with --no-index --require-hashes against requirements/*.lock:
#     nothing comes from a package index on build day, and every file matches its locked SHA-256. PyAudio
#     (no Linux wheels) is built there from its hash-checked source; then the build-only packages are purged;
#   - systemd/: the units, the retry timer, sysusers, tmpfiles, the journald and watchdog drop-ins;
#   - hw/: udev rules, asound.conf, the config.txt lines; image/: the slot-shared declaration for the A/B
#     layout, the inbound firewall (nftables.conf) and the operator's public key for signed provisioning;
#   - the service user (at build time: the device's root is read-only) and the image's default site
#     config, which provisioning installs on first boot;
#   - locked passwords for root and every login account: no console password is shared by every kiosk;
#   - the SSH server the A/B base brings masked (IGconf_kiosk_ssh=y keeps it): no network login;
#   - A/B updates (docs/fleet.md): RAUC's system.conf with the tryboot backend, the operator's update CA as its
#     keyring, a D-Bus policy that lets only root talk to RAUC, the health gate's units, the image's version.
# --files-only skips the steps that need the target's own programs (the virtual environment and
# purging build packages); the test suite uses it on a scratch directory.
# --wheelhouse DIR (or KIOSK_WHEELHOUSE, or IGconf_kiosk_wheelhouse): the wheels for the target (default
# out/wheelhouse-cp313-aarch64 in the checkout, where scripts/wheelhouse puts them).
#
# Environment (rpi-image-gen exports the layer's variables): IGconf_kiosk_api_url, IGconf_kiosk_mode,
# IGconf_kiosk_language, IGconf_kiosk_hw_watchdog_sec, IGconf_kiosk_operator_key, IGconf_kiosk_wheelhouse,
# IGconf_kiosk_update_ca, IGconf_kiosk_version, IGconf_kiosk_ssh; and rpi-image-gen's IGconf_device_class
# (pi4, pi5, ...).
set -eu

FILES_ONLY=0
WHEELHOUSE=${KIOSK_WHEELHOUSE:-${IGconf_kiosk_wheelhouse:-}}
while [ $# -gt 0 ]; do
  case "$1" in
    --files-only) FILES_ONLY=1; shift ;;
    --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a directory}; shift 2 ;;
    *) break ;;
  esac
done
ROOT=${1:?usage: install-kiosk.sh [--files-only] [--wheelhouse DIR] ROOTFS}
SRC=$(cd "$(dirname "$0")/.." && pwd)
WHEELHOUSE=${WHEELHOUSE:-$SRC/out/wheelhouse-cp313-aarch64}

API_URL=${IGconf_kiosk_api_url:-https://voice.example.com}
MODE=${IGconf_kiosk_mode:-push_to_talk}
LANGUAGE=${IGconf_kiosk_language:-en}
HW_WATCHDOG_SEC=${IGconf_kiosk_hw_watchdog_sec:-15}
OPERATOR_KEY=${IGconf_kiosk_operator_key:-}
UPDATE_CA=${IGconf_kiosk_update_ca:-}
IMAGE_VERSION=${IGconf_kiosk_version:-0.0.0}
SSH=${IGconf_kiosk_ssh:-n}
DEVICE_CLASS=${IGconf_device_class:-}
BUILD_PACKAGES="python3-dev build-essential portaudio19-dev libspeexdsp-dev swig"

log() { echo "install-kiosk: $*" >&2; }

put() {  # put MODE SOURCE (relative to the checkout) DESTINATION (absolute, inside ROOT)
  install -D -m "$1" "$SRC/$2" "$ROOT$3"
}

install_venv() {
  if [ ! -f "$WHEELHOUSE/LOCKS.sha256" ]; then
    log "no wheelhouse at $WHEELHOUSE: build it with scripts/wheelhouse (image/README.md), or pass --wheelhouse"
    exit 1
  fi
  if ! (cd "$SRC" && sha256sum --quiet -c "$WHEELHOUSE/LOCKS.sha256" >/dev/null 2>&1); then
    log "the wheelhouse at $WHEELHOUSE was built from other locks than requirements/*.lock: run scripts/wheelhouse"
    exit 1
  fi
  log "building the virtual environment in /opt/kiosk/venv from $WHEELHOUSE (no index, hash-checked)"
  rm -rf "$ROOT/opt/kiosk/src" "$ROOT/opt/kiosk/wheelhouse"
  mkdir -p "$ROOT/opt/kiosk/src" "$ROOT/opt/kiosk/wheelhouse"
  (cd "$SRC" && tar --exclude='__pycache__' -cf - pyproject.toml README.md kiosk requirements) | tar -C "$ROOT/opt/kiosk/src" -xf -
  cp -R "$WHEELHOUSE/." "$ROOT/opt/kiosk/wheelhouse/"
  # System site packages for python3-lgpio (gpiozero's pin factory on Pi 4 and Pi 5), which comes from
  # the distribution; --ignore-installed below keeps every locked package in the venv all the same.
  chroot "$ROOT" python3 -m venv --system-site-packages /opt/kiosk/venv
  pip="/opt/kiosk/venv/bin/pip"
  offline="--no-index --find-links /opt/kiosk/wheelhouse --no-cache-dir --quiet --disable-pip-version-check"
  # 1. The build backends (PyAudio's source and the kiosk itself are built with them), hash-checked.
  # shellcheck disable=SC2086 # $offline is a list of options
  chroot "$ROOT" $pip install $offline --require-hashes -r /opt/kiosk/src/requirements/build.lock
  # 2. Every dependency, each file checked against its locked SHA-256; PyAudio from its hash-checked source.
  # shellcheck disable=SC2086
  chroot "$ROOT" $pip install $offline --require-hashes --no-build-isolation --ignore-installed \
    -r /opt/kiosk/src/requirements/kiosk.lock
  # 3. The kiosk itself, from this checkout, with nothing else.
  # shellcheck disable=SC2086
  chroot "$ROOT" $pip install $offline --no-deps --no-build-isolation /opt/kiosk/src
  rm -rf "$ROOT/opt/kiosk/src" "$ROOT/opt/kiosk/wheelhouse"
  # shellcheck disable=SC2086 # a list of package names
  chroot "$ROOT" apt-get purge -y -qq --autoremove $BUILD_PACKAGES
  chroot "$ROOT" apt-get clean
}

install_files() {
  log "installing systemd/, hw/ and image/ files"
  put 0644 systemd/kiosk.service /etc/systemd/system/kiosk.service
  put 0644 systemd/kiosk-provision.service /etc/systemd/system/kiosk-provision.service
  put 0644 systemd/kiosk-cooldown.service /etc/systemd/system/kiosk-cooldown.service
  put 0644 systemd/kiosk-retry.timer /etc/systemd/system/kiosk-retry.timer
  put 0644 systemd/kiosk.sysusers.conf /usr/lib/sysusers.d/kiosk.conf
  put 0644 systemd/kiosk.tmpfiles.conf /usr/lib/tmpfiles.d/kiosk.conf
  # zz-: journald reads its drop-ins in name order and the last one wins; the A/B base's pre-image step writes
  # persistent.conf (512 MB, no retention limit), which would otherwise override the kiosk's caps.
  put 0644 systemd/journald-kiosk.conf /etc/systemd/journald.conf.d/zz-kiosk.conf
  put 0644 systemd/system-watchdog.conf /etc/systemd/system.conf.d/kiosk-watchdog.conf
  sed -i "s/^RuntimeWatchdogSec=.*/RuntimeWatchdogSec=${HW_WATCHDOG_SEC}s/" \
    "$ROOT/etc/systemd/system.conf.d/kiosk-watchdog.conf"
  put 0644 systemd/kiosk.env.example /usr/share/kiosk/kiosk.env.example
  put 0644 image/slot-shared.conf /etc/rpi-image-gen/slot-shared.d/50-kiosk.conf
  put 0644 image/nftables.conf /etc/nftables.conf
  mkdir -p "$ROOT/etc/nftables.d"
  put 0644 hw/99-kiosk-audio.rules /etc/udev/rules.d/99-kiosk-audio.rules
  put 0644 hw/asound.conf /etc/asound.conf
  put 0644 systemd/kiosk-update-gate.service /etc/systemd/system/kiosk-update-gate.service
  put 0644 systemd/kiosk-update-check.service /etc/systemd/system/kiosk-update-check.service
  put 0644 systemd/kiosk-update.tmpfiles.conf /usr/lib/tmpfiles.d/kiosk-update.conf
  put 0755 image/rauc/rauc-tryboot-backend /usr/lib/kiosk/rauc-tryboot-backend
  put 0644 image/rauc/dbus-rauc.conf /etc/dbus-1/system.d/kiosk-rauc.conf
  put 0644 image/rauc/system.conf /etc/rauc/system.conf
  put 0644 docs/appliance.md /opt/kiosk/docs/appliance.md
  put 0644 docs/fleet.md /opt/kiosk/docs/fleet.md
  put 0644 docs/security.md /opt/kiosk/docs/security.md
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

install_operator_key() {
  key="$ROOT/usr/share/kiosk/operator-key.pub"
  if [ -z "$OPERATOR_KEY" ]; then
    rm -f "$key"
    log "no IGconf_kiosk_operator_key: kiosks from this image accept a provisioning bundle on their first boot only"
    return
  fi
  # An ed25519 public key: 32 bytes, 44 base64 characters (kiosk bundle keygen prints it).
  if ! printf '%s' "$OPERATOR_KEY" | grep -Eqx '[A-Za-z0-9+/]{43}='; then
    log "IGconf_kiosk_operator_key is not an ed25519 public key in base64 (kiosk bundle keygen prints one)"
    exit 1
  fi
  mkdir -p "$ROOT/usr/share/kiosk"
  printf '# The operator key: provisioning bundles after the first boot must carry its signature.\n%s\n' \
    "$OPERATOR_KEY" >"$key"
  chmod 0644 "$key"
}

# No console password shared by every kiosk made from this image: root and every login account (uid 1000
# to 59999) get a locked password ("!"), whatever the base image set. The image installs no SSH server;
# docs/security.md says how an operator adds key-only SSH at build time.
lock_passwords() {
  shadow="$ROOT/etc/shadow"
  if [ ! -f "$shadow" ]; then
    log "no $shadow: nothing to lock"
    return
  fi
  users=$(awk -F: '$3 == 0 || ($3 >= 1000 && $3 < 60000) { print $1 }' "$ROOT/etc/passwd" | tr '\n' ' ')
  tmp="$shadow.kiosk-new"
  awk -F: -v OFS=: -v users=" $users" 'index(users, " " $1 " ") { $2 = "!" } { print }' "$shadow" >"$tmp"
  chmod --reference="$shadow" "$tmp"
  chown --reference="$shadow" "$tmp"
  mv -f "$tmp" "$shadow"
  log "locked the passwords of: $users"
}

# The A/B base (trixie-minbase) requires rpi-image-gen's openssh-server layer, which installs the SSH server and
# enables it with password logins allowed. Unless the builder asks for it (IGconf_kiosk_ssh=y), the kiosk masks it:
# no network login at all, whatever the firewall says. Runs after the base's hooks (the app layer comes last).
disable_ssh() {
  case "$SSH" in
    y) log "IGconf_kiosk_ssh=y: the SSH server stays enabled; the firewall drops port 22 unless /etc/nftables.d/ssh.nft opens it"
       return ;;
    n) ;;
    *) log "IGconf_kiosk_ssh '$SSH' is not y or n"; exit 1 ;;
  esac
  units="ssh.service ssh.socket sshd.service ssh-hostkeys-generate.service"
  for unit in $units; do
    find "$ROOT/etc/systemd/system" -path '*.wants/*' -name "$unit" -exec rm -f {} + 2>/dev/null || true
  done
  mkdir -p "$ROOT/etc/systemd/system"
  for unit in ssh.service ssh.socket sshd.service; do
    ln -sfn /dev/null "$ROOT/etc/systemd/system/$unit"
  done
  log "masked the SSH server (ssh.service, ssh.socket): set IGconf_kiosk_ssh=y to keep it"
}

# RAUC: the board's compatible string (a bundle for another board is refused), the operator's update CA as the
# keyring (without it RAUC refuses every bundle), and the image's version for `kiosk update status`.
install_updates() {
  case "$DEVICE_CLASS" in
    *[!a-z0-9]*) log "IGconf_device_class '$DEVICE_CLASS' is not a device class (pi4, pi5, cm5, ...)"; exit 1 ;;
  esac
  compatible="voice-kiosk${DEVICE_CLASS:+-$DEVICE_CLASS}"
  [ -n "$DEVICE_CLASS" ] || log "no IGconf_device_class: RAUC's compatible is '$compatible'; bundles must say the same"
  sed -i "s/^compatible=.*/compatible=$compatible/" "$ROOT/etc/rauc/system.conf"
  if ! printf '%s' "$IMAGE_VERSION" | grep -Eqx '[0-9]+(\.[0-9]+){0,2}([.+~-][A-Za-z0-9]+)*'; then
    log "IGconf_kiosk_version '$IMAGE_VERSION' is not a version (e.g. 2025.3.1); the update bundle's version is the same"
    exit 1
  fi
  mkdir -p "$ROOT/usr/share/kiosk"
  printf '%s\n' "$IMAGE_VERSION" >"$ROOT/usr/share/kiosk/image-version"
  keyring="$ROOT/etc/rauc/keyring.pem"
  if [ -z "$UPDATE_CA" ]; then
    rm -f "$keyring"
    log "no IGconf_kiosk_update_ca: kiosks from this image refuse every update bundle (reflash to update)"
    return
  fi
  if [ ! -f "$UPDATE_CA" ] || ! grep -q -- "-----BEGIN CERTIFICATE-----" "$UPDATE_CA" \
      || grep -q -- "PRIVATE KEY-----" "$UPDATE_CA"; then
    log "IGconf_kiosk_update_ca ($UPDATE_CA) is not the update CA's certificate (PEM, no private key): kiosk release ca"
    exit 1
  fi
  install -m 0644 "$UPDATE_CA" "$keyring"
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
$( [ "$MODE" = open_mic ] && printf '%s\n' "# Built with IGconf_kiosk_mode=open_mic: the image's builder chose an open microphone for this site." "open_mic_acknowledged = true" )

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
  ln -sf /etc/systemd/system/kiosk-update-gate.service "$wants/kiosk-update-gate.service"
  # Debian's nftables.service loads /etc/nftables.conf early in boot (WantedBy=sysinit.target).
  mkdir -p "$ROOT/etc/systemd/system/sysinit.target.wants"
  ln -sf /lib/systemd/system/nftables.service "$ROOT/etc/systemd/system/sysinit.target.wants/nftables.service"
}

[ -d "$ROOT" ] || { log "$ROOT is not a directory"; exit 1; }
install_files
install_boot_config
install_user
install_operator_key
install_updates
install_default_config
lock_passwords
disable_ssh
enable_units
if [ "$FILES_ONLY" -eq 0 ]; then
  install_venv
fi
log "done"
