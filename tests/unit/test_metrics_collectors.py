"""The service collectors read the counters the services already keep, at scrape time."""

from __future__ import annotations

import collections
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from gateway.feature_cache import CacheStats
from services.common.metrics import DecoderCollector, EncoderCollector, FeatureCacheCollector
from services.language_decoder.engine.block_manager import BlockManager
from services.language_decoder.engine.engine import EngineStats
from services.vision_encoder.batcher import BatcherStats


def _registry(collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_nothing_is_reported_before_the_model_is_loaded() -> None:
    for collector in (EncoderCollector(lambda: None), DecoderCollector(lambda: None),
                      FeatureCacheCollector(lambda: None)):
        assert generate_latest(_registry(collector)).strip() == b""


def test_encoder_queue_and_batch_sizes() -> None:
    stats = BatcherStats(batches=4, tiles=1 + 3 + 3 + 32, rejected=2, failed_batches=1,
                         batch_sizes=collections.Counter({1: 1, 3: 2, 32: 1}))
    batcher = SimpleNamespace(stats=stats, queued_tiles=17, max_queued_tiles=256)
    reg = _registry(EncoderCollector(lambda: batcher))
    assert reg.get_sample_value("ivl_encoder_queued_tiles") == 17
    assert reg.get_sample_value("ivl_encoder_batch_tiles_bucket", {"le": "1"}) == 1
    assert reg.get_sample_value("ivl_encoder_batch_tiles_bucket", {"le": "2"}) == 1
    assert reg.get_sample_value("ivl_encoder_batch_tiles_bucket", {"le": "4"}) == 3
    assert reg.get_sample_value("ivl_encoder_batch_tiles_bucket", {"le": "16"}) == 3
    assert reg.get_sample_value("ivl_encoder_batch_tiles_bucket", {"le": "32"}) == 4
    assert reg.get_sample_value("ivl_encoder_batch_tiles_bucket", {"le": "+Inf"}) == 4
    assert reg.get_sample_value("ivl_encoder_batch_tiles_count") == 4
    assert reg.get_sample_value("ivl_encoder_batch_tiles_sum") == 39
    assert reg.get_sample_value("ivl_encoder_tiles_total") == 39
    assert reg.get_sample_value("ivl_encoder_rejected_total") == 2
    assert reg.get_sample_value("ivl_encoder_failed_batches_total") == 1


def test_decoder_sequences_kv_cache_and_tokens() -> None:
    blocks = BlockManager(num_blocks=8, block_size=16)
    held = SimpleNamespace(block_table=[], num_tokens=40, num_hashed_blocks=0)
    blocks.append_slots(held)  # 3 blocks
    scheduler = SimpleNamespace(running=[held], waiting=[object(), object()])
    stats = EngineStats(steps=5, prompt_tokens_computed=40, cached_prompt_tokens=16, generated_tokens=12)
    engine = SimpleNamespace(scheduler=scheduler, block_manager=blocks, stats=stats,
                             config=SimpleNamespace(max_queue_size=256))
    reg = _registry(DecoderCollector(lambda: SimpleNamespace(engine=engine)))
    assert reg.get_sample_value("ivl_decoder_active_sequences") == 1
    assert reg.get_sample_value("ivl_decoder_waiting_sequences") == 2
    assert reg.get_sample_value("ivl_decoder_kv_cache_blocks") == 8
    assert reg.get_sample_value("ivl_decoder_kv_cache_used_blocks") == 3
    assert reg.get_sample_value("ivl_decoder_kv_cache_usage_ratio") == 3 / 8
    assert reg.get_sample_value("ivl_decoder_generated_tokens_total") == 12
    assert reg.get_sample_value("ivl_decoder_prompt_tokens_total") == 40
    assert reg.get_sample_value("ivl_decoder_cached_prompt_tokens_total") == 16
    blocks.free(held)
    assert reg.get_sample_value("ivl_decoder_kv_cache_usage_ratio") == 0


def test_feature_cache_counters() -> None:
    stats = CacheStats(hits=7, misses=3, errors=1, corrupt=1, bytes_read=700, bytes_written=300)
    reg = _registry(FeatureCacheCollector(lambda: SimpleNamespace(stats=stats)))
    assert reg.get_sample_value("ivl_gateway_feature_cache_hits_total") == 7
    assert reg.get_sample_value("ivl_gateway_feature_cache_misses_total") == 3
    assert reg.get_sample_value("ivl_gateway_feature_cache_errors_total") == 1
    assert reg.get_sample_value("ivl_gateway_feature_cache_corrupt_total") == 1
    assert reg.get_sample_value("ivl_gateway_feature_cache_read_bytes_total") == 700
    assert reg.get_sample_value("ivl_gateway_feature_cache_written_bytes_total") == 300
    stats.hits += 1  # read live, not copied at registration
    assert reg.get_sample_value("ivl_gateway_feature_cache_hits_total") == 8
