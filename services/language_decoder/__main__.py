"""`python -m services.language_decoder --model DIR|HUB_ID [--port 50053] ...` (see `--help`).

The port opens at once with health NOT_SERVING; it turns SERVING once the model and its KV cache
are ready. SIGTERM drains in-flight generations for `--grace-seconds`, then cancels the rest (their
sequences are aborted and their KV blocks freed) and exits 0. Prometheus metrics (`ivl_decoder_*`,
RPCs) are on `--metrics-port` (default 9103).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from internvl.v1 import decoder_pb2_grpc
from services.common.checkpoint import CheckpointError
from services.common.engine_health import EngineHealthCollector
from services.common.fit import ModelDoesNotFit
from services.common.logging import configure_logging
from services.common.metrics import DecoderCollector
from services.common.security import SecurityConfigError
from services.common.server import GrpcServer, Service, run_process, serve_until_signal
from services.language_decoder.config import DecoderConfig
from services.language_decoder.servicer import SERVICE_NAME, DecoderRuntime, LanguageDecoderServicer
from services.language_decoder.transfer_stats import TransferCollector

log = logging.getLogger("services.language_decoder")


async def serve(config: DecoderConfig) -> None:
    servicer = LanguageDecoderServicer(config)
    server = GrpcServer(
        config.server_config(),
        [Service(SERVICE_NAME, decoder_pb2_grpc.add_LanguageDecoderServicer_to_server, servicer)],
        collectors=[DecoderCollector(lambda: servicer.runtime.engine if servicer.runtime else None),
                    EngineHealthCollector(lambda: servicer.runtime.health if servicer.runtime else None),
                    TransferCollector(servicer.transfer)],
    )

    async def load() -> None:
        servicer.attach(await asyncio.to_thread(DecoderRuntime.load, config))

    try:
        await serve_until_signal(server, load=load,
                                 watch=lambda: servicer.runtime.health.watch(server.set_serving, servicer.probe))
    except BaseException:
        await server.stop(now=True)
        raise
    finally:
        servicer.close()


def main(argv: Sequence[str] | None = None) -> int:
    config = DecoderConfig.from_args(argv)
    configure_logging(config.log_level, config.log_format)
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    log.info("starting language decoder: %s", config)
    return run_process("language decoder", serve(config), (CheckpointError, SecurityConfigError, ModelDoesNotFit))


if __name__ == "__main__":
    sys.exit(main())
