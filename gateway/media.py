"""Media for the HTTP API: `data:` URIs, and http(s) URLs fetched without server-side request forgery.

vLLM shipped an SSRF in exactly this feature (CVE-2025-6242: redirects were re-checked only later).
Here, fetching is off unless `--allowed-media-domains` lists hosts (fail closed), and for each hop:
- only http and https, to a host on the list (`example.com`, or `.example.com` for its subdomains);
- every address the name resolves to must be public: loopback, private, link-local (169.254.169.254,
  the cloud metadata service, included), unique-local, multicast, unspecified and reserved addresses
  are refused. `--allow-private-media-addresses` (off by default) admits private and loopback
  addresses for an internal image store; link-local, multicast and unspecified stay refused;
- the connection goes to the address that was checked (the URL's host stays in the Host header and
  in TLS's SNI and certificate check), so a second DNS answer cannot swap in another address;
- redirects are followed by hand, each target checked like the first URL, a few hops at most;
- the body is streamed under a byte cap and the whole fetch under a time cap; no proxy from the
  environment is used (it would connect to the name, not to the checked address).
What the bytes are is judged by decoding them (Pillow for images; the encoder for videos), never by
the Content-Type header.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
from PIL import Image, UnidentifiedImageError

_DEFAULT_PORTS = {"http": 80, "https": 443}


class MediaError(ValueError):
    """A media reference the gateway will not use; the message says why. `too_large` maps to 413."""

    def __init__(self, message: str, *, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class MediaFetchConfig:
    allowed_domains: tuple[str, ...] = ()  # empty: URL fetching is off
    allow_private_addresses: bool = False
    timeout_s: float = 10.0  # the whole fetch, redirects included
    max_redirects: int = 3

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_domains)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for entry in self.allowed_domains:
            entry = entry.lower().rstrip(".")
            if entry.startswith(".") and (host == entry[1:] or host.endswith(entry)):
                return True
            if host == entry:
                return True
        return False


def parse_domains(value: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in value.split(",") if d.strip())


def address_problem(address: str, *, allow_private: bool) -> str | None:
    """Why the gateway must not connect to this IP address (None: it may)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address (e.g. the cloud metadata service)"
    if ip.is_global:
        return None
    if allow_private and (ip.is_private or ip.is_loopback):
        return None
    if ip.is_loopback:
        return "a loopback address"
    return "a private or reserved address"


def decode_data_uri(uri: str, *, max_bytes: int, what: str) -> bytes:
    """The bytes of a `data:<type>;base64,<data>` URI (the type is not trusted; decoding judges)."""
    header, comma, payload = uri.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        raise MediaError(f"{what}: a data URI must look like data:<type>;base64,<data>")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise MediaError(f"{what} is larger than {max_bytes} bytes", too_large=True)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"{what}: the data URI is not valid base64") from exc
    if len(data) > max_bytes:
        raise MediaError(f"{what} is {len(data)} bytes; the limit is {max_bytes}", too_large=True)
    return data


def check_image(data: bytes, what: str) -> None:
    """Refuse bytes that Pillow cannot identify and verify as an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{what} is not an image the server can decode: {exc}") from exc


class MediaFetcher:
    """Fetches http(s) media under the rules above. One per process; `close()` at shutdown."""

    def __init__(self, config: MediaFetchConfig):
        self.config = config
        # trust_env=False: an HTTP(S)_PROXY from the environment would connect to the name, not the checked
        # address. follow_redirects=False: every hop is checked here.
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                         timeout=httpx.Timeout(config.timeout_s))

    async def close(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, *, max_bytes: int, what: str) -> bytes:
        if not self.config.enabled:
            raise MediaError(f"{what}: this server does not fetch URLs (no --allowed-media-domains); "
                             "send the bytes as a data: URI")
        try:
            return await asyncio.wait_for(self._fetch(url, max_bytes, what), self.config.timeout_s)
        except asyncio.TimeoutError as exc:
            raise MediaError(f"{what}: fetching {_shown(url)} took longer than {self.config.timeout_s:g} s") from exc

    async def _fetch(self, url: str, max_bytes: int, what: str) -> bytes:
        for _hop in range(self.config.max_redirects + 1):
            response = await self._get(url, what)
            try:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    if not location:
                        raise MediaError(f"{what}: {_shown(url)} redirects nowhere")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise MediaError(f"{what}: {_shown(url)} answered HTTP {response.status_code}")
                return await _read_capped(response, max_bytes, what)
            finally:
                await response.aclose()
        raise MediaError(f"{what}: more than {self.config.max_redirects} redirects")

    async def _get(self, url: str, what: str) -> httpx.Response:
        """The response headers from the first checked address that accepts a connection."""
        targets, headers, sni = await self._checked_targets(url, what)
        failure: Exception | None = None
        for target in targets:  # every one was checked: trying the next is as safe as the first
            request = self._client.build_request("GET", target, headers=headers,
                                                 extensions={"sni_hostname": sni} if sni else {})
            try:
                return await self._client.send(request, stream=True)
            except httpx.ConnectError as exc:
                failure = exc
            except httpx.HTTPError as exc:
                raise MediaError(f"{what}: could not fetch {_shown(url)}: {type(exc).__name__}") from exc
        raise MediaError(f"{what}: could not connect to {_shown(url)}: {failure}")

    async def _checked_targets(self, url: str, what: str) -> tuple[list[str], dict[str, str], str]:
        """The URL rewritten to each checked IP address, its Host header, and the TLS server name."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise MediaError(f"{what}: only http and https URLs are fetched, not {scheme or 'a relative URL'!r}")
        host = parts.hostname
        if not host:
            raise MediaError(f"{what}: the URL has no host")
        if parts.username or parts.password:
            raise MediaError(f"{what}: URLs with credentials are not fetched")
        if not self.config.host_allowed(host):
            raise MediaError(f"{what}: host {host!r} is not in --allowed-media-domains")
        try:
            port = parts.port or _DEFAULT_PORTS[scheme]
        except ValueError as exc:
            raise MediaError(f"{what}: bad port in the URL") from exc
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise MediaError(f"{what}: cannot resolve {host!r}") from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not addresses:
            raise MediaError(f"{what}: {host!r} resolves to no address")
        for address in addresses:  # every one: a name must not mix a public and an internal address
            problem = address_problem(address, allow_private=self.config.allow_private_addresses)
            if problem:
                raise MediaError(f"{what}: {host!r} resolves to {problem}; refused")
        targets = [urlunsplit((scheme, f"[{a}]:{port}" if ":" in a else f"{a}:{port}", parts.path or "/",
                               parts.query, "")) for a in addresses]
        default_port = port == _DEFAULT_PORTS[scheme]
        host_header = host if default_port else f"{host}:{port}"
        return targets, {"host": host_header, "accept-encoding": "identity"}, host if scheme == "https" else ""


async def _read_capped(response: httpx.Response, max_bytes: int, what: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise MediaError(f"{what} is {declared} bytes; the limit is {max_bytes}", too_large=True)
    body = bytearray()
    async for chunk in response.aiter_bytes():  # decoded: a compressed body is capped by what it expands to
        body += chunk
        if len(body) > max_bytes:
            raise MediaError(f"{what} is larger than {max_bytes} bytes", too_large=True)
    return bytes(body)


def _shown(url: str) -> str:
    """The URL for an error message: no query string (it may hold a token)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
