"""Image references from API requests, turned into decoded images under explicit safety limits.

A request names its image with a URL, and every URL is untrusted input. Threat model and
the check that answers each threat (each is a field of :class:`MediaPolicy`):

- Memory and CPU exhaustion by size: a ``data:`` URL's encoded length is checked *before*
  it is decoded, a download stops reading once it passes ``max_image_bytes`` (vLLM had a
  denial of service because media was read in full before the limits were checked), and
  the pixel count read from the image header is capped before any pixel is decoded
  (decompression bombs: a few KB of PNG can claim 10^8 pixels).
- Dangerous decoders: only PNG, JPEG, GIF, WebP, BMP and TIFF signatures reach Pillow, so
  a crafted file cannot pick a plugin such as EPS (which runs Ghostscript).
- Server-side request forgery through ``http(s)`` URLs (several vLLM CVEs): remote media
  is off unless ``allow_remote_media``; then the host must be in ``allowed_media_domains``
  (exact match); every address the name resolves to must be public (no loopback, private,
  link-local, CGNAT, multicast, reserved or unspecified address, no cloud metadata
  endpoint, also when wrapped in an IPv6 form such as ``::ffff:127.0.0.1``); the connection
  goes to the address that was checked (no second DNS lookup that a rebinding attacker
  could answer differently; TLS still checks the certificate against the host name);
  redirects are refused (each hop would need the same checks); a total deadline applies.
- Reading server files through ``file://`` URLs: refused unless ``allowed_local_media_path``
  is set; the path is resolved (symlinks and ``..``) before it must lie inside that folder.
- Leaking internals in error text (vLLM's CVE-2026-22778 returned a Pillow message with a
  heap address): :class:`MediaError` messages say what was wrong and what is expected and
  never carry a library's exception text; the detail is logged server-side.

Nothing here depends on an HTTP framework; ``MediaError.status`` and ``.code`` tell the
server what to answer (400: refused or malformed reference, 413: too large, 422: the
bytes are not a usable image or could not be fetched).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fastvlm.errors import ConfigError, ImageError, ImageTooLargeError
from fastvlm.processing import DEFAULT_MAX_PIXELS, load_image

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""(host, port) -> the addresses the host name resolves to, as strings."""

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254"))
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")  # embeds an IPv4 address in its last 32 bits
IMAGE_SIGNATURES = (  # (leading bytes, format); anything else never reaches Pillow
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_CHUNK = 64 * 1024


class MediaError(ImageError):
    """An image reference that was refused or could not be used.

    ``status`` is the HTTP status a server should answer with and ``code`` a short,
    stable machine-readable reason; the message is safe to show to the client.
    """

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class MediaPolicy:
    """What image references a server accepts; the defaults accept only ``data:`` URLs."""

    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # None: no decompression-bomb guard
    allow_remote_media: bool = False
    allowed_media_domains: frozenset[str] = frozenset()  # exact host names; empty: none
    allowed_local_media_path: Path | None = None  # None: file:// URLs refused
    fetch_timeout_s: float = 5.0  # deadline for a download; also bounds each network wait
    limit_images_per_prompt: int = 1

    def __post_init__(self) -> None:
        if self.max_image_bytes < 1:
            raise ConfigError(f"max_image_bytes must be at least 1, got {self.max_image_bytes}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be at least 1 or None, got {self.max_pixels}")
        if not self.fetch_timeout_s > 0:
            raise ConfigError(f"fetch_timeout_s must be positive, got {self.fetch_timeout_s}")
        if self.limit_images_per_prompt < 0:
            raise ConfigError(f"limit_images_per_prompt must be 0 or more, got {self.limit_images_per_prompt}")
        if isinstance(self.allowed_media_domains, str):
            raise ConfigError("allowed_media_domains must be a set of host names, not one string")
        domains = frozenset(d.strip().lower() for d in self.allowed_media_domains)
        object.__setattr__(self, "allowed_media_domains", domains)
        if self.allowed_local_media_path is not None:
            object.__setattr__(self, "allowed_local_media_path", Path(self.allowed_local_media_path))


def check_image_count(n: int, policy: MediaPolicy) -> None:
    """Refuse a prompt with more than ``policy.limit_images_per_prompt`` images (400)."""
    if n > policy.limit_images_per_prompt:
        raise MediaError(
            f"the prompt has {n} images; at most {policy.limit_images_per_prompt} allowed per prompt",
            status=400,
            code="too_many_images",
        )


def load_media(url: str, policy: MediaPolicy, *, resolve: Resolver | None = None) -> tuple[Image.Image, bytes]:
    """The upright RGB image a request's URL names, and the raw bytes it was decoded from.

    ``url`` is a ``data:image/...;base64,`` URL, an ``http(s)://`` URL or a ``file://``
    URL, each accepted only as ``policy`` allows. ``resolve`` maps a host name to its
    addresses (default: the system resolver). Raises :class:`MediaError`.
    """
    if not isinstance(url, str) or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise _bad_url("the image URL must be a string without whitespace or control characters")
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "data":
        raw = _read_data_url(url, policy)
    elif scheme in ("http", "https"):
        raw = _read_remote(url, policy, resolve or _system_resolve)
    elif scheme == "file":
        raw = _read_local(url, policy)
    elif "://" in url:
        raise _bad_url(f"unsupported image URL scheme {scheme[:20]!r}; use data:, http(s):// or file://")
    else:  # a bare path or name such as "photo.jpg"
        raise _bad_url("the image must be given as a URL: data:image/...;base64,..., http(s):// or file://")
    return _decode(raw, policy), raw


# ------------------------------------------------------------------------------------- data: URLs


def _read_data_url(url: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise _bad_url("a data URL needs a comma before its payload: data:image/png;base64,...")
    media_type, *params = header.lower().split(";")
    if not media_type.startswith("image/"):
        raise _bad_url(f"a data URL must hold an image (image/png, image/jpeg, ...), got {media_type[:40]!r}")
    if params[-1:] != ["base64"]:
        raise _bad_url("a data URL must be base64-encoded: data:image/png;base64,...")
    # Check the size before decoding: n base64 characters decode to at most 3n/4 bytes.
    if len(payload) > 4 * -(-policy.max_image_bytes // 3):
        raise _too_large(policy)
    try:
        raw = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise _bad_url("the data URL payload is not valid base64") from None
    if len(raw) > policy.max_image_bytes:
        raise _too_large(policy)
    return raw


# ------------------------------------------------------------------------------------- file:// URLs


def _read_local(url: str, policy: MediaPolicy) -> bytes:
    root = policy.allowed_local_media_path
    if root is None:
        raise MediaError(
            "file:// image URLs are disabled on this server; send the image as a data URL",
            status=400,
            code="local_media_disabled",
        )
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise _bad_url("a file URL must look like file:///absolute/path/to/image.png")
    path_text = urllib.parse.unquote(parts.path)
    if "\x00" in path_text or not path_text.startswith("/"):
        raise _bad_url("a file URL must look like file:///absolute/path/to/image.png")
    path = Path(path_text).resolve()  # symlinks and '..' resolved before the containment check
    if not path.is_relative_to(root.resolve()):
        raise MediaError(
            "file:// image URLs must point inside the server's allowed media folder",
            status=400,
            code="local_media_not_allowed",
        )
    if not path.is_file():
        raise MediaError("no image file at that file:// URL", status=400, code="media_not_found")
    with path.open("rb") as file:  # the resolved path, so a symlink swapped in later is not followed
        raw = file.read(policy.max_image_bytes + 1)
    if len(raw) > policy.max_image_bytes:
        raise _too_large(policy)
    return raw


# ------------------------------------------------------------------------------------- http(s) URLs


def _read_remote(url: str, policy: MediaPolicy, resolve: Resolver) -> bytes:
    if not policy.allow_remote_media:
        raise MediaError(
            "remote image URLs are disabled on this server; send the image as a data URL",
            status=400,
            code="remote_media_disabled",
        )
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise _bad_url("the image URL has an invalid port") from None
    host = parts.hostname or ""
    if not host or not host.isascii() or parts.username is not None or parts.password is not None:
        raise _bad_url("a remote image URL must be http(s)://host/path, without credentials")
    if host not in policy.allowed_media_domains:
        raise MediaError(
            f"images from {host[:100]!r} are not allowed; the server accepts only its allowed media domains",
            status=400,
            code="media_domain_not_allowed",
        )
    address = _checked_address(host, port, resolve)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _fetch_from_address(
        address, host=host, port=port, target=target, tls=parts.scheme.lower() == "https", policy=policy
    )


def _system_resolve(host: str, port: int) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _checked_address(host: str, port: int, resolve: Resolver) -> IPAddress:
    """The address to connect to, after checking every address ``host`` resolves to."""
    try:
        found = list(resolve(host, port))
    except OSError as err:
        log.info("cannot resolve media host %r: %s", host, err)
        found = []
    if not found:
        raise MediaError(f"cannot resolve the image host {host[:100]!r}", status=422, code="media_fetch_failed")
    addresses: list[IPAddress] = []
    for text in found:
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:  # e.g. a scoped link-local address: refused like any non-public one
            addresses = []
            break
    if not addresses or not all(is_public_address(a) for a in addresses):
        log.warning("media host %r resolves to a non-public address: %s", host, found)
        raise MediaError(
            f"the image host {host[:100]!r} resolves to an address that is not public; it is refused",
            status=400,
            code="media_address_not_allowed",
        )
    return addresses[0]


def is_public_address(address: IPAddress) -> bool:
    """Whether a server may connect to ``address`` on a client's behalf (a public unicast address).

    IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by it too.
    """
    inner: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            inner.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            inner.append(address.sixtofour)
        if address.teredo is not None:
            inner.extend(address.teredo)
        if address in NAT64_PREFIX:
            inner.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return not any(_is_blocked(a) for a in inner)


def _is_blocked(a: IPAddress) -> bool:
    return (
        a in METADATA_ADDRESSES
        or not a.is_global
        or a.is_loopback
        or a.is_private
        or a.is_link_local
        or a.is_multicast
        or a.is_reserved
        or a.is_unspecified
        or (isinstance(a, ipaddress.IPv6Address) and a.is_site_local)
    )


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to one already-checked address; TLS verifies ``server_name``."""

    def __init__(self, address: IPAddress, port: int, *, server_name: str, tls: bool, timeout: float) -> None:
        super().__init__(str(address), port, timeout=timeout)
        self._server_name = server_name
        self._tls = ssl.create_default_context() if tls else None

    def connect(self) -> None:
        super().connect()  # self.host is an IP literal: no DNS lookup happens here
        if self._tls is not None:
            self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


def _fetch_from_address(
    address: IPAddress,
    *,
    host: str,
    port: int,
    target: str,
    tls: bool,
    policy: MediaPolicy,
    allow_loopback: bool = False,
) -> bytes:
    """GET ``target`` from ``address`` (already resolved from ``host``), at most ``max_image_bytes``.

    The address is checked again here. ``allow_loopback`` exists for the tests, which serve
    files on 127.0.0.1; nothing in this module passes it.
    """
    if not (is_public_address(address) or (allow_loopback and address.is_loopback)):
        raise MediaError(
            "the image host's address is not public; it is refused", status=400, code="media_address_not_allowed"
        )
    deadline = time.monotonic() + policy.fetch_timeout_s
    host_header = f"[{host}]" if ":" in host else host
    if port != (443 if tls else 80):
        host_header += f":{port}"
    conn = _PinnedConnection(address, port, server_name=host, tls=tls, timeout=policy.fetch_timeout_s)
    try:
        conn.request("GET", target, headers={"Host": host_header, "Accept": "image/*", "Accept-Encoding": "identity"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise MediaError(
                "the image URL answered with a redirect; redirects are not followed",
                status=400,
                code="media_redirect_not_allowed",
            )
        if response.status != 200:
            raise MediaError(
                f"the image URL answered with HTTP status {response.status}", status=422, code="media_fetch_failed"
            )
        declared = response.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > policy.max_image_bytes:
            raise _too_large(policy)
        return _read_capped(conn, response, policy.max_image_bytes, deadline)
    except (OSError, http.client.HTTPException) as err:
        log.info("fetching media from %r failed: %r", host, err)
        timed_out = isinstance(err, TimeoutError) or time.monotonic() >= deadline
        reason = "timed out" if timed_out else "failed"
        raise MediaError(
            f"fetching the image from {host[:100]!r} {reason}", status=422, code="media_fetch_failed"
        ) from None
    finally:
        conn.close()


def _read_capped(
    conn: http.client.HTTPConnection, response: http.client.HTTPResponse, cap: int, deadline: float
) -> bytes:
    """The response body, read in chunks; stops as soon as it passes ``cap`` or the deadline."""
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("media download deadline passed")
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            raise MediaError(f"the image is larger than the {cap} bytes allowed", status=413, code="media_too_large")
        chunks.append(chunk)


# ------------------------------------------------------------------------------------- decoding


def _decode(raw: bytes, policy: MediaPolicy) -> Image.Image:
    if not any(raw.startswith(signature) for signature, _ in IMAGE_SIGNATURES) and not _is_webp(raw):
        raise _invalid_image()
    try:
        return load_image(raw, max_pixels=policy.max_pixels)
    except ImageTooLargeError as err:
        log.info("media rejected by the pixel cap: %s", err)
        raise MediaError(
            f"the image has more than the {policy.max_pixels} pixels allowed", status=413, code="image_too_large"
        ) from None
    except ImageError as err:
        log.info("media rejected by the decoder: %s", err)  # the detail stays in the server log
        raise _invalid_image() from None


def _is_webp(raw: bytes) -> bool:
    return raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"


def _invalid_image() -> MediaError:
    return MediaError(
        "the media is not a complete image in a supported format (PNG, JPEG, GIF, WebP, BMP or TIFF)",
        status=422,
        code="invalid_image",
    )


def _too_large(policy: MediaPolicy) -> MediaError:
    return MediaError(
        f"the image is larger than the {policy.max_image_bytes} bytes allowed", status=413, code="media_too_large"
    )


def _bad_url(message: str) -> MediaError:
    return MediaError(message, status=400, code="invalid_media_url")
