"""The language decoder's gRPC servicer: a conversation with image embeddings in, text deltas out.

The first request message carries the conversation and settings; each image's embeddings follow as
raw chunks. The prompt is built exactly as upstream `chat()` builds it (template, `<image>`
expansion), tokenized, and handed to the engine; the engine's text deltas are streamed back as
upstream's response text (`decode(...).split(template.sep)[0].strip()`). The checkpoint's config names
the template (`internlm2-chat`, `Hermes-2`, `phi3-chat`); its tokenizer files say which tokenizer.

With `lazy_images` in the setup the decoder first answers NeedImages: the images whose KV its
prefix cache does not hold for this prompt (the held ones' blocks are pinned until the request
finishes), and reads only those images' bytes (decoder.proto, Generate).

Status codes: a request the caller must fix (malformed stream, bad shapes, a prompt beyond the
context, sampling values out of range) is INVALID_ARGUMENT with a message naming what to change,
checked before any embedding bytes are buffered; a full queue is RESOURCE_EXHAUSTED with a
`retry-after-ms` hint in the trailing metadata; anything unexpected is logged and INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import torch

from internvl.v1 import decoder_pb2, decoder_pb2_grpc
from services.common.checkpoint import parse_dtype, resolve_model_dir
from services.common.device_memory import device_memory
from services.common.engine_health import EngineHealth
from services.common.fingerprint import model_fingerprint
from services.common.fit import DeviceMemory
from services.common.limits import MAX_CACHE_SALT_CHARS, proto_sampling_problem
from services.common.model_config import InternVLConfig
from services.common.model_identity import family_member_of_dir, model_name
from services.common.quantization import INT8, NO_QUANTIZATION
from services.common.server import MiB
from services.common.tensors import TORCH_TO_WIRE, WIRE_TO_TORCH, tensor_from_wire
from services.common.wire import DTYPE_NAMES, Reassembler, WireError
from services.language_decoder.config import DecoderConfig
from services.language_decoder.engine import (
    AsyncEngine,
    EngineClosed,
    EngineConfig,
    EngineRequest,
    LLMEngine,
    PromptTooLong,
    QueueFull,
    RequestFailed,
    SamplingParams,
    find_image_spans,
)
from services.language_decoder.fit_check import check_decoder_fits
from services.language_decoder.load_report import load_report
from services.language_decoder.model import load_language_model
from services.language_decoder.prompt import (
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    expand_image_placeholders,
    get_template,
    render_conversation,
)
from services.language_decoder.quantize import weight_bytes
from services.language_decoder.tokenizer_loader import Tokenizer, load_tokenizer, stop_token_id
from services.language_decoder.transfer_stats import TransferStats

log = logging.getLogger(__name__)

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["LanguageDecoder"].full_name
WEIGHT_QUANTIZATIONS = {
    NO_QUANTIZATION: decoder_pb2.WEIGHT_QUANTIZATION_NONE, INT8: decoder_pb2.WEIGHT_QUANTIZATION_INT8,
}
FINISH_REASONS = {"stop": decoder_pb2.FINISH_REASON_STOP, "length": decoder_pb2.FINISH_REASON_LENGTH}
# A client may retry this soon: the queue drains at decode speed.
RETRY_AFTER_MS = "1000"


class BadRequest(ValueError):
    """INVALID_ARGUMENT with this message."""


@dataclass(frozen=True)
class _Setup:
    """A checked setup: the prompt's ids and image spans, before any embedding bytes."""

    setup: decoder_pb2.GenerateSetup
    sampling: SamplingParams
    images: list[decoder_pb2.ImageDescriptor]
    ids: list[int]
    spans: list[tuple[int, int]]

    @property
    def image_hashes(self) -> list[str]:
        # Without hashes from the caller the engine hashes the embedding bytes itself.
        return [d.feature_key for d in self.images] if all(d.feature_key for d in self.images) else []


