"""The decoder pool's replica discovery: a dns:/// target becomes one replica per address, re-resolved."""

from __future__ import annotations

import asyncio
import socket

from gateway.decoder_pool import DecoderPool, PoolConfig
from gateway.router import affinity_key


def test_a_dns_target_becomes_one_replica_per_address():
    async def main() -> tuple[set[str], str]:
        # A port nothing listens on: channels connect lazily, and polls only mark replicas down.
        pool = DecoderPool("dns:///localhost:9", PoolConfig(load_interval_s=60, resolve_interval_s=60))
        await pool.start()
        try:
            addresses = set(pool.replicas)
            return addresses, pool.route(affinity_key("scope", session_id="s")).decision.address
        finally:
            await pool.close()

    addresses, chosen = asyncio.run(main())
    expected = {f"ipv4:{a[4][0]}:9" if a[0] == socket.AF_INET else f"ipv6:[{a[4][0]}]:9"
                for a in socket.getaddrinfo("localhost", 9, type=socket.SOCK_STREAM)}
    assert addresses == expected and "ipv4:127.0.0.1:9" in addresses
    assert chosen in addresses


def test_a_static_list_is_one_replica_per_entry_and_one_target_one_replica():
    async def main() -> tuple[list[str], list[str]]:
        many, one = DecoderPool("127.0.0.1:9,127.0.0.2:9"), DecoderPool("localhost:9")
        try:
            return list(many.replicas), list(one.replicas)
        finally:
            await many.close()
            await one.close()

    many, one = asyncio.run(main())
    assert many == ["127.0.0.1:9", "127.0.0.2:9"]
    assert one == ["localhost:9"]  # gRPC resolves a plain name itself, as without routing
