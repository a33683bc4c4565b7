"""What to say when a server's certificate is valid but not for the host the URL
names: which names it holds, and which host that is. A CA bundle does not fix
that, so the CA advice every other verification failure gets would mislead.

The names are read by a second handshake that checks the chain but not the
name (the chain passed in the first one: only the name failed), and sends
nothing over it; when that handshake fails too, the line says so and names the
host only.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import ssl

    from traced_run.config.settings import Settings

NAME_MISMATCH = {62, 64}
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""
MOST_NAMES = 10
"""Names a line lists; a certificate for many hosts is said with how many more it holds."""


def name_mismatch(error: ssl.SSLCertVerificationError, url: str, settings: Settings,
                  timeout: float) -> str | None:
    """The reason for a certificate that is not for the URL's host, or None for any other failure."""
    from traced_run.transport import printable

    parts = urlsplit(url)
    if error.verify_code not in NAME_MISMATCH or not parts.hostname:
        return None
    host = printable(parts.hostname)
    names = _names(parts.hostname, parts.port or 443, settings, timeout)
    if not names:
        held = "names that could not be read"
    else:
        more = f" and {len(names) - MOST_NAMES} more" if len(names) > MOST_NAMES else ""
        held = ", ".join(printable(name) for name in names[:MOST_NAMES]) + more
    return (f"certificate verify failed: the server's certificate holds {held}, not {host}, the host the "
            f"URL names; use a URL with a name the certificate holds, or have the certificate issued "
            f"for {host}")


def _names(host: str, port: int, settings: Settings, timeout: float) -> list[str]:
    """The DNS names and IP addresses the server's certificate holds (its subject's common name
    when it has none), or [] when they cannot be read."""
    import http.client

    from traced_run import transport
    from traced_run.transport import connections

    try:
        with connections._IN_OPENSSL:  # see there: a fork meanwhile would inherit OpenSSL's locks held
            context = transport.tls_context(settings)
    except transport.TlsSetupError:
        return []
    context.check_hostname = False
    proxy = transport.proxy_for(f"https://{host}:{port}")
    proxied = urlsplit(proxy) if proxy else None
    connection = connections._GuardedHTTPSConnection(
        proxied.hostname if proxied and proxied.hostname else host, (proxied.port or 80) if proxied else port,
        timeout=max(timeout, 0.05), context=context)
    if proxied:
        connection.set_tunnel(host, port)
    with contextlib.closing(connection):
        try:
            connection.connect()
            assert connection.sock is not None
            certificate: dict[str, Any] = dict(connection.sock.getpeercert() or {})
        except (OSError, ValueError, http.client.HTTPException):
            return []
    names = [str(value) for _, value in certificate.get("subjectAltName", ())]
    if names:
        return names
    return [str(value) for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
