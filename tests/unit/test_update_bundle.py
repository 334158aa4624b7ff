"""Update bundles with the real RAUC: built from a tiny fake image, signed by a throwaway CA, verified by RAUC.

A test CA and code-signing certificate are made with openssl here; ``kiosk release build`` (``kiosk_dev.release``)
builds a verity bundle from a small ext4 "system" image and a vfat "boot" image; RAUC's own ``info`` checks it
against the keyring with the image's ``/etc/rauc/system.conf`` (image/rauc/system.conf, only its keyring and data
directory pointed at the test's files). Refused: a bundle signed by another CA, one whose signer is not a
code-signing certificate, a changed payload (``rauc extract`` checks every block against the signed hash tree),
a changed signature, a bundle for another board. Installing (writing the slots, dm-verity) cannot run here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kiosk.errors import InputError
from kiosk_dev.release import CA_CERT, SIGNER_CERT, SIGNER_KEY, build_bundle, make_ca, verify_bundle

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("rauc", "openssl", "mksquashfs", "mkfs.ext4", "mkfs.vfat")

pytestmark = pytest.mark.needs_tool(*TOOLS)


def _openssl(*argv: str) -> None:
    subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)


def test_ca(directory: Path, name: str, *, eku: str = "codeSigning") -> tuple[Path, Path, Path]:
    """A throwaway CA and a signing certificate, with openssl: (CA cert, signer cert, signer key)."""
    directory.mkdir(parents=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             str(ca_key), "-out", str(ca_cert), "-days", "2", "-subj", f"/CN={name} CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    key, csr, cert = directory / "signer.key", directory / "signer.csr", directory / "signer.pem"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", f"/CN={name} signer")
    ext = directory / "leaf.ext"
    ext.write_text(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage=critical,{eku}\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca_cert, cert, key


test_ca.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny 'system' image (ext4 with a few files, some incompressible) and a 'boot' image (vfat)."""
    base = tmp_path_factory.mktemp("images")
    tree = base / "rootfs"
    (tree / "usr/share/kiosk").mkdir(parents=True)
    (tree / "usr/share/kiosk/image-version").write_text("2025.3.1\n")
    (tree / "etc").mkdir()
    (tree / "etc/hostname").write_text("kiosk\n")
    (tree / "usr/share/kiosk/blob").write_bytes(bytes(range(256)) * 64 + __import__("os").urandom(16384))
    system = base / "system.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(system), "2M"], check=True, capture_output=True,
                   timeout=60)
    boot = base / "boot.vfat"
    subprocess.run(["mkfs.vfat", "-C", str(boot), "1024"], check=True, capture_output=True, timeout=60)
    return boot, system


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, images: tuple[Path, Path]) -> tuple[Path, Path]:
    """A bundle signed by the test CA: (bundle, CA certificate)."""
    base = tmp_path_factory.mktemp("signed")
    ca, cert, key = test_ca(base / "ca", "Test updates")
    boot, system = images
    bundle = build_bundle(boot=boot, system=system, version="2025.3.1", compatible="voice-kiosk-pi5", cert=cert,
                          key=key, keyring=ca, out=base / "kiosk-2025.3.1.raucb")
    return bundle, ca


def _kiosk_conf(tmp_path: Path, keyring: Path) -> Path:
    """The image's system.conf as install-kiosk.sh writes it, its keyring and data directory in tmp_path."""
    text = (ROOT / "image/rauc/system.conf").read_text().replace("=@COMPATIBLE@", "=voice-kiosk-pi5")
    text = text.replace("path=/etc/rauc/keyring.pem", f"path={keyring}")
    text = text.replace("data-directory=/persistent/rauc", f"data-directory={tmp_path / 'rauc-data'}")
    assert str(keyring) in text and "/persistent" not in text
    conf = tmp_path / "system.conf"
    conf.write_text(text)
    return conf