@dataclass(frozen=True)
class DecoderRuntime:
    """Everything loaded once at start."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    model_config: InternVLConfig
    dtype: torch.dtype
    fingerprint: str
    max_model_len: int
    health: EngineHealth  # counts failed engine steps (services/common/engine_health.py)
    quantize: str  # the decoder blocks' weights: "none" or "int8"
    weight_bytes: int
    kv_cache_bytes: int
    family_member: str

    @property
    def template(self) -> ChatTemplate:
        return get_template(self.model_config.template)

    @classmethod
    def load(cls, config: DecoderConfig, memory: DeviceMemory | None = None) -> DecoderRuntime:
        """Blocking: run it in a worker thread while health is NOT_SERVING.

        Refuses (`ModelDoesNotFit`) before reading any weight when the model cannot fit the device;
        `memory` stands for the device's (default: measured, services/common/device_memory.py).
        """
        device = config.resolved_device()
        dtype = parse_dtype(config.dtype, device)
        root = resolve_model_dir(config.model)
        started = time.monotonic()
        memory = memory or device_memory(device, config.gpu_memory_utilization)
        check_decoder_fits(config, InternVLConfig.from_dir(root), device, dtype, memory)
        model = load_language_model(root, device=device, dtype=dtype, quantize=config.quantize)
        held = weight_bytes(model)
        tokenizer = load_tokenizer(root)
        model_config = InternVLConfig.from_dir(root)
        # An unknown template, or a separator that is no token, fails the start rather than each request.
        stop_token_id(tokenizer, get_template(model_config.template))
        engine_config = EngineConfig(
            block_size=config.block_size,
            num_kv_blocks=config.num_kv_blocks or None,
            cpu_kv_cache_bytes=config.cpu_kv_cache_mib << 20,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            max_queue_size=config.max_queue_size,
            device=device,
            compile_layers=config.resolved_compile_layers(device),
            compile_mode=config.compile_mode,
            use_cuda_graphs=not config.no_cuda_graphs,
            cpu_prepacked_weights=not config.no_cpu_prepacked_weights,
            quantize=config.quantize,
        )
        llm_engine = LLMEngine(model, engine_config, tokenizer=tokenizer)
        kv = llm_engine.runner.kv_cache
        weights = "int8 decoder blocks, embedding and head in " if config.quantize == INT8 else ""
        log.info("language model weights: %.1f MiB (%s%s); KV cache: %.1f MiB (%d blocks of %d tokens)",
                 held / MiB, weights, DTYPE_NAMES[TORCH_TO_WIRE[dtype]], kv.nbytes / MiB, kv.num_blocks,
                 kv.block_size)
        if config.resolved_warmup(device):
            warm_start = time.monotonic()
            try:
                llm_engine.warm_up()
            except RuntimeError as exc:
                hint = " (if torch.compile cannot run here, start with --compile-layers off)"
                raise RuntimeError(f"{exc}{hint if engine_config.compile_layers else ''}") from exc
            log.info("warm-up (compilation, CUDA graphs) took %.1fs", time.monotonic() - warm_start)
        health = EngineHealth(config.engine_health_config(), "decoder engine step")
        health.fault.install_on_module(model.embedding)  # test-only switch; every step embeds
        engine = AsyncEngine(llm_engine, on_step=health.record)
        fingerprint = model_fingerprint(root, DTYPE_NAMES[TORCH_TO_WIRE[dtype]], config.quantize)
        log.info("loaded language model from %s on %s in %s (fingerprint %s) in %.1fs",
                 root, device, DTYPE_NAMES[TORCH_TO_WIRE[dtype]], fingerprint, time.monotonic() - started)
        return cls(engine, tokenizer, model_config, dtype, fingerprint, config.max_model_len, health,
                   config.quantize, held, kv.nbytes, family_member_of_dir(root))


class ResponseText:
    """Streams upstream's `.strip()` of the response: no leading whitespace, trailing held back."""

    def __init__(self) -> None:
        self._started = False
        self._pending = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._pending + text
        kept = text.rstrip()
        self._pending = text[len(kept):]
        return kept


