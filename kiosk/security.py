"""``kiosk doctor security``: what docs/security.md promises, checked on this kiosk's settings and system.

Each area reports its own part (``security_checks`` next to the code it checks); this module adds the
behaviour's part (the AI notice, open microphones, which headsets may take the audio route) and runs them all.
"""

from __future__ import annotations

from kiosk.checks import Check, Verdict
from kiosk.settings import InteractionMode, Settings

AREA = "security"


def behaviour_checks(settings: Settings) -> list[Check]:
    """The AI notice, the open microphone and the headset allowlist."""
    checks: list[Check] = []
    if settings.session.consent_notice:
        checks.append(Check(AREA, "AI notice", Verdict.OK, "spoken at the start of every session, before the "
                            f"microphone streams (language {settings.spool.language})"))
    else:
        checks.append(Check(AREA, "AI notice", Verdict.WARN, "not spoken: visitors learn that an AI processes "
                            "what they say only from signage", "put up the sign docs/security.md describes, or set "
                            "session.consent_notice = true"))
    if settings.interaction.mode is InteractionMode.OPEN_MIC:
        checks.append(Check(AREA, "open microphone", Verdict.WARN, "open_mic (acknowledged): anyone who speaks near "
                            "the kiosk opens a session, passers-by included", "use it only where the site allows "
                            "it (signage, staff-only areas); tap_to_talk otherwise"))
    else:
        checks.append(Check(AREA, "open microphone", Verdict.OK,
                            f"{settings.interaction.mode.value}: a session starts only on a press"))
    ids = settings.audio.headset_usb_ids
    if "*" in ids:
        checks.append(Check(AREA, "headset allowlist", Verdict.FAIL, "any USB device that calls itself a headset "
                            "takes the microphone and speaker", "list the site's headsets in "
                            "audio.headset_usb_ids (vendor:product, as lsusb prints them)"))
    else:
        checks.append(Check(AREA, "headset allowlist", Verdict.OK, f"{len(ids)} USB headset model(s) may take the "
                            "audio route", figures={"headset_usb_ids": ",".join(ids)}))
    return checks


def check_security(settings: Settings) -> list[Check]:
    """Every area's security checks."""
    from kiosk import provision
    from kiosk.fallback import doctor as fallback_doctor
    from kiosk.link import doctor as link_doctor

    return [*behaviour_checks(settings), *link_doctor.security_checks(settings),
            *fallback_doctor.security_checks(settings), *provision.security_checks(settings)]