def _rauc_info(conf: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rauc", f"--conf={conf}", "info", "--output-format=json", str(bundle)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_rauc_verifies_the_bundle_with_the_kiosks_config(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    bundle, ca = signed
    result = _rauc_info(_kiosk_conf(tmp_path, ca), bundle)
    assert result.returncode == 0, result.stderr
    assert "Verified inline signature by 'CN = Test updates signer'" in result.stderr
    info = __import__("json").loads(result.stdout)
    assert info["compatible"] == "voice-kiosk-pi5" and info["version"] == "2025.3.1"
    assert [name for image in info["images"] for name in image] == ["rootfs", "boot"]
    # The images land where the slots' types expect them: the system raw, the boot partition as vfat.
    files = {name: image[name]["filename"] for image in info["images"] for name in image}
    assert files == {"rootfs": "system.img", "boot": "boot.vfat"}
    found = verify_bundle(bundle, ca, "voice-kiosk-pi5")
    assert found.version == "2025.3.1" and found.signer == "CN = Test updates signer"


def test_the_payload_is_what_was_built(tmp_path: Path, signed: tuple[Path, Path], images: tuple[Path, Path]) -> None:
    bundle, ca = signed
    out = tmp_path / "content"
    subprocess.run(["rauc", f"--conf={_kiosk_conf(tmp_path, ca)}", "extract", str(bundle), str(out)], check=True,
                   capture_output=True, timeout=120)
    assert (out / "system.img").read_bytes() == images[1].read_bytes()
    assert (out / "boot.vfat").read_bytes() == images[0].read_bytes()
    assert "format=verity" in (out / "manifest.raucm").read_text()


def test_another_cas_bundle_is_refused(tmp_path: Path, signed: tuple[Path, Path], images: tuple[Path, Path]) -> None:
    bundle, ca = signed
    other_ca, other_cert, other_key = test_ca(tmp_path / "other", "Someone else")
    foreign = build_bundle(boot=images[0], system=images[1], version="2025.3.1", compatible="voice-kiosk-pi5",
                           cert=other_cert, key=other_key, keyring=other_ca, out=tmp_path / "foreign.raucb")
    result = _rauc_info(_kiosk_conf(tmp_path, ca), foreign)
    assert result.returncode != 0 and "signature verification failed" in result.stderr, result.stderr
    with pytest.raises(InputError, match="signature"):
        verify_bundle(foreign, ca)


def test_a_signer_not_made_for_code_signing_is_refused(tmp_path: Path, images: tuple[Path, Path]) -> None:
    """check-purpose=codesign: a certificate of the same CA issued for e-mail cannot sign updates."""
    content = tmp_path / "content"
    content.mkdir()
    shutil.copy(images[0], content / "boot.vfat")
    shutil.copy(images[1], content / "system.img")
    (content / "manifest.raucm").write_text("[update]\ncompatible=voice-kiosk-pi5\nversion=1\n\n[bundle]\n"
                                            "format=verity\n\n[image.rootfs]\nfilename=system.img\n")
    mail_ca, mail_cert, mail_key = test_ca(tmp_path / "mail", "Mail", eku="emailProtection")
    bundle = tmp_path / "mail.raucb"
    subprocess.run(["rauc", "bundle", f"--cert={mail_cert}", f"--key={mail_key}", str(content), str(bundle)],
                   check=True, capture_output=True, timeout=120)
    result = _rauc_info(_kiosk_conf(tmp_path, mail_ca), bundle)
    assert result.returncode != 0 and "unsuitable certificate purpose" in result.stderr, result.stderr


def test_a_changed_payload_is_refused(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    bundle, ca = signed
    tampered = tmp_path / "tampered.raucb"
    data = bytearray(bundle.read_bytes())
    data[2000] ^= 0x01  # one bit inside the squashfs payload
    tampered.write_bytes(bytes(data))
    out = tmp_path / "content"
    result = subprocess.run(["rauc", f"--conf={_kiosk_conf(tmp_path, ca)}", "extract", str(tampered), str(out)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0 and "corrupted" in result.stderr, result.stderr
    with pytest.raises(InputError, match="payload"):
        verify_bundle(tampered, ca)


def test_a_changed_signature_is_refused(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    bundle, ca = signed
    data = bytearray(bundle.read_bytes())
    # The CMS signature sits after the payload, followed by its 8-byte size: change a byte inside it.
    data[-100] ^= 0x01
    tampered = tmp_path / "sig.raucb"
    tampered.write_bytes(bytes(data))
    assert _rauc_info(_kiosk_conf(tmp_path, ca), tampered).returncode != 0


def test_a_bundle_for_another_board_is_refused(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    bundle, ca = signed
    with pytest.raises(InputError, match="voice-kiosk-pi4"):
        verify_bundle(bundle, ca, "voice-kiosk-pi4")


def test_release_ca_makes_a_ca_rauc_accepts(tmp_path: Path, images: tuple[Path, Path]) -> None:
    """``kiosk release ca``: private keys 0600, the CA certificate public; its signer's bundles verify."""
    keys = tmp_path / "keys"
    ca, signer = make_ca(keys, name="Fleet")
    assert (keys / SIGNER_KEY).stat().st_mode & 0o777 == 0o600
    assert (keys / "update-ca.key").stat().st_mode & 0o777 == 0o600
    assert ca == keys / CA_CERT and signer == keys / SIGNER_CERT
    assert "PRIVATE" not in ca.read_text()
    bundle = build_bundle(boot=images[0], system=images[1], version="2025.4", compatible="voice-kiosk-pi4",
                          cert=signer, key=keys / SIGNER_KEY, keyring=ca, out=tmp_path / "b.raucb")
    assert verify_bundle(bundle, ca, "voice-kiosk-pi4").version == "2025.4"
    with pytest.raises(InputError, match="already holds"):
        make_ca(keys)


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("version", "v1 beta", "--version"), ("compatible", "other-board", "--compatible")])
def test_build_refuses_bad_arguments(tmp_path: Path, images: tuple[Path, Path], field: str, value: str,
                                     problem: str) -> None:
    arguments = {"version": "1.0", "compatible": "voice-kiosk-pi5", field: value}
    with pytest.raises(InputError, match=re.escape(problem)):
        build_bundle(boot=images[0], system=images[1], cert=tmp_path / "c", key=tmp_path / "k",
                     keyring=tmp_path / "r", out=tmp_path / "o.raucb", **arguments)
