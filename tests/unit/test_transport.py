from __future__ import annotations

import pytest

from kiosk.transport import InsecureTransport, check_secure, is_loopback, redact_url


@pytest.mark.parametrize("url", ["https://voice.example.com", "wss://lk.example.com/rtc", "http://127.0.0.1:8080",
                                 "ws://localhost:7880", "http://[::1]:9000/x", "http://127.8.9.10/"])
def test_secure_or_loopback_is_accepted(url: str) -> None:
    check_secure(url, "session.api_url", allow_insecure=False)


@pytest.mark.parametrize("url", ["http://voice.example.com", "ws://10.0.0.5:7880", "http://user:pw@10.1.2.3/",
                                 "ftp://example.com", "http://127.0.0.1.example.com/", "//example.com"])
def test_plain_transport_to_another_host_is_refused_with_the_fix(url: str) -> None:
    with pytest.raises(InsecureTransport) as caught:
        check_secure(url, "delivery.url", allow_insecure=False)
    assert caught.value.code == "insecure_transport"
    assert "delivery.url" in caught.value.message and "allow_insecure_transport" in caught.value.message
    assert "pw" not in caught.value.message
    check_secure(url, "delivery.url", allow_insecure=True)  # a development stack may


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("LOCALHOST")
    assert not is_loopback("10.213.0.1") and not is_loopback("") and not is_loopback(None)
    assert not is_loopback("localhost.example.com")


@pytest.mark.parametrize(("url", "expected"), [
    ("https://user:secret@api.example.com/v1?x=1", "https://***@api.example.com/v1?x=1"),
    ("https://api.example.com/v1?token=abc&room=r1", "https://api.example.com/v1?token=***&room=r1"),
    ("wss://lk.example.com/rtc?access_token=eyJ.x.y", "wss://lk.example.com/rtc?access_token=***"),
    ("https://h/p?API-Key=k&Signature=s&sig=t", "https://h/p?API-Key=***&Signature=***&sig=***"),
    ("https://h/p#token=abc", "https://h/p"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
])
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
