"""An upstream's `tls:` settings (README "Configuration") turned into what aiohttp's `ssl=` takes.

`upstream_ssl` reads the CA and client certificate files and builds one
`ssl.SSLContext` per upstream. Validation (fluxgate.validate_upstreams) and
config building (fluxgate.config) both call it, so a file that passes `check`
is loaded the same way when the config is applied, and a file that breaks
later makes the reload fail instead of the requests. Problems name the key
they belong to (`ca_file`, `cert_file`, `key_file`) and never quote a file's
contents: a key file is a secret.
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Mapping
from typing import Any, Final

TLS_KEYS: Final = ("ca_file", "cert_file", "key_file", "verify")
FILE_KEYS: Final = ("ca_file", "cert_file", "key_file")
DEFAULT_VERIFY: Final = True
# PEM certificate chains and keys are a few KiB; the cap keeps a path that
# points at something huge (a log, a disk image) from being read into memory.
MAX_PEM_BYTES: Final = 1 << 20
# The proxy speaks HTTP/1.1 upstream; an upstream offered nothing by ALPN may
# pick HTTP/2 (aiohttp sets the same on its own default contexts).
_ALPN: Final = ["http/1.1"]


class TLSFileError(Exception):
    """The files of one `tls:` section cannot be used: (key, problem) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))
        self.problems = problems


class _Encrypted(Exception):
    """The key asked for a password; none is configured."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and block the master.
    raise _Encrypted


def read_pem(path: str) -> str:
    """A PEM file's text; OSError or ValueError (whose text is ours) when it cannot be."""
    # Checked before opening: opening a FIFO would block until a writer came.
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("is not a regular file")
    if info.st_size > MAX_PEM_BYTES:
        raise ValueError(f"is larger than {MAX_PEM_BYTES} bytes: not a PEM file")
    with open(path, "rb") as f:
        data = f.read(MAX_PEM_BYTES + 1)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("is not a PEM file (PEM is ASCII text)") from None


def _has_certificate(text: str) -> bool:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError):
        return False
    return True


def upstream_ssl(tls: Mapping[str, Any] | None) -> ssl.SSLContext | bool:
    """aiohttp's `ssl=` for an upstream with this (validated in shape) `tls:` section.

    True: aiohttp's default verification against the system's CAs; False:
    no verification (`verify: false` without a client certificate);
    otherwise a context of our own. A `ca_file` replaces the system's CAs:
    the upstream must present a certificate that CA signed. Raises
    `TLSFileError` listing every problem with the files.
    """
    tls = tls or {}
    verify: bool = tls.get("verify", DEFAULT_VERIFY)
    paths: dict[str, str] = {key: tls[key] for key in FILE_KEYS if tls.get(key) is not None}
    if not paths:
        return verify
    problems: list[tuple[str, str]] = []
    texts: dict[str, str] = {}
    for key, path in paths.items():
        try:
            texts[key] = read_pem(path)
        except ValueError as exc:
            problems.append((key, str(exc)))
        except OSError as exc:
            problems.append((key, f"cannot be read: {exc.strerror or type(exc).__name__}"))
    if problems:
        raise TLSFileError(problems)

    ca_text = texts.get("ca_file")
    if ca_text is not None and not _has_certificate(ca_text):
        problems.append(("ca_file", "holds no PEM certificate"))
        ca_text = None
    if verify:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_text)
    else:  # for tests and internal networks only (docs/security.md)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(_ALPN)
    if "cert_file" in texts:
        if not _has_certificate(texts["cert_file"]):
            problems.append(("cert_file", "holds no PEM certificate"))
        else:
            _load_client_certificate(context, paths, problems)
    if problems:
        raise TLSFileError(problems)
    return context


def _load_client_certificate(
    context: ssl.SSLContext, paths: dict[str, str], problems: list[tuple[str, str]]
) -> None:
    key_file = paths.get("key_file")
    # Where the key was looked for: the field a problem with it belongs to.
    where = "key_file" if key_file is not None else "cert_file"
    try:
        context.load_cert_chain(paths["cert_file"], key_file, password=_no_password)
    except _Encrypted:
        problems.append((where, "holds an encrypted private key; give an unencrypted one"))
    except ssl.SSLError as exc:
        # OpenSSL's reason code, an identifier rather than a message: the key
        # parsed but belongs to another certificate.
        if exc.reason == "KEY_VALUES_MISMATCH":
            problems.append((where, "the private key does not match the certificate in cert_file"))
        elif key_file is not None:
            problems.append(("key_file", "holds no PEM private key"))
        else:
            problems.append(("cert_file", "holds no private key; set key_file"))
    except OSError as exc:  # replaced since it was read a moment ago
        problems.append((where, f"cannot be read: {exc.strerror or type(exc).__name__}"))
