"""`python -m services.vision_encoder --model DIR|HUB_ID [--port 50052] ...` (see `--help`).

The port opens at once with health NOT_SERVING, so orchestrators see a live process during the
(possibly minutes-long) model load; health turns SERVING when the model is ready. SIGTERM drains
in-flight calls for `--grace-seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from internvl.v1 import vision_pb2_grpc
from services.common.checkpoint import CheckpointError
from services.common.server import GrpcServer, Service, serve_until_signal
from services.vision_encoder.config import EncoderConfig
from services.vision_encoder.servicer import SERVICE_NAME, ModelRuntime, VisionEncoderServicer

log = logging.getLogger("services.vision_encoder")


async def serve(config: EncoderConfig) -> None:
    servicer = VisionEncoderServicer(config)
    server = GrpcServer(
        config.server_config(),
        [Service(SERVICE_NAME, vision_pb2_grpc.add_VisionEncoderServicer_to_server, servicer)],
    )

    async def load() -> None:
        # A worker thread: the event loop keeps answering health checks (NOT_SERVING) meanwhile.
        servicer.attach(await asyncio.to_thread(ModelRuntime.load, config))

    try:
        await serve_until_signal(server, load=load)
    except BaseException:
        await server.server.stop(grace=None)  # e.g. the model failed to load: release the port
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
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    log.info("starting vision encoder: %s", config)
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    except CheckpointError as exc:  # an operator error: the message says it all
        log.error("cannot load the model: %s", exc)
        return 2
    except Exception:
        log.exception("vision encoder stopped on an error")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
