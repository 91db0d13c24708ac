"""TLS on both sides of the proxy: the context clients are served with, and the context servers are reached
with (dial.py negotiates it with each server).

Clients upgrade in `ClientConnection._startup` (an SSLRequest answered `S`, then `loop.start_tls`).
Relative file names in the config are relative to the config file's directory.
"""

from __future__ import annotations

import logging
import os
import ssl

from shardproxy.config import Config, ConfigError, ServerTlsSettings, TlsSettings

log = logging.getLogger("shardproxy.tls")



def client_context(config: Config) -> ssl.SSLContext | None:
    """The context clients are served with, or None when `tls.mode` is disable.
    Raises ConfigError when the certificate, key or CA cannot be loaded."""
    tls: TlsSettings = config.tls
    if tls.mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # PostgreSQL's default ssl_min_protocol_version
    try:
        context.load_cert_chain(config_path(config, tls.cert), config_path(config, tls.key))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{config.path or '<config>'}: tls: cannot load cert/key: {_reason(exc)}"]) from None
    if tls.ca:
        try:
            context.load_verify_locations(cafile=config_path(config, tls.ca))
        except (OSError, ValueError) as exc:
            raise ConfigError([f"{config.path or '<config>'}: tls.ca: cannot load: {_reason(exc)}"]) from None
        context.verify_mode = ssl.CERT_OPTIONAL  # a client certificate is checked if sent, never required
    return context


def server_context(config: Config) -> ssl.SSLContext | None:
    """The context servers are reached with, or None when `server_tls.mode` is disable.

    prefer encrypts without checking; require checks the server's chain against `server_tls.ca` when one is
    given (libpq's rule when a root certificate is present), as verify-ca always does; verify-full also checks
    the host name or address the node is configured with. Validation refuses verify-* without a ca."""
    tls: ServerTlsSettings = config.server_tls
    if tls.mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.mode == "verify-full"
    if tls.ca is None or tls.mode == "prefer":
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        context.load_verify_locations(cafile=config_path(config, tls.ca))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{config.path or '<config>'}: server_tls.ca: cannot load: {_reason(exc)}"]) from None
    return context


def config_path(config: Config, name: str | None) -> str:
    """A file named in the config: relative names are relative to the config file's directory."""
    assert name is not None  # validation requires cert and key unless TLS is off
    name = os.path.expanduser(name)
    if config.path and not os.path.isabs(name):
        return os.path.join(os.path.dirname(os.path.abspath(config.path)), name)
    return name


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
