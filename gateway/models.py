"""The models one gateway fronts, by served name: each a turn core over its own encoder and decoders.

All cores share the feature cache and the session store (a session is the tenant's, whichever model
answers its turns). Feature-cache keys carry the encoder's vision identity (ChatCore._image_key), so
models whose encoders compute the same features share them and no others do. The gRPC `model` field
and the OpenAI `model` pick one; an empty gRPC `model` is the default (the first); an unknown name
is NOT_FOUND (OpenAI: 404 `model_not_found`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.core import ChatCore, ChatError, ErrorKind
from services.common.security import redact_addresses

log = logging.getLogger(__name__)

FALLBACK_NAME = "internvl2"  # a decoder too old to report its checkpoint name
NAME_TIMEOUT_S = 5.0


@dataclass
class ServedModel:
    name: str  # "" = its decoder's checkpoint name, learned on first use
    core: ChatCore


class ServedModels:
    def __init__(self, models: Sequence[ServedModel]):
        if not models:
            raise ValueError("a gateway serves at least one model")
        self._models = list(models)

    @property
    def default(self) -> ChatCore:
        return self._models[0].core

    @property
    def cores(self) -> list[ChatCore]:
        return [m.core for m in self._models]

    async def names(self) -> list[str]:
        return [await self._name(m) for m in self._models]

    async def find(self, name: str) -> tuple[str, ChatCore] | None:
        """(served name, its core) for `name`, or None when no model has it."""
        if not name:  # a name only: the default is what an empty gRPC `model` means (core_for)
            return None
        for model in self._models:
            if model.name == name:
                return name, model.core
        for model in self._models:
            if not model.name and await self._name(model) == name:
                return name, model.core
        return None

    async def core_for(self, name: str) -> ChatCore:
        """The core of model `name` ("" = the default); ChatError(NOT_FOUND) naming what exists."""
        if not name:
            return self.default
        found = await self.find(name)
        if found is None:
            raise ChatError(ErrorKind.NOT_FOUND, await self.unknown_message(name), param="model")
        return found[1]

    async def unknown_message(self, name: str) -> str:
        served = ", ".join(repr(n) for n in await self.names())
        return f"the model {name!r} does not exist; this server serves {served}"

    async def _name(self, model: ServedModel) -> str:
        if not model.name:
            try:
                info = await model.core.decoder.model_info(timeout=NAME_TIMEOUT_S)
            except Exception as exc:
                log.warning("language decoder: cannot learn the model name: %s", exc)
                raise ChatError(ErrorKind.UNAVAILABLE, "language decoder: cannot learn the model name: "
                                f"{redact_addresses(str(exc))}") from exc
            model.name = info.model_name or FALLBACK_NAME
        return model.name
