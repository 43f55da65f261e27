"""The decoder engine: continuous batching over a paged KV cache, for InternLM2 (InternVL2's LLM).

Public API (everything else in the package is internal)::

    from services.language_decoder.engine import (
        AsyncEngine, EngineConfig, EngineRequest, LLMEngine, SamplingParams, QueueFull, PromptTooLong,
    )

    engine = AsyncEngine(LLMEngine(model, EngineConfig(device="cuda"), tokenizer=tokenizer))
    request = EngineRequest(
        request_id="r1",
        prompt_token_ids=ids,                     # the full upstream prompt, <IMG_CONTEXT> runs included
        image_embeds=embeds,                      # [n_ctx, hidden], all images in prompt order, or None
        image_spans=find_image_spans(ids, ctx_id),  # one (start, end) run per image block
        image_hashes=[sha256_of_image_1, ...],    # content keys: prefix reuse never mixes images
        sampling=SamplingParams(max_new_tokens=512, stop_token_ids=(im_end_id,), seed=7),
    )
    try:
        async for out in engine.generate(request):   # EngineOutput per step
            send(out.text, out.token_ids)            # text deltas; joined, they are the full response
            if out.finished:
                log(out.finish_reason, out.usage)    # "stop" | "length"; prompt/completion/cached tokens
    except QueueFull: ...      # RESOURCE_EXHAUSTED
    except PromptTooLong: ...  # INVALID_ARGUMENT (also ValueError for malformed requests)
    except RequestFailed: ...  # INTERNAL: the model step failed; the request's memory is already freed
    except EngineClosed: ...   # UNAVAILABLE: shutting down
    engine.close()

Cancelling the task that iterates `generate` (client cancel, expired deadline) or closing the iterator
aborts the request before the next engine step and frees its KV blocks. `LLMEngine` is the same engine
driven synchronously (`add_request`, `step() -> list[EngineOutput]`, `abort`), for tests and benchmarks.

How it works (one file each): `scheduler` (which tokens run each step: all decodes plus chunked
prefill under a token budget; FCFS admission bounded by the queue and by free blocks; preemption by
recompute), `block_manager` (ref-counted paged blocks, prefix reuse keyed by token ids and image
hashes), `kv_cache` (preallocated once), `runner` + `attention` (pack the step, paged attention with
SDPA or flash-attn), `cuda_graphs` (decode steps on GPU), `sampler` (per request, seeded),
`detokenize` (streamed text and stop strings), `engine` / `async_engine` (the loops).
"""

from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine import EngineStats, LLMEngine
from .errors import EngineClosed, EngineError, PromptTooLong, QueueFull, RequestFailed
from .request import EngineOutput, EngineRequest, SamplingParams, Usage, find_image_spans

__all__ = [
    "AsyncEngine",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "EngineOutput",
    "EngineRequest",
    "EngineStats",
    "LLMEngine",
    "PromptTooLong",
    "QueueFull",
    "RequestFailed",
    "SamplingParams",
    "Usage",
    "find_image_spans",
]
