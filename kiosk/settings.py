"""Settings: environment ``KIOSK_...`` (nested with ``__``) over ``/etc/kiosk/kiosk.toml`` over defaults.

Every field has a one-line description; validation errors name the field and the fix, and a broken
configuration makes ``kiosk`` exit with status 2 (see ``load_settings``). Secrets are ``SecretStr`` and
come from systemd credentials (``LoadCredential=``, read from ``$CREDENTIALS_DIRECTORY``: ``device-credential``
for the session API, ``delivery-credential`` for the message endpoint) or the environment, never from the TOML
file: a secret in the file is refused with exit status 2.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from kiosk.errors import ConfigError
from kiosk.events import Tool

DEFAULT_CONFIG_PATH = Path("/etc/kiosk/kiosk.toml")
# Where provisioning puts the credentials that kiosk.service hands over with LoadCredential= (one file each).
CREDENTIALS_DIRECTORY = Path("/etc/kiosk/credentials")
CONFIG_PATH_ENV = "KIOSK_CONFIG"

# The realtime voices the session API accepts.
VOICES = ("alloy", "echo", "shimmer", "ash", "ballad", "coral", "sage", "verse", "marin", "cedar")
# BCM GPIO numbers on the 40-pin header.
VALID_BCM_PINS = range(2, 28)
# USB headsets the kiosk lets take the audio route by default (ids from the USB id database; hw/PARTS.md).
KNOWN_HEADSET_USB_IDS = (
    "046d:0a37",  # Logitech H540
    "046d:0a38",  # Logitech H340
    "046d:0a44",  # Logitech H390
    "046d:0a8f",  # Logitech H390 (later revision)
    "047f:c00e",  # Poly (Plantronics) Blackwire C310
    "047f:c053",  # Poly (Plantronics) Blackwire C5220
    "047f:c056",  # Poly (Plantronics) Blackwire C3220
)
_USB_ID = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{4}$")
# kiosk_id and site: a host-name-like word (they become label values on every dashboard).
_METRICS_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# The longest anyone may keep a visitor's recorded voice on the kiosk (spool.max_age_days and
# spool.quarantine_max_age_days): a quarter of a year. docs/security.md says why.
MAX_AGE_DAYS = 90
# Secrets that come from systemd credentials (or the environment), never from the TOML file: (section, field,
# credential name).
SECRETS = (("session", "credential", "device-credential"), ("delivery", "credential", "delivery-credential"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- audio
class AudioSettings(_Section):
    """Sound devices, chosen by name (a case-insensitive substring of the PortAudio name; never an index)."""

    capture_device: str = Field("default", description="capture device name (see `kiosk devices`)")
    playback_device: str = Field("default", description="playback device name (see `kiosk devices`)")
    headset_capture_device: str | None = Field(None, description="headset microphone name; takes over when present")
    headset_playback_device: str | None = Field(None, description="headset playback name; takes over when present")
    headset_usb_ids: list[str] = Field(
        default_factory=lambda: list(KNOWN_HEADSET_USB_IDS),
        description="USB vendor:product ids (hex, as lsusb prints them) of headsets allowed to take the audio "
        "route; '*' allows any (development only); hw/99-kiosk-audio.rules names the same ones")
    headset_card_id: str = Field("kioskheadset", description="ALSA card id hw/99-kiosk-audio.rules gives a headset")
    device_rate_hz: int | None = Field(
        None, description="rate to open the devices at; unset: 16000 if supported, else the device default"
    )
    capture_channels: int | None = Field(None, ge=1, le=32, description="channels to open; unset: the device's")
    channel: int | Literal["mix", "beam"] = Field(
        0, description="array channel to use (0-based), 'mix' for a mixdown of all channels, or 'beam' for the "
        "fixed beamformer over the array's microphones (audio.array_*)"
    )
    array_channels: int = Field(4, ge=2, le=16, description="beam: microphones on the array's circle")
    array_radius_mm: float = Field(32.0, gt=0, le=500, description="beam: radius of the array's circle")
    array_first_channel: int = Field(
        0, ge=0, le=31, description="beam: capture channel of the first microphone (the rest follow in order)"
    )
    beam_azimuth_deg: float = Field(
        0.0, ge=-180, le=180, description="beam: look direction, counter-clockwise from the kiosk's front axis"
    )
    latency_ms: float = Field(20.0, gt=0, le=500, description="PortAudio suggested latency per direction")
    mic_ring_ms: int = Field(500, ge=50, le=5000, description="capture ring; the oldest audio drops when full")
    playout_buffer_ms: int = Field(2000, ge=100, le=30000, description="bounded agent playout buffer")
    device_timeout_ms: int = Field(
        1000, ge=100, le=30000, description="no capture frames for this long: the device counts as lost"
    )
    reopen_max_seconds: float = Field(5.0, gt=0, le=300, description="longest wait between reopen attempts")
    route_poll_seconds: float = Field(
        0.25, gt=0, le=60, description="how often the route manager checks for devices coming and going"
    )

    @field_validator("headset_usb_ids")
    @classmethod
    def _usb_ids(cls, value: list[str]) -> list[str]:
        ids = [item.strip().lower() for item in value]
        for item in ids:
            if item != "*" and not _USB_ID.match(item):
                raise ValueError(f"'{item}' is not a USB id: write vendor:product in hex as lsusb prints it, e.g. "
                                 "046d:0a44 (or '*' to allow any headset, development only)")
        return ids

    @field_validator("channel", mode="before")
    @classmethod
    def _channel(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("mix", "beam"):
            try:
                return int(value)
            except ValueError:
                raise ValueError("must be a channel number (0, 1, ...), 'mix' or 'beam'") from None
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 0 or more (channels count from 0), 'mix' or 'beam'")
        return value

    @model_validator(mode="after")
    def _array(self) -> AudioSettings:
        if self.channel != "beam":
            return self
        needed = self.array_first_channel + self.array_channels
        if needed > 32:
            raise ValueError(f"audio.array_first_channel ({self.array_first_channel}) + audio.array_channels "
                             f"({self.array_channels}) reach past channel 31: lower one of them")
        if self.capture_channels is not None and self.capture_channels < needed:
            raise ValueError(f"audio.channel = 'beam' reads capture channels {self.array_first_channel} to "
                             f"{needed - 1}, but audio.capture_channels is {self.capture_channels}: set it to "
                             f"{needed} or more (or leave it unset)")
        return self


class AecBackend(StrEnum):
    """Echo canceller implementations."""

    WEBRTC = "webrtc"
    SPEEX = "speex"
    HYBRID = "hybrid"  # AEC3 while only the agent talks, speex's linear filter in double talk
    NONE = "none"


class AecSettings(_Section):
    """Acoustic echo cancellation."""

    backend: AecBackend = Field(
        AecBackend.HYBRID, description="hybrid (AEC3, speex in double talk; measures best), webrtc (AEC3), speex, none"
    )
    filter_ms: int = Field(128, ge=16, le=1000, description="speex/hybrid: echo tail covered by the speex filter")
    residual_suppression: bool = Field(True, description="speex: the preprocessor's residual-echo suppression")
    noise_suppression: bool = Field(True, description="noise suppression after the echo canceller")
    delay_ms: float | None = Field(
        None, ge=0, le=1000, description="fixed bulk delay mic vs reference; unset: estimated from the signals"
    )
    max_delay_ms: float = Field(400.0, ge=10, le=2000, description="largest bulk delay the estimator searches")
    drift_compensation: bool = Field(True, description="track clock drift between capture and playback")


class VadSettings(_Section):
    """Voice activity detection and segmentation."""

    mode: int = Field(3, ge=0, le=3, description="webrtcvad aggressiveness 0 (permissive) to 3 (strict)")
    frame_ms: Literal[10, 20, 30] = Field(10, description="webrtcvad analysis frame (10 measured best)")
    speech_hold_ms: int = Field(
        120, ge=0, le=1000, description="frames after detected speech still count (bridges weak word endings)"
    )
    preroll_ms: int = Field(300, ge=0, le=2000, description="audio kept before speech starts and streamed with it")
    hangover_ms: int = Field(600, ge=0, le=5000, description="silence before speech counts as stopped")
    min_speech_ms: int = Field(150, ge=0, le=2000, description="speech shorter than this is ignored")
    onset_lookback_ms: int = Field(
        50, ge=0, le=300, description="a speech segment is dated this much before its first detected frame"
    )
    min_level_dbfs: float = Field(
        -36.0, ge=-96, le=0, description="speech peaks must reach this level (rejects distant talkers)"
    )
    noise_margin_db: float = Field(
        3.0, ge=0, le=40, description="speech peaks must stand this far above the tracked noise floor"
    )
    barge_in_margin_db: float = Field(
        6.0, ge=0, le=40, description="while the agent speaks, the output must exceed the expected echo by this"
    )
    barge_in_learn_talk: bool = Field(
        True, description="learn the canceller's leak also from speech-like frames it barely attenuated (false: "
        "keep them out, so a visitor quieter than the echo is not learned as leak; more false barge-ins)"
    )
    detect_on: Literal["output", "linear"] = Field(
        "output", description="the signal the detector and the barge-in levels judge: the canceller's output, or "
        "its linear filter's residual where it has one (the hybrid's speex path: a visitor AEC3's suppressor "
        "ducks stays in it, and so does more echo and all the noise); the output is still what is streamed"
    )


# ------------------------------------------------------------------------------------ interaction
class InteractionMode(StrEnum):
    """How a visitor starts and ends talking."""

    PUSH_TO_TALK = "push_to_talk"
    TAP_TO_TALK = "tap_to_talk"
    OPEN_MIC = "open_mic"


class InteractionSettings(_Section):
    """Interaction mode and timers."""

    mode: InteractionMode = Field(InteractionMode.PUSH_TO_TALK, description="push_to_talk, tap_to_talk, open_mic")
    open_mic_acknowledged: bool = Field(
        False, description="open_mic opens a session for anyone who speaks near the kiosk, passers-by included: "
        "set true to confirm this site allows it (signage, a staff-only area)")
    barge_in: bool = Field(True, description="visitor speech interrupts the agent (only on a verified echo path)")
    no_speech_timeout_seconds: float = Field(8.0, gt=0, description="end a hands-free session nobody speaks in")
    idle_end_seconds: float = Field(20.0, gt=0, description="end a session after this long without an exchange")
    max_session_seconds: float = Field(300.0, gt=0, description="hard cap on one session (cost cap)")
    status_hold_seconds: float = Field(5.0, gt=0, description="holding the button this long speaks the status (in a "
                                       "conversation: counted from when the microphone went live)")
    error_hold_seconds: float = Field(
        10.0, gt=0, description="how long a recoverable error shows before the kiosk waits for visitors again"
    )

    @model_validator(mode="after")
    def _open_mic(self) -> InteractionSettings:
        if self.mode is InteractionMode.OPEN_MIC and not self.open_mic_acknowledged:
            raise ValueError("open_mic streams whatever anyone near the kiosk says, passers-by included, without a "
                             "press: use tap_to_talk in a public place, or set interaction.open_mic_acknowledged = "
                             "true where the site allows it (signage, a staff-only area)")
        return self


# ------------------------------------------------------------------------------------------ panel
class ButtonSpec(_Section):
    """One push button."""

    pin: int = Field(description="BCM GPIO number")
    pull_up: bool = Field(True, description="internal pull-up (button to ground); false: pull-down, to 3V3")
    bounce_ms: int = Field(20, ge=0, le=500, description="debounce time")


class LedSpec(_Section):
    """One LED: on/off, PWM (dimmable) or RGB (three pins: red, green, blue)."""

    kind: Literal["led", "pwm", "rgb"] = Field("pwm", description="led, pwm or rgb")
    pins: list[int] = Field(description="BCM GPIO numbers (one, or three for rgb)")
    active_high: bool = Field(True, description="false for common-anode RGB LEDs or sinking wiring")

    @model_validator(mode="after")
    def _pin_count(self) -> LedSpec:
        want = 3 if self.kind == "rgb" else 1
        if len(self.pins) != want:
            raise ValueError(f"a {self.kind} LED needs {want} pin(s), got {len(self.pins)}: set pins = [...]")
        return self


class StaffOutputSpec(_Section):
    """The staff-call output (``call_staff``): a GPIO driving a relay module, bell or beacon (hw/README.md)."""

    pin: int = Field(description="BCM GPIO number (the reference wiring uses GPIO 26, header pin 37)")
    active_high: bool = Field(True, description="false when the relay module's input is active-low")
    pulse_seconds: float = Field(2.0, gt=0, le=30, description="how long the output stays on per call")
    min_interval_seconds: float = Field(
        60.0, ge=0, le=3600, description="calls closer together than this are refused (rate_limited)")
    pattern_seconds: float = Field(
        30.0, gt=0, le=600, description="how long the LEDs show the staff_called pattern after a call")


class PanelSettings(_Section):
    """Buttons and LEDs on the GPIO header (see hw/README.md for the reference wiring)."""

    enabled: bool = Field(True, description="drive the GPIO panel")
    pin_factory: str | None = Field(
        None, description="gpiozero pin factory (lgpio, rpigpio, mock); unset: gpiozero's own choice"
    )
    talk_button: ButtonSpec = Field(default_factory=lambda: ButtonSpec(pin=17), description="talk button")
    cancel_button: ButtonSpec | None = Field(None, description="optional cancel/end button")
    leds: list[LedSpec] = Field(
        default_factory=lambda: [LedSpec(kind="rgb", pins=[22, 23, 24])], description="status LEDs"
    )
    staff_output: StaffOutputSpec | None = Field(
        None, description="the staff-call output for the call_staff tool (e.g. { pin = 26 }); unset: none")

    @model_validator(mode="after")
    def _pins(self) -> PanelSettings:
        used: dict[int, str] = {}
        named: list[tuple[str, int]] = [("talk_button.pin", self.talk_button.pin)]
        if self.cancel_button is not None:
            named.append(("cancel_button.pin", self.cancel_button.pin))
        if self.staff_output is not None:
            named.append(("staff_output.pin", self.staff_output.pin))
        for i, led in enumerate(self.leds):
            named += [(f"leds[{i}].pins", p) for p in led.pins]
        for name, pin in named:
            if pin not in VALID_BCM_PINS:
                raise ValueError(f"{name}: {pin} is not a header GPIO; use a BCM number from 2 to 27")
            if pin in used:
                raise ValueError(f"{name}: GPIO {pin} is already used by {used[pin]}; give each a pin of its own")
            used[pin] = name
        return self


# ---------------------------------------------------------------------------------------- session
class SessionSource(StrEnum):
    """Where a session's LiveKit URL and token come from."""

    VOICE_API = "voice_api"
    TOKEN_ENDPOINT = "token_endpoint"


