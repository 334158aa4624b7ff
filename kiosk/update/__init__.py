"""Health-gated A/B updates on the image's two slots (RAUC with the Pi's tryboot).

- ``kiosk.update.tryboot``: RAUC's custom bootloader backend for the Raspberry Pi's ``tryboot`` and
  ``autoboot.txt`` (``get-primary``, ``set-primary``, ``get-state``, ``set-state``, ``get-current``).
- ``kiosk.update.gate``: on a trial boot, after the kiosk came up, runs the health check and commits the slot
  (``rauc status mark-good``) or marks it bad and reboots into the committed slot; the decision is the pure
  ``decide``.
- ``kiosk.update.check``: the health check itself (``kiosk update check``, as the kiosk user): ``kiosk doctor``
  and one loopback voice turn (``kiosk selftest voice``), each within a time bound.
- ``kiosk.update.status``: which slot and image version a kiosk runs, whether an update waits for its trial,
  and the last trial's outcome (for ``kiosk update status`` and the metrics).

``tryboot`` and ``gate`` run as root and import only the standard library. docs/fleet.md has the operator's side.
"""
