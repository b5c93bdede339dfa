"""Webhook URL checks: syntax, non-public literal addresses, resolved addresses, the allow-list."""

from __future__ import annotations

import socket

import pytest

from protocol import urlguard
from protocol.urlguard import UnsafeURL, check_webhook_url, resolve_public, resolve_public_sync

NON_PUBLIC = [
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.1", "192.168.1.1",
    "169.254.169.254", "0.0.0.0", "100.64.0.1", "100.127.255.254", "224.0.0.1", "255.255.255.255",
    "[::1]", "[::]", "[fc00::1]", "[fd12:3456::1]", "[fe80::1]", "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]",
    "[ff0e::1]", "[2002:7f00:1::1]", "[64:ff9b::7f00:1]", "127.0.0.1.", "10.0.0.1.",  # a trailing dot: the same
    # IPv6 forms that embed a private IPv4 address, and ranges that are never public
    "[::7f00:1]", "[::127.0.0.1]", "[::a00:1]", "[::ffff:0:7f00:1]", "[::ffff:0:a9fe:a9fe]",
    "[64:ff9b::a9fe:a9fe]", "[64:ff9b:1::808:808]", "[64:ff9b:1:ffff::1]", "[2002:a00:1::1]",
    "[2002:a9fe:a9fe::1]", "[fec0::1]", "[fed0:1::2]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",
]


@pytest.mark.parametrize("host", NON_PUBLIC)
def test_non_public_literal_refused(host: str) -> None:
    with pytest.raises(UnsafeURL, match="non-public"):
        check_webhook_url(f"http://{host}/hook", allow="")


@pytest.mark.parametrize("host", ["localhost", "LocalHost.", "api.localhost"])
def test_a_loopback_name_is_refused_at_submit_and_the_error_says_how_to_allow_it(host: str) -> None:
    with pytest.raises(UnsafeURL, match="(?i)localhost.? resolves to a non-public address.*TOKENQ_WEBHOOK_ALLOW"):
        check_webhook_url(f"http://{host}:9000/hook", allow="")
    check_webhook_url(f"http://{host}:9000/hook", allow="127.0.0.0/8")
    check_webhook_url(f"http://{host}:9000/hook", allow=host)
    check_webhook_url("http://localhost.example.com/hook", allow="")  # a public name that only starts so


@pytest.mark.parametrize("host", ["8.8.8.8", "1.1.1.1", "[2606:4700:4700::1111]", "example.com",
                                  "[64:ff9b::808:808]", "[2002:808:808::1]", "[::ffff:8.8.8.8]"])
def test_public_or_unresolved_host_accepted(host: str) -> None:
    check_webhook_url(f"https://{host}:8443/hook?x=1", allow="")


@pytest.mark.parametrize("url", ["https://example.com/a\r\nHost: evil", "https://example.com/\t", "https://ex\nample.com/",
                                 "https://example.com/a b", "https://example.com/\x7f", "https://example.com/\x85",
                                 "\x00https://example.com/"])
def test_control_characters_and_spaces_refused(url: str) -> None:
    with pytest.raises(UnsafeURL, match="control character or space"):
        check_webhook_url(url, allow="")


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://x/", "example.com/x",
                                 "javascript:alert(1)", "http:///path", "http://example.com:99999/",
                                 "http://example.com:0/"])
def test_bad_syntax_refused(url: str) -> None:
    with pytest.raises(UnsafeURL):
        check_webhook_url(url, allow="")


@pytest.mark.parametrize("url", ["http://user:pw@example.com/", "http://user@example.com/",
                                 "http://8.8.8.8@127.0.0.1/"])
def test_userinfo_refused(url: str) -> None:
    with pytest.raises(UnsafeURL, match="user name"):
        check_webhook_url(url, allow="")


def test_allow_list_by_cidr_and_host_name() -> None:
    check_webhook_url("http://127.0.0.1:9/", allow="127.0.0.0/8")
    check_webhook_url("http://10.1.2.3/", allow=" 192.168.0.0/16 , 10.1.0.0/16")
    check_webhook_url("http://[::1]:8080/", allow="::1/128")
    with pytest.raises(UnsafeURL):
        check_webhook_url("http://10.2.0.1/", allow="10.1.0.0/16")
    # A host name on the list skips the address checks entirely (exact, case-insensitive match).
    assert resolve_public_sync("http://LocalHost:8080/", allow="localhost")
    with pytest.raises(UnsafeURL):
        resolve_public_sync("http://localhost:8080/", allow="otherhost")


def test_the_allow_list_comes_from_the_environment_through_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.errors import ApiError
    from gateway.options import check_webhook
    from tokenq.settings import Settings

    monkeypatch.setenv(urlguard.ALLOW_ENV, "127.0.0.1/32")
    assert Settings.from_env().webhook_allow == "127.0.0.1/32"
    assert check_webhook("http://127.0.0.1/") == "http://127.0.0.1/"  # the gateway's submit check
    monkeypatch.delenv(urlguard.ALLOW_ENV)
    with pytest.raises(ApiError, match="TOKENQ_WEBHOOK_ALLOW"):
        check_webhook("http://127.0.0.1/")


def _fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> None:
    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_resolution_checks_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_resolver(monkeypatch, ["93.184.216.34", "10.0.0.5"])
    with pytest.raises(UnsafeURL, match="rebind.example resolves to a non-public address") as e:
        resolve_public_sync("https://rebind.example/hook", allow="")
    assert "10.0.0.5" not in str(e.value) and str(e.value.address) == "10.0.0.5"  # the log's, not the tenant's
    _fake_resolver(monkeypatch, ["93.184.216.34", "2606:2800:220:1::1"])
    addrs = resolve_public_sync("https://ok.example/hook", allow="")
    assert [str(a) for a in addrs] == ["93.184.216.34", "2606:2800:220:1::1"]


async def test_async_resolution_refuses_loopback() -> None:
    with pytest.raises(UnsafeURL, match="non-public"):
        await resolve_public("http://localhost:1/", allow="")
    assert [str(a) for a in await resolve_public("http://127.0.0.1:1/", allow="127.0.0.1")] == ["127.0.0.1"]
