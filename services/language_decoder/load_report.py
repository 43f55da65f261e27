"""The decoder's load as the gateways route by it (GetLoad): read from the engine's own state.

Only lengths and integers are read (atomic under the GIL), as the Prometheus collector does, so the
call never waits for the engine thread.
"""

from __future__ import annotations

from internvl.v1 import decoder_pb2
from services.language_decoder.engine import AsyncEngine


def load_report(async_engine: AsyncEngine, engine_healthy: bool) -> decoder_pb2.DecoderLoad:
    engine = async_engine.engine
    scheduler, blocks = engine.scheduler, engine.block_manager
    return decoder_pb2.DecoderLoad(
        running_sequences=len(scheduler.running),
        waiting_sequences=len(scheduler.waiting),
        kv_blocks_used=blocks.num_blocks - blocks.num_free_blocks,
        kv_blocks_total=blocks.num_blocks,
        max_num_seqs=engine.config.max_num_seqs,
        max_queue_size=engine.config.max_queue_size,
        engine_healthy=engine_healthy,
    )