class SessionProfile(_Section):
    """One way to run a conversation; the first whose model is available is used."""

    llm_model: str = Field("gpt-realtime", description="model id in the catalog")
    voice: str = Field("marin", description="agent voice")
    stt_model: str | None = Field(None, description="speech-to-text model (chained profiles)")
    tts_model: str | None = Field(None, description="text-to-speech model (chained profiles)")

    @field_validator("voice")
    @classmethod
    def _voice(cls, value: str) -> str:
        if value not in VOICES:
            raise ValueError(f"'{value}' is not an available voice; use one of {', '.join(VOICES)}")
        return value


class SessionSettings(_Section):
    """The voice-session API (or a standard LiveKit token endpoint) that hands out rooms and tokens."""

    source: SessionSource = Field(SessionSource.VOICE_API, description="voice_api or token_endpoint")
    api_url: str = Field("http://127.0.0.1:8080", description="base URL of the voice-session API")
    token_endpoint_url: str | None = Field(None, description="standard LiveKit token endpoint (token_endpoint)")
    credential: SecretStr | None = Field(
        None, description="device credential: the systemd credential 'device-credential' (or "
        "KIOSK_SESSION__CREDENTIAL); never from the config file"
    )
    profiles: list[SessionProfile] = Field(
        default_factory=lambda: [SessionProfile()], min_length=1, description="profiles, in order of preference"
    )
    request_timeout_seconds: float = Field(5.0, gt=0, le=60, description="per HTTP request")
    prewarm: bool = Field(False, description="keep a muted session connected so a press goes live at once")
    consent_notice: bool = Field(False, description="play a short AI-processing notice at session start")
    check_catalog: bool = Field(True, description="check the model's catalog status before opening a session")
    retry_attempts: int = Field(
        3, ge=1, le=10, description="tries per request on server errors (5xx), timeouts and connections lost "
        "mid-request (each try up to request_timeout_seconds)")
    retry_base_seconds: float = Field(0.25, gt=0, le=30, description="first backoff ceiling (full jitter)")
    retry_max_seconds: float = Field(4.0, gt=0, le=300, description="largest backoff ceiling between tries")
    probe_max_seconds: float = Field(
        2.5, ge=1, le=300, description="offline: longest wait between checks whether the API answers again (the "
        "kiosk is usable again at most this long after it does; a Retry-After from the API holds the checks back)"
    )
    livekit_check_max_seconds: float = Field(
        120.0, ge=0, le=3600, description="offline since a room failed: how long the probe also waits for that "
        "room's LiveKit server to take connections; after it the session API answering is enough (its next grant "
        "may name another server)"
    )
    rate_limit_wait_max_seconds: float = Field(
        2.0, ge=0, le=60, description="wait out a shorter Retry-After and try again; longer ones refuse"
    )
    agent_name: str = Field("kiosk-agent", description="agent dispatched into the room (token_endpoint source)")

    @field_validator("api_url", "token_endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"'{value}' is not an http(s) URL; write it as https://host[:port]")
        return value

    @model_validator(mode="after")
    def _endpoint(self) -> SessionSettings:
        if self.source is SessionSource.TOKEN_ENDPOINT and not self.token_endpoint_url:
            raise ValueError("source is token_endpoint but token_endpoint_url is unset: set it, or use voice_api")
        return self


# ---------------------------------------------------------------------------------------- offline
class SpoolSettings(_Section):
    """Visitor messages recorded while offline (sealed to the operator's key; docs/offline.md, docs/security.md)."""

    directory: Path = Field(Path("/var/lib/kiosk/spool"), description="durable storage for messages")
    recipient_public_key: str | None = Field(
        None, description="the operator's X25519 public key (base64 or hex; `kiosk messages keygen` makes a pair): "
        "each message is sealed to it before it is written; unset: no messages are recorded")
    max_message_seconds: float = Field(60.0, gt=1, le=600, description="longest message")
    max_age_days: float = Field(
        30.0, gt=0, description=f"undelivered messages older than this are deleted (at most {MAX_AGE_DAYS})")
    quarantine_max_age_days: float = Field(
        30.0, gt=0, description=f"files set aside in quarantine/ are deleted after this long (at most {MAX_AGE_DAYS})")
    retention_check_seconds: float = Field(
        3600.0, ge=60, le=86400, description="how often the service enforces the retention limits (and at start)")
    min_free_mb: int = Field(200, ge=0, description="keep this much disk free; oldest messages go first")
    language: str = Field("en", description="language of the local spoken messages")
    cues_directory: Path = Field(
        Path("/etc/kiosk/cues"), description="operator's cues, <language>/<name>.wav; checked before the shipped ones"
    )

    @field_validator("recipient_public_key")
    @classmethod
    def _recipient(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from kiosk.fallback.sealing import check_public_key, encode_key, parse_key

        try:
            return encode_key(check_public_key(parse_key(value, "public key")))
        except ValueError as error:
            raise ValueError(f"{error}; set the operator's public key as printed by `kiosk messages keygen`") \
                from None

    @field_validator("max_age_days", "quarantine_max_age_days")
    @classmethod
    def _age_cap(cls, value: float) -> float:
        if value > MAX_AGE_DAYS:
            raise ValueError(f"{value:g} days is more than the cap of {MAX_AGE_DAYS} days: visitors' voice is not "
                             f"kept longer than that (docs/security.md); choose {MAX_AGE_DAYS} or fewer")
        return value


class DeliverySettings(_Section):
    """Upload of stored messages once back online."""

    url: str | None = Field(None, description="HTTP endpoint messages are uploaded to; unset: keep them")
    credential: SecretStr | None = Field(
        None, description="delivery's own bearer credential: the systemd credential 'delivery-credential' (or "
        "KIOSK_DELIVERY__CREDENTIAL); never from the config file")
    retry_max_seconds: float = Field(300.0, gt=0, description="longest wait between upload attempts")
    retry_base_seconds: float = Field(2.0, gt=0, le=300, description="first backoff ceiling (full jitter)")
    request_timeout_seconds: float = Field(30.0, gt=0, le=600, description="per upload request")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"'{value}' is not an http(s) URL; write it as https://host[:port]/path")
        return value


# ---------------------------------------------------------------------------------------- service
class MetricsSettings(_Section):
    """Prometheus metrics and the JSON status endpoint, on localhost."""

    enabled: bool = Field(True, description="serve /metrics and /status")
    host: str = Field("127.0.0.1", description="listen address (loopback unless expose_beyond_loopback)")
    expose_beyond_loopback: bool = Field(
        False, validate_default=True, description="allow a host other than loopback: the venue's network can "
        "then read the kiosk's state and usage (kiosk doctor security warns)")
    port: int = Field(9101, ge=0, le=65535, description="listen port (0: any free port)")
    input_audio_tokens_per_second: float = Field(10.0, ge=0, description="tokens billed per second streamed in")
    output_audio_tokens_per_second: float = Field(20.0, ge=0, description="tokens billed per second of answer")
    input_credits_per_million_tokens: float = Field(32.0, ge=0, description="price of a million input tokens")
    output_credits_per_million_tokens: float = Field(64.0, ge=0, description="price of a million output tokens")
    spool_warn_fraction: float = Field(
        0.8, gt=0, le=1, description="warn when the spool reaches this fraction of its retention limits"
    )
    # Fleet identity and figures (docs/fleet.md, "Watching"). The scrape or push configuration sets the same
    # identity as target labels; these only say what the kiosk thinks it is (``kiosk_info``).
    kiosk_id: str | None = Field(
        None, description="this kiosk's name in the fleet's metrics (kiosk_info); default: the host name. "
        "Letters, digits, '.', '_', '-'; never a person's name")
    site: str = Field("", description="the building or venue this kiosk stands in (kiosk_info), e.g. 'b1'")
    doctor_record: Path = Field(
        Path("/var/lib/kiosk/doctor-audio.json"),
        description="where `kiosk doctor audio` keeps its last loopback sweep's figures for the metrics")

    @field_validator("kiosk_id", "site")
    @classmethod
    def _label_value(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or value == "" and info.field_name == "site":
            return value
        if not _METRICS_LABEL.fullmatch(value):
            raise ValueError(f"{value!r} is not a plain name: use 1-63 letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit), e.g. 'b1-reception'")
        return value

    @field_validator("expose_beyond_loopback")
    @classmethod
    def _loopback(cls, value: bool, info: ValidationInfo) -> bool:
        from kiosk.transport import is_loopback

        host = info.data.get("host")
        if info.data.get("enabled", True) and isinstance(host, str) and not is_loopback(host) and not value:
            raise ValueError(f"metrics.host is {host!r}, not this machine: anyone on the venue's network could read "
                             "/metrics and /status; set metrics.host = '127.0.0.1', or set this to true")
        return value


# ---------------------------------------------------------------------------------------- livekit
class TurnDetection(StrEnum):
    """Who decides where the visitor's turn ends (docs/livekit.md, "Turns")."""

    AUTO = "auto"  # manual in push_to_talk, the agent's own in tap_to_talk and open_mic
    MANUAL = "manual"  # the kiosk's gate: start_turn when the microphone goes live, end_turn when it closes
    AGENT = "agent"  # the agent's own turn detection (its VAD), in every mode


class LiveKitSettings(_Section):
    """The LiveKit room link (rtc SDK)."""

    publish_queue_ms: int = Field(100, ge=20, le=1000, description="AudioSource queue; small keeps latency low")
    send_queue_frames: int = Field(
        10, ge=2, le=200, description="10 ms frames waiting to be handed to LiveKit; the oldest drop when full"
    )
    receive_capacity_frames: int = Field(50, ge=0, le=1000, description="rtc.AudioStream queue (0: unbounded)")
    agent_wait_seconds: float = Field(10.0, gt=0, le=120, description="wait this long for the agent's audio")
    reconnect_grace_seconds: float = Field(
        5.0, gt=0, le=300, description="an agent absent after a reconnect, or lost without leaving, has this "
                                       "long to come back before a fresh session is opened")
    restart_rejoin_seconds: float = Field(
        1.0, ge=0, le=60, description="while the SDK reconnects, a LiveKit server seen down and answering again "
                                      "has restarted: the room and the agent have this long after it answers to "
                                      "be back before a fresh session is opened")
    interrupt_rpc_method: str = Field("kiosk.interrupt", description="RPC the agent registers to stop speaking")
    reconnect_give_up_seconds: float = Field(
        20.0, gt=0, le=600, description="end a session whose SDK reconnect has not succeeded after this long"
    )
    reopen_attempts: int = Field(
        5, ge=0, le=10, description="a session lost to a room failure is opened afresh this many times before "
                                    "the kiosk goes offline (0: offline at once)")
    reopen_delay_seconds: float = Field(
        0.5, gt=0, le=30, description="wait before the first fresh session; each further try waits twice as long, "
                                      "up to reopen_max_delay_seconds")
    reopen_max_delay_seconds: float = Field(
        2.0, gt=0, le=60, description="longest wait between two fresh sessions (the gap after a server is back)")
    turns: TurnDetection = Field(
        TurnDetection.AUTO, description="auto (manual in push_to_talk, the agent's own hands-free), manual, agent")
    turn_rpc_timeout_seconds: float = Field(
        2.0, gt=0, le=15, description="wait this long for the agent to answer start_turn/end_turn/cancel_turn")
    recycle_above_mib: int = Field(
        192, ge=0, le=4096, description="the rtc SDK keeps about 0.5 MiB of native memory for every session "
        "it opened; once the process has grown this much since it started, it restarts when idle (systemd "
        "starts it again; 0: never)")
    recycle_idle_seconds: float = Field(
        300.0, ge=10, le=86400, description="a memory restart waits until nobody has used the kiosk and no "
        "message was sending for this long")


# ------------------------------------------------------------------------------------------ tools
class ToolsSettings(_Section):
    """Kiosk-side tools the trusted agent may call over LiveKit RPC (docs/livekit.md, docs/security.md)."""

    enabled: list[Tool] = Field(
        default_factory=list, description="the allowlist: call_staff, take_message, end_conversation, kiosk_status "
        "(every other call is refused)")
    timeout_seconds: float = Field(5.0, gt=0, le=30, description="a tool that takes longer is abandoned (timeout)")
    max_calls_per_session: int = Field(
        12, ge=1, le=1000, description="tool calls one session may make; more are refused (rate_limited)")
    handover_wait_seconds: float = Field(
        10.0, gt=0, le=120, description="take_message/end_conversation: longest wait for the agent to stop "
        "speaking before the kiosk hands over")

    @field_validator("enabled")
    @classmethod
    def _unique(cls, value: list[Tool]) -> list[Tool]:
        return list(dict.fromkeys(value))


# --------------------------------------------------------------------------------------- security
class SecuritySettings(_Section):
    """What the kiosk trusts on a shared network (docs/security.md)."""

    allow_insecure_transport: bool = Field(
        False, description="development stacks only: accept plain http/ws to hosts other than this machine "
        "(kiosk doctor security fails while it is on)")


class Settings(BaseSettings):
    """All of the kiosk's settings."""

    model_config = SettingsConfigDict(
        env_prefix="KIOSK_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    audio: AudioSettings = Field(default_factory=AudioSettings)
    aec: AecSettings = Field(default_factory=AecSettings)
    vad: VadSettings = Field(default_factory=VadSettings)
    interaction: InteractionSettings = Field(default_factory=InteractionSettings)
    panel: PanelSettings = Field(default_factory=PanelSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    livekit: LiveKitSettings = Field(default_factory=LiveKitSettings)
    tools: ToolsSettings = Field(default_factory=ToolsSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)

    @model_validator(mode="after")
    def _tools(self) -> Settings:
        """An enabled tool must be able to act: call_staff needs its output, take_message a sealing key."""
        if Tool.CALL_STAFF in self.tools.enabled and (not self.panel.enabled or self.panel.staff_output is None):
            raise ValueError("tools.enabled has call_staff but there is no staff-call output: set "
                             "panel.staff_output = { pin = 26 } (hw/README.md) with panel.enabled, or remove "
                             "call_staff from tools.enabled")
        if Tool.TAKE_MESSAGE in self.tools.enabled and self.spool.recipient_public_key is None:
            raise ValueError("tools.enabled has take_message but spool.recipient_public_key is unset, so no message "
                             "can be sealed and none is recorded: set the operator's key (kiosk messages keygen), "
                             "or remove take_message from tools.enabled")
        return self

    @model_validator(mode="after")
    def _transport(self) -> Settings:
        """Every configured URL uses TLS unless it is loopback (or a development stack says otherwise)."""
        from kiosk.transport import InsecureTransport, check_secure

        allow = self.security.allow_insecure_transport
        urls = {"session.api_url": self.session.api_url, "session.token_endpoint_url": self.session.token_endpoint_url,
                "delivery.url": self.delivery.url}
        for name, url in urls.items():
            if url is not None:
                try:
                    check_secure(url, name, allow_insecure=allow)
                except InsecureTransport as error:
                    raise ValueError(error.message) from None
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order: arguments, environment, the TOML file, defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _TOML_PATH is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_TOML_PATH))
        return tuple(sources)


_TOML_PATH: Path | None = None


def config_path(explicit: Path | None = None) -> Path:
    """The TOML file in force: ``--config``, else ``$KIOSK_CONFIG``, else /etc/kiosk/kiosk.toml."""
    if explicit is not None:
        return explicit
    env = os.environ.get(CONFIG_PATH_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def _credential(name: str) -> SecretStr | None:
    """Read a systemd credential (``LoadCredential=name:...``) if the service has one."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    # An unprovisioned kiosk has an empty credential file (tmpfiles creates it): that is "no credential".
    return SecretStr(value) if value else None


def _refuse_secrets_in_file(path: Path) -> None:
    """``ConfigError`` if the TOML file sets a secret: it is often world-readable and copied between kiosks."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return  # reading and syntax errors are reported by the settings source, with the file's name
    found = [(section, key, name) for section, key, name in SECRETS
             if isinstance(data.get(section), dict) and key in data[section]]
    if found:
        lines = [f"  {section}.{key}: a secret is never read from the config file {path}; remove it from "
                 f"[{section}] and provision it as the systemd credential '{name}' "
                 f"(/etc/kiosk/credentials/{name}, see docs/security.md), or set KIOSK_{section.upper()}__"
                 f"{key.upper()} for a command run by hand" for section, key, name in found]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if not field:  # a rule across sections: the message names the fields and the fix itself
            lines.append(f"  {message}")
            continue
        if item["type"] == "extra_forbidden":
            message = "unknown setting; check the spelling against `kiosk config`"
        elif item["type"] == "missing":
            message = "required; set it in the config file or the environment"
        env = "KIOSK_" + "__".join(str(p).upper() for p in item["loc"] if not isinstance(p, int))
        lines.append(f"  {field}: {message} (file key {field}, or environment {env})")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Load and validate the settings; raise ``ConfigError`` naming each bad field and its fix.

    A missing default file is fine (defaults and environment apply); a missing explicit file is an error.
    """
    global _TOML_PATH
    toml = config_path(path)
    explicit = path is not None or CONFIG_PATH_ENV in os.environ
    if not toml.exists():
        if explicit:
            raise ConfigError(f"config file {toml} does not exist: create it, or point {CONFIG_PATH_ENV} elsewhere")
        toml_in_force = None
    else:
        toml_in_force = toml
    if toml_in_force is not None:
        _refuse_secrets_in_file(toml_in_force)
    _TOML_PATH = toml_in_force
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    except ValueError as error:  # TOML syntax errors arrive as ValueError subclasses
        raise ConfigError(f"config file {toml} cannot be read: {error}; fix the TOML syntax") from None
    finally:
        _TOML_PATH = None
    for section, key, name in SECRETS:
        part = getattr(settings, section)
        if getattr(part, key) is None:
            setattr(part, key, _credential(name))
    return settings


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, secrets shown as ``**********`` and URLs without their secrets."""
    from kiosk.transport import redact_url

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: scrub(item) for key, item in value.items()}
        if isinstance(value, list):
            return [scrub(item) for item in value]
        if isinstance(value, str) and "://" in value:
            return redact_url(value)  # user:password@ and ?token= never reach a terminal or a ticket
        return value

    data: dict[str, Any] = scrub(settings.model_dump(mode="json"))  # SecretStr dumps as '**********'
    return data
