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

Reading the engine: one request from `add_request` to its last token, four files.

1. `engine.py` — `LLMEngine.add_request` validates the request and makes a `Sequence` (`sequence.py`:
   its tokens, image rows, block table); `step` is the algorithm: `scheduler.schedule()`,
   `runner.execute()`, `sampler()`, `scheduler.postprocess()`, then one `EngineOutput` per new token.
2. `scheduler.py` — `schedule` picks the step's tokens: one decode token per running sequence, then
   prefill chunks under the token budget; FCFS admission bounded by the queue and free KV blocks;
   preemption by recompute. `postprocess` advances the sequences, publishes computed blocks to the
   prefix cache, appends tokens and text, and finishes and frees sequences (stop token, stop string,
   length). Its memory is `block_manager.py` (ref-counted paged blocks, prefix reuse keyed by token
   ids and image hashes).
3. `runner.py` — `prepare_decode` and `prepare_prefill` pack the step into one row (image embedding
   rows in place of `<IMG_CONTEXT>`), `run` does the forward. Below it, leaves with one job each:
   `attention.py` (the paged `KVStore`: SDPA or flash-attn), `kv_cache.py` (the preallocated cache,
   the one KV write, block-table padding), `rope.py` (RoPE for packed tokens), `cuda_graphs.py`
   (GPU decode steps replayed), `cpu_weights.py` (CPU matmul layouts) and the model itself
   (`services/language_decoder/models/`: one per architecture over shared layers, attention inputs
   as one `AttentionContext`).
4. `sampler.py` — the next token of each row by its request's settings (HF order, `..sampling`):
   shared argmax and shared draws for rows with equal unseeded settings, a private stream per seed.

`detokenize.py` (streamed text, stop strings) is called from `postprocess`; `async_engine.py` drives
`step` from a thread for the asyncio servicer.
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