class LanguageDecoderServicer(decoder_pb2_grpc.LanguageDecoderServicer):
    def __init__(self, config: DecoderConfig):
        self.config = config
        self.runtime: DecoderRuntime | None = None
        self.transfer = TransferStats()  # embedding bytes received and skipped (metrics)

    def attach(self, runtime: DecoderRuntime) -> None:
        self.runtime = runtime

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.engine.close()

    async def probe(self) -> None:
        """One throwaway one-token generation through the engine (the engine-health probe)."""
        rt = self.runtime
        assert rt is not None, "probed before the model was loaded"
        request = EngineRequest(f"__health-probe-{uuid.uuid4().hex}", rt.tokenizer.encode("health probe"),
                                SamplingParams(max_new_tokens=1))
        async for _ in rt.engine.generate(request):
            pass

    async def GetModelInfo(self, request, context) -> decoder_pb2.DecoderInfo:
        rt = await self._runtime(context)
        return decoder_pb2.DecoderInfo(
            fingerprint=rt.fingerprint,
            hidden_size=rt.model_config.llm.hidden_size,
            tokens_per_tile=rt.model_config.num_image_token,
            max_context=rt.max_model_len,
            dtype=TORCH_TO_WIRE[rt.dtype],
            model_name=model_name(self.config.model),
            family_member=rt.family_member,
            weight_quantization=WEIGHT_QUANTIZATIONS[rt.quantize],
            weight_bytes=rt.weight_bytes,
            kv_cache_bytes=rt.kv_cache_bytes,
            lazy_images=True,
        )

    async def GetLoad(self, request, context) -> decoder_pb2.DecoderLoad:
        rt = await self._runtime(context)
        return load_report(rt.engine, rt.health.healthy)

    async def Generate(self, request_iterator, context) -> AsyncIterator[decoder_pb2.GenerateResponse]:
        rt = await self._runtime(context)
        failure = None
        try:
            prepared = await self._read_setup(rt, request_iterator)
        except BadRequest as exc:
            failure = (grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            log.exception("reading a Generate request failed")
            failure = (grpc.StatusCode.INTERNAL, "the decoder failed to read this request; see its logs")
        if failure is not None:  # outside the except blocks: context.abort raises
            await context.abort(*failure)
        hold = None
        try:
            needed = list(range(len(prepared.images)))
            if prepared.setup.lazy_images:
                self.transfer.lazy_requests += 1
                hold = await self._hold_images(rt, prepared)
                needed = [i for i in needed if i not in hold.held_images]
                yield decoder_pb2.GenerateResponse(need_images=decoder_pb2.NeedImages(
                    indices=needed, held_bytes=self.transfer.held(prepared.images, hold.held_images)))
            try:
                request = await self._read_request(rt, prepared, request_iterator, needed, hold)
            except BadRequest as exc:
                failure = (grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception:
                log.exception("reading a Generate request failed")
                failure = (grpc.StatusCode.INTERNAL, "the decoder failed to read this request; see its logs")
            if failure is not None:
                await context.abort(*failure)
            async for response in self._generate(rt, request, context):
                yield response
        finally:
            if hold is not None:
                rt.engine.release_hold(hold)  # a no-op once the engine's sequence took it over

    async def _generate(self, rt: DecoderRuntime, request: EngineRequest,
                        context) -> AsyncIterator[decoder_pb2.GenerateResponse]:
        text = ResponseText()
        try:
            async for out in rt.engine.generate(request):
                delta = text.push(out.text)
                if out.finished:
                    if out.finish_reason not in FINISH_REASONS:
                        await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {out.error}")
                    usage = out.usage
                    yield decoder_pb2.GenerateResponse(
                        text=delta,
                        token_ids=out.token_ids,
                        finish_reason=FINISH_REASONS[out.finish_reason],
                        usage=decoder_pb2.Usage(
                            prompt_tokens=usage.prompt_tokens,
                            completion_tokens=usage.completion_tokens,
                            cached_prompt_tokens=usage.cached_prompt_tokens,
                        ),
                    )
                    return
                if delta or out.token_ids:
                    yield decoder_pb2.GenerateResponse(text=delta, token_ids=out.token_ids)
        except PromptTooLong as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFull as exc:
            # A hint for clients: retrying soon is fine, the queue drains at decode speed.
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decoder overloaded: {exc}",
                                trailing_metadata=(("retry-after-ms", RETRY_AFTER_MS),))
        except EngineClosed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decoder is shutting down")
        except RequestFailed as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {exc}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    # ------------------------------------------------------------------ request

    async def _runtime(self, context) -> DecoderRuntime:
        if self.runtime is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self.runtime

    async def _read_setup(self, rt: DecoderRuntime, request_iterator) -> _Setup:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("setup"):
            raise BadRequest("the first message must carry the setup (conversation, sampling, images)")
        setup = first.setup
        if len(setup.cache_salt) > MAX_CACHE_SALT_CHARS:
            raise BadRequest(f"cache_salt is {len(setup.cache_salt)} characters; at most {MAX_CACHE_SALT_CHARS}")
        sampling = self._sampling(rt, setup.sampling)
        images = self._check_images(rt, setup)
        conv = setup.conversation
        history = [(t.user, t.assistant) for t in conv.history]
        placeholders = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in history) + conv.question.count(IMAGE_PLACEHOLDER)
        if placeholders != len(images):
            raise BadRequest(f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                             f"but {len(images)} image(s) came with it")
        template = rt.template
        system = conv.system_message if conv.HasField("system_message") else template.system_message
        prompt = render_conversation(system, history, conv.question, template)
        if images:
            prompt = expand_image_placeholders(prompt, [d.num_tiles for d in images], rt.model_config.num_image_token)
        ids = rt.tokenizer.encode(prompt)
        if len(ids) >= rt.max_model_len:
            raise BadRequest(f"the prompt is {len(ids)} tokens; this decoder's context is {rt.max_model_len} "
                             "(prompt + answer): use fewer or smaller images, or a shorter history")
        spans = find_image_spans(ids, rt.tokenizer.img_context_id)
        # An image block is exactly one run of <IMG_CONTEXT>, so spans and images correspond one to one.
        if len(spans) != len(images):
            raise BadRequest("the text contains <IMG_CONTEXT> tokens of its own")
        return _Setup(setup, sampling, images, ids, spans)

    async def _hold_images(self, rt: DecoderRuntime, prepared: _Setup):
        """Pin the prompt's cached prefix; the hold names the images whose KV it covers."""
        hashes = prepared.image_hashes
        probe = EngineRequest(
            request_id=prepared.setup.request_id or "lazy-images-probe",
            prompt_token_ids=prepared.ids,
            image_spans=prepared.spans,
            # Images without a feature key are never held: nothing names their content but their bytes.
            image_hashes=hashes or [f"unnamed-{uuid.uuid4().hex}" for _ in prepared.images],
            held_images=range(len(prepared.images)),
            cache_salt=prepared.setup.cache_salt.encode(),
        )
        hold = await rt.engine.hold_prefix(probe)
        if not hashes:
            hold.held_images = ()
        return hold

    async def _read_request(self, rt: DecoderRuntime, prepared: _Setup, request_iterator, needed: list[int],
                            hold) -> EngineRequest:
        """The engine request, with the embeddings of the `needed` images read from the stream."""
        embeds = await self._read_embeddings(rt, [prepared.images[i] for i in needed], request_iterator)
        held = [i for i in range(len(prepared.images)) if i not in set(needed)]
        self.transfer.record(prepared.images, needed, held)
        return EngineRequest(
            request_id=prepared.setup.request_id or uuid.uuid4().hex,
            prompt_token_ids=prepared.ids,
            sampling=prepared.sampling,
            image_embeds=embeds,
            image_spans=prepared.spans,
            image_hashes=prepared.image_hashes,
            cache_salt=prepared.setup.cache_salt.encode(),
            held_images=held,
            prefix_hold=hold,
        )

    def _sampling(self, rt: DecoderRuntime, p: decoder_pb2.SamplingParams) -> SamplingParams:
        stop_ids = (stop_token_id(rt.tokenizer, rt.template), *p.stop_token_ids)  # chat() stops on template.sep
        vocab = rt.model_config.llm.vocab_size
        if any(not 0 <= t < vocab for t in p.stop_token_ids):  # the count: proto_sampling_problem
            raise BadRequest(f"stop_token_ids must be in [0, {vocab})")
        if not 0 <= p.max_new_tokens <= rt.max_model_len:
            raise BadRequest(f"max_new_tokens must be in [0, {rt.max_model_len}] (0 = the server default "
                             f"{self.config.default_max_new_tokens}; the context holds prompt + answer), "
                             f"got {p.max_new_tokens}")
        problem = proto_sampling_problem(p)
        if problem:
            raise BadRequest(problem)
        try:
            return SamplingParams(
                max_new_tokens=min(p.max_new_tokens or self.config.default_max_new_tokens, rt.max_model_len),
                do_sample=p.do_sample,
                temperature=p.temperature if p.HasField("temperature") else 1.0,
                top_p=p.top_p if p.HasField("top_p") else 1.0,
                top_k=p.top_k if p.HasField("top_k") else 0,
                repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
                stop_token_ids=stop_ids,
                stop=tuple(p.stop),
                seed=p.seed if p.HasField("seed") else None,
            )
        except ValueError as exc:  # the engine's range checks: temperature >= 0, 0 < top_p <= 1, ...
            raise BadRequest(f"invalid sampling settings: {exc}") from exc

    def _check_images(self, rt: DecoderRuntime, setup) -> list[decoder_pb2.ImageDescriptor]:
        images = list(setup.images)
        if len(images) > self.config.max_images_per_request:
            raise BadRequest(f"{len(images)} images; at most {self.config.max_images_per_request} per request")
        tiles = rt.model_config.num_image_token
        hidden = rt.model_config.llm.hidden_size
        total = 0
        for i, d in enumerate(images):
            shape = list(d.tensor.shape)
            if d.num_tiles < 1 or shape != [d.num_tiles, tiles, hidden]:
                raise BadRequest(f"image {i}: embeddings must have shape [num_tiles, {tiles}, {hidden}] "
                                 f"with num_tiles >= 1, got {shape} for num_tiles={d.num_tiles}")
            if d.tensor.dtype not in WIRE_TO_TORCH:
                raise BadRequest(f"image {i}: unsupported dtype {d.tensor.dtype}")
            total += d.num_tiles
        if total > self.config.max_image_tiles:
            raise BadRequest(f"{total} image tiles; at most {self.config.max_image_tiles} per request")
        return images

    async def _read_embeddings(self, rt: DecoderRuntime, images, request_iterator) -> torch.Tensor | None:
        """Reassemble every image's chunks, in order, into one [n_ctx, hidden] tensor."""
        if not images:
            return None
        parts: list[torch.Tensor] = []
        index = 0
        try:
            buf = Reassembler(images[0].tensor)
            async for msg in request_iterator:
                if not msg.HasField("chunk"):
                    raise BadRequest("only embedding chunks may follow the setup message")
                data = msg.chunk
                while data:
                    if index >= len(images):
                        raise BadRequest("more embedding bytes than the image descriptors announce")
                    taken = buf.feed(data)
                    data = data[taken:]
                    if buf.complete:
                        parts.append(tensor_from_wire(images[index].tensor, buf.result()))
                        index += 1
                        if index < len(images):
                            buf = Reassembler(images[index].tensor)
                if index == len(images):
                    break
        except WireError as exc:
            raise BadRequest(f"image {index}: {exc}") from exc
        if index < len(images):
            raise BadRequest(f"the request ended after {index} of {len(images)} images' embeddings")
        hidden = rt.model_config.llm.hidden_size
        return await asyncio.to_thread(
            lambda: torch.cat([p.reshape(-1, hidden).to(rt.dtype) for p in parts])
        )
