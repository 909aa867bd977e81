"""Image references from requests: what is accepted, what is refused, and with which status.

No test touches the network: host names resolve through an injected resolver, and the
download path runs against an HTTP server on 127.0.0.1 reached through the internal
fetch function with its test-only loopback allowance.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from fastvlm.errors import ConfigError, ImageError
from fastvlm.serve import media
from fastvlm.serve.media import MediaError, MediaPolicy, check_image_count, load_media
from tests.serve.conftest import data_url, png_bytes


def refused(url: str, policy: MediaPolicy, **kwargs: object) -> MediaError:
    with pytest.raises(MediaError) as info:
        load_media(url, policy, **kwargs)  # type: ignore[arg-type]
    return info.value


def resolving_to(*addresses: str) -> media.Resolver:
    return lambda host, port: list(addresses)


REMOTE = MediaPolicy(allow_remote_media=True, allowed_media_domains=frozenset({"Images.Example.com"}))


# ------------------------------------------------------------------------------------- data: URLs


def test_a_png_data_url_round_trips_to_the_same_pixels_and_bytes():
    raw = png_bytes()
    image, returned = load_media(data_url(raw), MediaPolicy())
    assert returned == raw
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((3, 2)) == (200, 30, 10)


def test_media_errors_are_image_errors_with_a_status_and_a_code():
    err = refused("photo.jpg", MediaPolicy())
    assert isinstance(err, ImageError) and isinstance(err, ValueError)
    assert (err.status, err.code) == (400, "invalid_media_url")


def test_a_data_url_that_is_not_base64_is_a_400():
    err = refused("data:image/png;base64,iVBOR*w0KGgo!!", MediaPolicy())
    assert (err.status, err.code) == (400, "invalid_media_url")
    assert "base64" in str(err)


def test_base64_with_stray_characters_is_a_400_not_silently_cleaned():
    url = data_url(png_bytes())
    head, payload = url.split(",")
    err = refused(f"{head},{payload[:12]}!{payload[12:]}", MediaPolicy())
    assert (err.status, err.code) == (400, "invalid_media_url")


@pytest.mark.parametrize(
    "url",
    ["data:image/png,rawbytes", "data:text/plain;base64,aGVsbG8=", "data:image/png;base64"],
)
def test_a_data_url_must_be_a_base64_image(url):
    err = refused(url, MediaPolicy())
    assert (err.status, err.code) == (400, "invalid_media_url")


def test_a_data_url_of_bytes_that_are_not_an_image_is_a_422():
    err = refused(data_url(b"GIF89a but not really a gif at all" * 3), MediaPolicy())
    assert (err.status, err.code) == (422, "invalid_image")
    err = refused(data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n"), MediaPolicy())  # never reaches Ghostscript
    assert (err.status, err.code) == (422, "invalid_image")


def test_a_format_outside_the_supported_list_never_reaches_the_decoder():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PPM")  # Pillow would decode it
    err = refused(data_url(buffer.getvalue()), MediaPolicy())
    assert (err.status, err.code) == (422, "invalid_image")


def test_a_truncated_png_is_a_422_without_library_text():
    raw = png_bytes((64, 64), color=(1, 2, 3))
    err = refused(data_url(raw[: len(raw) // 2]), MediaPolicy())
    assert (err.status, err.code) == (422, "invalid_image")
    assert "BytesIO" not in str(err) and "0x" not in str(err)


def test_an_oversized_data_url_is_a_413_before_anything_is_decoded(monkeypatch):
    def no_decoding(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the payload was decoded before its size was checked")

    monkeypatch.setattr(media.base64, "b64decode", no_decoding)
    policy = MediaPolicy(max_image_bytes=1000)
    err = refused(data_url(bytes(1100)), policy)
    assert (err.status, err.code) == (413, "media_too_large")
    # Not even valid base64 is looked at: the length alone refuses it.
    err = refused("data:image/png;base64," + "!" * 5000, policy)
    assert (err.status, err.code) == (413, "media_too_large")


def test_a_data_url_at_the_byte_cap_is_accepted_and_one_byte_over_is_not():
    raw = png_bytes()
    image, _ = load_media(data_url(raw), MediaPolicy(max_image_bytes=len(raw)))
    assert image.size == (8, 6)
    err = refused(data_url(raw), MediaPolicy(max_image_bytes=len(raw) - 1))
    assert (err.status, err.code) == (413, "media_too_large")


def test_a_png_claiming_over_100_megapixels_is_refused_by_the_pixel_cap():
    raw = png_bytes((10_001, 10_000), mode="1", color=0)  # a few KB that would decode to 100 MP
    assert len(raw) < 100_000
    err = refused(data_url(raw), MediaPolicy())
    assert (err.status, err.code) == (413, "image_too_large")
    assert "100000000" in str(err)


# ------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("url", ["photo.jpg", "/etc/passwd", "C:\\images\\a.png", "", "images.example.com/a.png"])
def test_a_bare_string_that_is_not_a_url_is_a_400(url):
    err = refused(url, MediaPolicy())
    assert (err.status, err.code) == (400, "invalid_media_url")


@pytest.mark.parametrize("url", ["ftp://images.example.com/a.png", "gopher://x/", "data :x", "http://a b/"])
def test_other_schemes_and_control_characters_are_a_400(url):
    err = refused(url, REMOTE)
    assert err.status == 400


def test_the_image_count_is_checked_against_the_limit():
    check_image_count(0, MediaPolicy())
    check_image_count(1, MediaPolicy())
    err = pytest.raises(MediaError, check_image_count, 2, MediaPolicy()).value
    assert (err.status, err.code) == (400, "too_many_images")
    check_image_count(3, MediaPolicy(limit_images_per_prompt=3))
    with pytest.raises(MediaError):
        check_image_count(1, MediaPolicy(limit_images_per_prompt=0))


def test_the_policy_is_frozen_validated_and_normalised():
    policy = MediaPolicy(allowed_media_domains=frozenset({" Images.Example.COM "}))
    assert policy.allowed_media_domains == frozenset({"images.example.com"})
    with pytest.raises(AttributeError):
        policy.allow_remote_media = True  # type: ignore[misc]
    for bad in ({"max_image_bytes": 0}, {"fetch_timeout_s": 0}, {"limit_images_per_prompt": -1}):
        with pytest.raises(ConfigError):
            MediaPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        MediaPolicy(allowed_media_domains="example.com")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- remote URLs


def test_remote_urls_are_refused_by_default_without_resolving():
    def no_lookup(host: str, port: int) -> list[str]:
        raise AssertionError("resolved a host while remote media is disabled")

    err = refused("https://images.example.com/cat.png", MediaPolicy(), resolve=no_lookup)
    assert (err.status, err.code) == (400, "remote_media_disabled")


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.net/cat.png",
        "https://images.example.com.evil.net/cat.png",
        "https://sub.images.example.com/cat.png",
        "https://images.example.com./cat.png",
    ],
)
def test_a_host_outside_the_allowed_domains_is_refused(url):
    err = refused(url, REMOTE, resolve=resolving_to("93.184.216.34"))
    assert (err.status, err.code) == (400, "media_domain_not_allowed")


def test_no_domain_is_allowed_when_the_allowlist_is_empty():
    policy = MediaPolicy(allow_remote_media=True)
    err = refused("https://images.example.com/cat.png", policy, resolve=resolving_to("93.184.216.34"))
    assert (err.status, err.code) == (400, "media_domain_not_allowed")


def test_credentials_in_a_remote_url_are_refused():
    err = refused("https://user:pw@images.example.com/cat.png", REMOTE, resolve=resolving_to("93.184.216.34"))
    assert (err.status, err.code) == (400, "invalid_media_url")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.20",
        "172.16.0.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "fe80::1%eth0",
        "not an address",
    ],
)
def test_an_allowed_host_that_resolves_to_a_non_public_address_is_refused(address):
    err = refused("http://images.example.com/cat.png", REMOTE, resolve=resolving_to(address))
    assert (err.status, err.code) == (400, "media_address_not_allowed")
    assert address not in str(err) or address == "not an address"


def test_one_non_public_address_among_public_ones_refuses_the_host():
    err = refused("https://images.example.com/a.png", REMOTE, resolve=resolving_to("93.184.216.34", "10.0.0.1"))
    assert err.code == "media_address_not_allowed"


def test_a_host_that_does_not_resolve_is_a_422():
    def fails(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    err = refused("https://images.example.com/a.png", REMOTE, resolve=fails)
    assert (err.status, err.code) == (422, "media_fetch_failed")
    assert "Name or service" not in str(err)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_public(address):
    assert media.is_public_address(ipaddress.ip_address(address))


# ------------------------------------------------------------------------------------- download path

PNG = png_bytes((5, 4), color=(0, 128, 255))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.seen_hosts.append(self.headers["Host"])  # type: ignore[attr-defined]
        if self.path == "/cat.png":
            self._answer(200, PNG, {"Content-Length": str(len(PNG))})
        elif self.path == "/redirect":
            self._answer(302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"})
        elif self.path == "/declared-big":
            self._answer(200, b"", {"Content-Length": str(10**9)})
        elif self.path == "/endless":  # no Content-Length, never ends: the reader must stop itself
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(bytes(64 * 1024))
            except OSError:
                return
        else:
            self._answer(404, b"not found", {})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.seen_hosts = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def fetch(server: ThreadingHTTPServer, target: str, policy: MediaPolicy = REMOTE, **kwargs: object) -> bytes:
    return media._fetch_from_address(
        ipaddress.ip_address("127.0.0.1"),
        host="images.example.com",
        port=server.server_address[1],
        target=target,
        tls=False,
        policy=policy,
        **kwargs,  # type: ignore[arg-type]
    )


def test_the_download_connects_to_the_checked_address_and_sends_the_host_name(server):
    assert fetch(server, "/cat.png", allow_loopback=True) == PNG
    assert server.seen_hosts == [f"images.example.com:{server.server_address[1]}"]  # type: ignore[attr-defined]


def test_the_fetch_function_itself_refuses_loopback_unless_told_otherwise(server):
    with pytest.raises(MediaError) as info:
        fetch(server, "/cat.png")
    assert (info.value.status, info.value.code) == (400, "media_address_not_allowed")
    assert server.seen_hosts == []  # type: ignore[attr-defined]


def test_a_redirect_is_refused_not_followed(server):
    with pytest.raises(MediaError) as info:
        fetch(server, "/redirect", allow_loopback=True)
    assert (info.value.status, info.value.code) == (400, "media_redirect_not_allowed")
    assert len(server.seen_hosts) == 1  # type: ignore[attr-defined]


def test_an_error_status_is_a_422(server):
    with pytest.raises(MediaError) as info:
        fetch(server, "/missing.png", allow_loopback=True)
    assert (info.value.status, info.value.code) == (422, "media_fetch_failed")


def test_a_declared_length_over_the_cap_is_a_413_before_reading(server):
    with pytest.raises(MediaError) as info:
        fetch(server, "/declared-big", allow_loopback=True)
    assert (info.value.status, info.value.code) == (413, "media_too_large")


def test_an_endless_body_stops_at_the_byte_cap(server):
    policy = MediaPolicy(allow_remote_media=True, max_image_bytes=200_000, fetch_timeout_s=10)
    with pytest.raises(MediaError) as info:
        fetch(server, "/endless", policy, allow_loopback=True)
    assert (info.value.status, info.value.code) == (413, "media_too_large")


def test_a_connection_failure_is_a_422_without_the_address():
    policy = MediaPolicy(allow_remote_media=True, fetch_timeout_s=2)
    with pytest.raises(MediaError) as info:
        media._fetch_from_address(
            ipaddress.ip_address("127.0.0.1"),
            host="images.example.com",
            port=unused_port(),
            target="/",
            tls=False,
            policy=policy,
            allow_loopback=True,
        )
    assert (info.value.status, info.value.code) == (422, "media_fetch_failed")
    assert "127.0.0.1" not in str(info.value) and "Errno" not in str(info.value)


def unused_port() -> int:
    """A loopback port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- file:// URLs


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    return folder


