"""`python -m services.vision_encoder --model DIR|HUB_ID [--port 50052] ...` (see `--help`).

The port opens at once with health NOT_SERVING, so orchestrators see a live process during the
(possibly minutes-long) model load; health turns SERVING when the model is ready. SIGTERM drains
in-flight calls for `--grace-seconds`, then exits 0. Prometheus metrics (`ivl_encoder_*`, RPCs) are
on `--metrics-port` (default 9102).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from internvl.v1 import vision_pb2_grpc
from services.common.checkpoint import CheckpointError
from services.common.engine_health import EngineHealthCollector
from services.common.fit import ModelDoesNotFit
from services.common.logging import configure_logging
from services.common.metrics import EncoderCollector
from services.common.security import SecurityConfigError
from services.common.server import GrpcServer, Service, run_process, serve_until_signal
from services.vision_encoder.config import EncoderConfig
from services.vision_encoder.servicer import SERVICE_NAME, ModelRuntime, VisionEncoderServicer

log = logging.getLogger("services.vision_encoder")


async def serve(config: EncoderConfig) -> None:
    servicer = VisionEncoderServicer(config)
    server = GrpcServer(
        config.server_config(),
        [Service(SERVICE_NAME, vision_pb2_grpc.add_VisionEncoderServicer_to_server, servicer)],
        collectors=[EncoderCollector(lambda: servicer.batcher),
                    EngineHealthCollector(lambda: servicer.runtime.health if servicer.runtime else None)],
    )

    async def load() -> None:
        # A worker thread: the event loop keeps answering health checks (NOT_SERVING) meanwhile.
        servicer.attach(await asyncio.to_thread(ModelRuntime.load, config))

    try:
        await serve_until_signal(server, load=load,
                                 watch=lambda: servicer.runtime.health.watch(server.set_serving, servicer.probe))
    except BaseException:
        await server.stop(now=True)  # e.g. the model failed to load: release the port
        raise
    finally:
        await servicer.close()
        stats = servicer.batcher.stats if servicer.batcher else None
        if stats:
            log.info(
                "served %d tiles in %d batches (mean %.1f tiles)",
                stats.tiles,
                stats.batches,
                stats.mean_batch_tiles,
            )


def main(argv: Sequence[str] | None = None) -> int:
    config = EncoderConfig.from_args(argv)
    configure_logging(config.log_level, config.log_format)
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    log.info("starting vision encoder: %s", config)
    return run_process("vision encoder", serve(config), (CheckpointError, SecurityConfigError, ModelDoesNotFit))


if __name__ == "__main__":
    sys.exit(main())
