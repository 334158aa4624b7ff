"""One error hierarchy for the kiosk: every error carries a stable code and a message for people."""

from __future__ import annotations


class KioskError(Exception):
    """Base of every error the kiosk raises on purpose.

    ``code`` is stable and machine-readable (metrics, status endpoint, logs); ``message`` says what is
    wrong and, where possible, how to fix it.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


class ConfigError(KioskError):
    """The configuration is broken: the message names the field and the fix. Exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__("config_invalid", message)


class InputError(KioskError):
    """A file or argument given on the command line cannot be used. Exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__("input_invalid", message)


class DeviceError(KioskError):
    """A sound or GPIO device is missing, busy or failed."""

    def __init__(self, message: str, code: str = "device_error") -> None:
        super().__init__(code, message)
