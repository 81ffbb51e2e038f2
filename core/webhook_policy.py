"""Where webhooks may go, and how they are signed (Standard Webhooks).

A ``webhook_url`` is checked when a job is submitted and again when it is delivered (a name
may resolve elsewhere by then): it must be http(s), and every address its host resolves to
must be public. Loopback, link-local (cloud metadata), private, shared (CGNAT), multicast,
reserved and unspecified addresses are refused unless ``webhook_allow_private`` is set, for
an internal deployment whose receivers live on a private network. At delivery the host is
resolved once and the connection goes to a vetted address (:func:`vet`), with the URL's own
``Host`` header and, for https, its TLS server name and certificate check: a name that answers
a public address to the check and a private one to the connection gets nowhere.

Signatures follow https://www.standardwebhooks.com: headers ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of
"id.timestamp.body">``), so a receiver can reject a replay by its id and an old timestamp.
The secret is the deployment's ``ROBUSTSCOPE_WEBHOOK_SIGNING_SECRET`` when set, else the
owner's own secret (``robustscope apikey create`` prints it in ``whsec_`` form).
"""

from __future__ import annotations

import base64
import ipaddress
import socket
from urllib.parse import urlsplit

from core.errors import Invalid


def refuse_reason(url: str, allow_private: bool) -> str | None:
    """Why ``url`` may not receive webhooks, or None when it may."""
    return vet(url, allow_private)[0]


def vet(url: str, allow_private: bool) -> tuple[str | None, list[str]]:
    """Resolves ``url``'s host once and vets every address it resolves to: the reason it is
    refused (or None), and the vetted addresses, which the delivery connects to and nothing
    else. A name whose answer changes between a check and the connection (DNS rebinding)
    therefore cannot reach an address that was not checked. With ``allow_private`` nothing
    is resolved here and the list is empty: the delivery connects by name."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host", []
    if "\x00" in url:
        return "contains a NUL character", []
    if allow_private:
        return None, []
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "has an invalid port", []
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return f"host {parts.hostname!r} does not resolve", []
    addresses: list[str] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not address.is_global:
            return (f"host {parts.hostname!r} resolves to {address}, a loopback, link-local "
                    "or private address"), []
        if str(address) not in addresses:
            addresses.append(str(address))
    if not addresses:
        return f"host {parts.hostname!r} does not resolve", []
    return None, addresses


def check_url(url: str | None, allow_private: bool) -> None:
    if url is None:
        return
    reason = refuse_reason(url, allow_private)
    if reason is not None:
        raise Invalid(f"webhook_url {reason}", field="webhook_url")


def standard_secret(raw: str) -> str:
    """A secret in the ``whsec_<base64>`` form Standard Webhooks libraries take."""
    if raw.startswith("whsec_"):
        return raw
    return "whsec_" + base64.b64encode(raw.encode()).decode()
