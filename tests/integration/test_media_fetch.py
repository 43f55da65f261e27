"""The gateway's media fetcher against a real HTTP server on loopback: the SSRF rules of gateway/media.py."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from gateway.media import MediaError, MediaFetchConfig, MediaFetcher, address_problem, check_image, decode_data_uri
from tests.media_server import MediaServer

MiB = 1024 * 1024


def png(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png()


@pytest.fixture
def server():
    with MediaServer({"/cat.png": PNG}) as s:
        yield s


def fetch(url: str, *, max_bytes: int = MiB, **config) -> bytes:
    async def main() -> bytes:
        fetcher = MediaFetcher(MediaFetchConfig(**config))
        try:
            return await fetcher.fetch(url, max_bytes=max_bytes, what="image")
        finally:
            await fetcher.close()

    return asyncio.run(main())


def refused(url: str, **kw) -> MediaError:
    with pytest.raises(MediaError) as info:
        fetch(url, **kw)
    return info.value


def test_an_allowed_host_is_fetched(server):
    assert fetch(server.url("/cat.png", "localhost"), allowed_domains=("localhost",),
                 allow_private_addresses=True) == PNG


def test_fetching_is_off_without_an_allowlist(server):
    err = refused(server.url("/cat.png", "localhost"), allow_private_addresses=True)
    assert "--allowed-media-domains" in str(err) and server.requests == []


def test_a_host_off_the_allowlist_is_refused(server):
    err = refused(server.url("/cat.png", "127.0.0.1"), allowed_domains=("localhost",), allow_private_addresses=True)
    assert "not in --allowed-media-domains" in str(err) and server.requests == []


def test_a_private_address_is_refused_without_the_opt_in(server):
    err = refused(server.url("/cat.png", "localhost"), allowed_domains=("localhost",))
    assert "loopback" in str(err) and server.requests == []


def test_a_redirect_to_a_private_address_is_refused(server):
    # The first hop is allowed (opt-in for the test server); the redirect target is re-checked: the
    # metadata service's link-local address stays refused even with the opt-in and on the allowlist.
    config = {"allowed_domains": ("localhost", "169.254.169.254"), "allow_private_addresses": True}
    err = refused(server.url("/redirect?to=http://169.254.169.254/latest/meta-data/", "localhost"), **config)
    assert "link-local" in str(err)
    assert server.requests == ["/redirect?to=http://169.254.169.254/latest/meta-data/"]


def test_a_redirect_to_a_host_off_the_allowlist_is_refused(server):
    to = server.url("/cat.png", "127.0.0.1")
    err = refused(server.url(f"/redirect?to={to}", "localhost"), allowed_domains=("localhost",),
                  allow_private_addresses=True)
    assert "not in --allowed-media-domains" in str(err) and len(server.requests) == 1


def test_redirects_are_followed_a_few_hops_at_most(server):
    assert fetch(server.url(f"/redirect?to={server.url('/cat.png', 'localhost')}", "localhost"),
                 allowed_domains=("localhost",), allow_private_addresses=True) == PNG
    err = refused(server.url("/loop/0", "localhost"), allowed_domains=("localhost",), allow_private_addresses=True,
                  max_redirects=3)
    assert "more than 3 redirects" in str(err)
    assert [p for p in server.requests if p.startswith("/loop/")] == ["/loop/0", "/loop/1", "/loop/2", "/loop/3"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_cap_is_refused_as_too_large(server, chunked):
    path = "/big?n=3000000" + ("&chunked=1" if chunked else "")
    err = refused(server.url(path, "localhost"), max_bytes=MiB, allowed_domains=("localhost",),
                  allow_private_addresses=True)
    assert err.too_large and str(MiB) in str(err)


def test_a_stalled_body_runs_into_the_time_cap(server):
    err = refused(server.url("/slow", "localhost"), allowed_domains=("localhost",), allow_private_addresses=True,
                  timeout_s=0.5)
    assert "longer than 0.5 s" in str(err)


@pytest.mark.parametrize("url", ["ftp://localhost/cat.png", "file:///etc/passwd", "gopher://localhost/x",
                                 "/relative/cat.png"])
def test_only_http_and_https(url):
    err = refused(url, allowed_domains=("localhost",), allow_private_addresses=True)
    assert "only http and https" in str(err)


def test_credentials_in_urls_are_refused(server):
    err = refused(f"http://user:pw@localhost:{server.port}/cat.png", allowed_domains=("localhost",),
                  allow_private_addresses=True)
    assert "credentials" in str(err)


@pytest.mark.parametrize(("address", "problem"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("100.64.0.1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"), ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "link-local"),
])
def test_internal_addresses_are_refused(address, problem):
    assert problem in address_problem(address, allow_private=False)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert address_problem(address, allow_private=False) is None


def test_the_opt_in_admits_private_and_loopback_but_never_link_local_or_multicast():
    assert address_problem("127.0.0.1", allow_private=True) is None
    assert address_problem("10.0.0.7", allow_private=True) is None
    assert "link-local" in address_problem("169.254.169.254", allow_private=True)
    assert "multicast" in address_problem("239.1.1.1", allow_private=True)


def test_subdomain_entries():
    config = MediaFetchConfig(allowed_domains=(".example.com", "img.test"))
    assert config.host_allowed("a.example.com") and config.host_allowed("example.com")
    assert config.host_allowed("IMG.test.") and not config.host_allowed("a.img.test")
    assert not config.host_allowed("badexample.com") and not config.host_allowed("example.com.evil.org")


def test_content_is_judged_by_decoding_not_by_headers():
    check_image(PNG, "image")
    with pytest.raises(MediaError, match="not an image"):
        check_image(b"<html>not a picture</html>", "image")
    with pytest.raises(MediaError, match="not an image"):
        check_image(PNG[: len(PNG) // 2], "image")


def test_data_uris():
    import base64

    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert decode_data_uri(uri, max_bytes=MiB, what="image") == PNG
    with pytest.raises(MediaError) as info:
        decode_data_uri(uri, max_bytes=100, what="image")
    assert info.value.too_large
    with pytest.raises(MediaError, match="base64"):
        decode_data_uri("data:image/png;base64,@@@", max_bytes=MiB, what="image")
    with pytest.raises(MediaError, match="data URI"):
        decode_data_uri("data:image/png,rawbytes", max_bytes=MiB, what="image")
