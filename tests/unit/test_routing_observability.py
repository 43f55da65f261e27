"""What routing reads and shows: the decoder's GetLoad reply, and the gateway's routing metrics."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from gateway.decoder_pool import DecoderPool
from gateway.router import Outcome, affinity_key
from gateway.routing_metrics import RoutingCollector
from internvl.v1 import decoder_pb2
from services.language_decoder.engine.block_manager import BlockManager
from services.language_decoder.load_report import load_report


def test_load_report_reads_the_engines_own_state():
    blocks = BlockManager(num_blocks=8, block_size=16)
    held = SimpleNamespace(block_table=[], num_tokens=40, num_hashed_blocks=0)
    blocks.append_slots(held)  # 3 blocks
    engine = SimpleNamespace(scheduler=SimpleNamespace(running=[held], waiting=[object(), object()]),
                             block_manager=blocks, config=SimpleNamespace(max_num_seqs=4, max_queue_size=256))
    report = load_report(SimpleNamespace(engine=engine), engine_healthy=True)
    assert report == decoder_pb2.DecoderLoad(running_sequences=1, waiting_sequences=2, kv_blocks_used=3,
                                             kv_blocks_total=8, max_num_seqs=4, max_queue_size=256,
                                             engine_healthy=True)


def test_routing_metrics_show_decisions_and_each_replicas_load():
    async def main() -> None:
        pool = DecoderPool("127.0.0.1:9,127.0.0.2:9")  # never started: no polls, state set by hand
        try:
            a, b = pool.replicas.values()
            a.report = decoder_pb2.DecoderLoad(running_sequences=2, waiting_sequences=1, kv_blocks_used=25,
                                               kv_blocks_total=100, max_num_seqs=4)
            b.healthy = False
            for i in range(3):
                pool.route(affinity_key("scope", session_id=str(i)))
            reg = CollectorRegistry()
            reg.register(RoutingCollector(lambda: [("small", pool)]))
            check(reg)
        finally:
            await pool.close()

    def check(reg: CollectorRegistry) -> None:
        a, b = {"model": "small", "replica": "127.0.0.1:9"}, {"model": "small", "replica": "127.0.0.2:9"}
        decisions = {o: reg.get_sample_value("ivl_gateway_routing_decisions_total",
                                             {"model": "small", "outcome": o.value}) for o in Outcome}
        # b is down, a is free: every turn lands on a, by affinity or failover.
        assert decisions[Outcome.AFFINITY] + decisions[Outcome.FAILOVER] == 3
        assert reg.get_sample_value("ivl_gateway_decoder_replica_healthy", a) == 1
        assert reg.get_sample_value("ivl_gateway_decoder_replica_healthy", b) == 0
        assert reg.get_sample_value("ivl_gateway_decoder_replica_running_sequences", a) == 2
        assert reg.get_sample_value("ivl_gateway_decoder_replica_waiting_sequences", a) == 1
        assert reg.get_sample_value("ivl_gateway_decoder_replica_kv_cache_usage_ratio", a) == 0.25
        assert reg.get_sample_value("ivl_gateway_decoder_replica_running_sequences", b) is None  # never reported

    asyncio.run(main())