def test_a_file_url_inside_the_allowed_folder_is_loaded(media_dir):
    image, raw = load_media((media_dir / "cat.png").as_uri(), MediaPolicy(allowed_local_media_path=media_dir))
    assert raw == PNG and image.size == (5, 4)


def test_file_urls_are_refused_by_default(media_dir):
    err = refused((media_dir / "cat.png").as_uri(), MediaPolicy())
    assert (err.status, err.code) == (400, "local_media_disabled")


def test_a_file_url_outside_the_allowed_folder_is_refused(media_dir):
    policy = MediaPolicy(allowed_local_media_path=media_dir)
    err = refused((media_dir.parent / "secret.png").as_uri(), policy)
    assert (err.status, err.code) == (400, "local_media_not_allowed")
    assert str(media_dir) not in str(err)


@pytest.mark.parametrize("suffix", ["/../secret.png", "/%2E%2E/secret.png", "/./../media/../secret.png"])
def test_a_file_url_escaping_with_dot_dot_is_refused(media_dir, suffix):
    err = refused(f"file://{media_dir}{suffix}", MediaPolicy(allowed_local_media_path=media_dir))
    assert (err.status, err.code) == (400, "local_media_not_allowed")


def test_a_symlink_inside_the_folder_pointing_outside_is_refused(media_dir):
    (media_dir / "link.png").symlink_to(media_dir.parent / "secret.png")
    err = refused((media_dir / "link.png").as_uri(), MediaPolicy(allowed_local_media_path=media_dir))
    assert (err.status, err.code) == (400, "local_media_not_allowed")


def test_an_allowed_folder_given_through_a_symlink_still_works(media_dir, tmp_path):
    (tmp_path / "alias").symlink_to(media_dir)
    policy = MediaPolicy(allowed_local_media_path=tmp_path / "alias")
    image, _ = load_media((media_dir / "cat.png").as_uri(), policy)
    assert image.size == (5, 4)


def test_file_url_edge_cases_are_refused(media_dir):
    policy = MediaPolicy(allowed_local_media_path=media_dir)
    assert refused(f"file://otherhost{media_dir}/cat.png", policy).code == "invalid_media_url"
    assert refused(f"file://{media_dir}/cat.png%00.txt", policy).code == "invalid_media_url"
    assert refused(f"file://{media_dir}/missing.png", policy).code == "media_not_found"
    assert refused(f"file://{media_dir}", policy).code == "media_not_found"


def test_a_file_over_the_byte_cap_is_a_413(media_dir):
    err = refused((media_dir / "cat.png").as_uri(), MediaPolicy(allowed_local_media_path=media_dir, max_image_bytes=10))
    assert (err.status, err.code) == (413, "media_too_large")
