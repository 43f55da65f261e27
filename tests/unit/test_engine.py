"""The decoder engine end to end on a tiny random InternLM2 (CPU, fp32): real model, real cache."""

from __future__ import annotations

import random

import pytest
import torch

from services.language_decoder.engine import (
    EngineRequest,
    PromptTooLong,
    QueueFull,
    SamplingParams,
    find_image_spans,
)
from services.language_decoder.engine.detokenize import OutputText
from tests.engine_support import (
    IMG_CTX,
    random_prompt,
    reference_greedy,
    request,
    tiny_engine,
    tiny_model,
    token_ids,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def record_steps(engine) -> list[dict[str, int]]:
    """Wrap the runner: one {request_id: tokens fed} dict per executed step."""
    steps: list[dict[str, int]] = []
    execute = engine.runner.execute

    def wrapped(batch):
        steps.append({s.seq.request_id: s.num_tokens for s in batch})
        return execute(batch)

    engine.runner.execute = wrapped
    return steps


def test_greedy_batch_equals_each_prompt_alone(model) -> None:
    gen = torch.Generator().manual_seed(0)
    prompts = [random_prompt(gen, 1, 60) for _ in range(12)]
    # Small blocks, a small token budget (chunked prefill) and few sequences at once (queueing).
    engine = tiny_engine(model, max_num_seqs=5, max_num_batched_tokens=16)
    out = engine.run_until_done(request(f"r{i}", p, max_new_tokens=12) for i, p in enumerate(prompts))
    for i, p in enumerate(prompts):
        assert token_ids(out[f"r{i}"]) == reference_greedy(model, p, 12), f"prompt {i}"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_image_rows_replace_img_context_positions(model) -> None:
    gen = torch.Generator().manual_seed(1)
    prompt = random_prompt(gen, 5, 5) + [IMG_CTX] * 11 + random_prompt(gen, 3, 3) + [IMG_CTX] * 6 + [4, 5]
    embeds = torch.randn(17, 32, generator=gen) * 4
    engine = tiny_engine(model, max_num_batched_tokens=8)  # chunks cut through both image runs
    req = EngineRequest("img", prompt, SamplingParams(max_new_tokens=10), embeds,
                        find_image_spans(prompt, IMG_CTX), ["a", "b"])
    out = engine.run_until_done([req])
    assert token_ids(out["img"]) == reference_greedy(model, prompt, 10, image_embeds=embeds)


def test_chunked_prefill_splits_long_prompt_and_decodes_advance_every_step(model) -> None:
    gen = torch.Generator().manual_seed(2)
    engine = tiny_engine(model, max_num_batched_tokens=16, max_num_seqs=8)
    steps = record_steps(engine)
    short = [random_prompt(gen, 3, 6) for _ in range(4)]
    for i, p in enumerate(short):
        engine.add_request(request(f"s{i}", p, max_new_tokens=40))
    outputs: dict[str, list] = {}
    while len(outputs) < 4:  # until every short prompt is decoding
        for o in engine.step():
            outputs.setdefault(o.request_id, []).append(o)
    long = random_prompt(gen, 120, 120)
    engine.add_request(request("long", long, max_new_tokens=5))
    while engine.has_unfinished():
        for o in engine.step():
            outputs.setdefault(o.request_id, []).append(o)
    long_steps = [s for s in steps if "long" in s]
    prefill_steps = [s for s in long_steps if s["long"] > 1]
    assert len(prefill_steps) == 10  # 120 tokens, 12 per step next to 4 decodes
    for s in prefill_steps:
        assert all(s[f"s{i}"] == 1 for i in range(4)), "a running decode did not advance"
        assert sum(s.values()) <= 16
    assert token_ids(outputs["long"]) == reference_greedy(model, long, 5)
    for i, p in enumerate(short):
        assert token_ids(outputs[f"s{i}"]) == reference_greedy(model, p, 40)


def test_follow_up_turn_prefills_only_its_new_tokens(model) -> None:
    gen = torch.Generator().manual_seed(3)
    engine = tiny_engine(model, block_size=4)
    turn1 = random_prompt(gen, 37, 37)
    out1 = engine.run_until_done([request("t1", turn1, max_new_tokens=8)])
    answer = token_ids(out1["t1"])
    turn2 = turn1 + answer + random_prompt(gen, 9, 9)
    before = engine.stats.prompt_tokens_computed
    out2 = engine.run_until_done([request("t2", turn2, max_new_tokens=8)])
    # Turn 1 computed K/V for its prompt and all but its last answer token: 44 tokens = 11 full blocks.
    cached = (len(turn1) + len(answer) - 1) // 4 * 4
    assert out2["t2"][-1].usage.cached_prompt_tokens == cached == 44
    assert engine.stats.prompt_tokens_computed - before == len(turn2) - cached
    assert token_ids(out2["t2"]) == reference_greedy(model, turn2, 8)


def test_same_tokens_different_image_hash_share_no_image_blocks(model) -> None:
    gen = torch.Generator().manual_seed(4)
    prompt = random_prompt(gen, 10, 10) + [IMG_CTX] * 16 + random_prompt(gen, 10, 10)
    spans = find_image_spans(prompt, IMG_CTX)
    cat, dog = torch.randn(16, 32, generator=gen) * 4, torch.randn(16, 32, generator=gen) * 4
    engine = tiny_engine(model, block_size=4)

    def run(rid: str, embeds: torch.Tensor, image_hash: str):
        req = EngineRequest(rid, prompt, SamplingParams(max_new_tokens=6), embeds, spans, [image_hash])
        engine.add_request(req)
        seq = engine.sequences[rid]
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        return seq, outs

    a, out_a = run("cat", cat, "sha-cat")
    b, out_b = run("dog", dog, "sha-dog")
    # Only the first 2 blocks (positions 0..7) lie before the image at position 10.
    assert out_b[-1].usage.cached_prompt_tokens == 8
    assert token_ids(out_a) == reference_greedy(model, prompt, 6, image_embeds=cat)
    assert token_ids(out_b) == reference_greedy(model, prompt, 6, image_embeds=dog)
    c, out_c = run("cat-again", cat, "sha-cat")
    assert out_c[-1].usage.cached_prompt_tokens == (len(prompt) - 1) // 4 * 4
    assert token_ids(out_c) == token_ids(out_a)


def test_prompt_beyond_max_model_len_is_rejected_and_generation_stops_at_it(model) -> None:
    engine = tiny_engine(model, max_model_len=32, num_kv_blocks=64)
    with pytest.raises(PromptTooLong, match="max_model_len=32"):
        engine.add_request(request("long", list(range(3, 36)), max_new_tokens=4))
    out = engine.run_until_done([request("fits", list(range(3, 30)), max_new_tokens=100)])
    assert len(token_ids(out["fits"])) == 5 and out["fits"][-1].finish_reason == "length"
    edge = engine.run_until_done([request("edge", list(range(3, 35)), max_new_tokens=100)])
    assert len(token_ids(edge["edge"])) == 1 and edge["edge"][-1].finish_reason == "length"


def test_full_queue_raises_queue_full(model) -> None:
    engine = tiny_engine(model, max_queue_size=3)
    for i in range(3):
        engine.add_request(request(f"r{i}", [5, 6, 7], max_new_tokens=2))
    with pytest.raises(QueueFull):
        engine.add_request(request("r3", [5, 6, 7], max_new_tokens=2))
    engine.step()  # admits the three: the queue has room again
    engine.add_request(request("r3", [5, 6, 7], max_new_tokens=2))


def test_stop_token_and_max_new_tokens_finish_reasons(model) -> None:
    engine = tiny_engine(model)
    prompt = [5, 9, 13, 17]
    ref = reference_greedy(model, prompt, 10)
    stop_at = ref[3]
    out = engine.run_until_done([request("s", prompt, max_new_tokens=10, stop_token_ids=(stop_at,))])
    ids = token_ids(out["s"])
    assert ids == ref[: ref.index(stop_at) + 1] and out["s"][-1].finish_reason == "stop"
    usage = out["s"][-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (4, len(ids))


def test_seeded_sampling_is_reproducible_whatever_the_batch(model) -> None:
    params = dict(do_sample=True, temperature=1.3, top_k=40, top_p=0.95, repetition_penalty=1.1,
                  max_new_tokens=24)
    prompt = [3, 14, 15, 92, 65, 35]
    alone = tiny_engine(model).run_until_done([request("x", prompt, seed=1234, **params)])
    gen = torch.Generator().manual_seed(5)
    noise = [request(f"n{i}", random_prompt(gen, 1, 40), max_new_tokens=20,
                     **({"do_sample": True, "seed": i} if i % 2 else {})) for i in range(9)]
    crowd = tiny_engine(model, max_num_seqs=4, max_num_batched_tokens=12, num_kv_blocks=70)
    mixed = crowd.run_until_done(noise[:5] + [request("x", prompt, seed=1234, **params)] + noise[5:])
    assert token_ids(mixed["x"]) == token_ids(alone["x"])
    other = tiny_engine(model).run_until_done([request("x", prompt, seed=4321, **params)])
    assert token_ids(other["x"]) != token_ids(alone["x"])


def test_abort_frees_blocks_at_once(model) -> None:
    engine = tiny_engine(model)
    bm = engine.block_manager
    for i in range(4):  # distinct prompts: no block is shared through the prefix cache
        engine.add_request(request(f"r{i}", list(range(3 + i, 30 + i)), max_new_tokens=50))
    engine.step()
    engine.step()
    held = len(engine.sequences["r2"].block_table)
    free = bm.num_free_blocks
    assert engine.abort("r2") and not engine.abort("r2")
    assert bm.num_free_blocks == free + held
    outs = engine.step()
    assert "r2" not in {o.request_id for o in outs}
    bm.check_invariants(engine.sequences.values())


def test_no_block_leaks_after_thousands_of_mixed_requests(model) -> None:
    """Finishes, stop tokens, aborts (waiting and running), failed steps, full queue, too-long prompts."""
    rng = random.Random(6)
    gen = torch.Generator().manual_seed(6)
    # A small cache and budget: admission waits on memory and decodes preempt each other.
    engine = tiny_engine(model, num_kv_blocks=40, max_num_seqs=12, max_num_batched_tokens=24,
                         max_model_len=96, max_queue_size=24)
    bm = engine.block_manager
    execute = engine.runner.execute

    def flaky(batch):
        if rng.random() < 0.03:
            raise RuntimeError("injected device fault")
        return execute(batch)

    engine.runner.execute = flaky
    reasons: dict[str, int] = {}
    submitted = rejected = 0
    system = random_prompt(gen, 12, 12)  # a shared prefix, so blocks are also shared and revived
    while submitted < 3000:
        for _ in range(rng.randint(0, 3)):
            rid = f"q{submitted}"
            submitted += 1
            prompt = random_prompt(gen, 1, 110 if rng.random() < 0.03 else 40)
            if rng.random() < 0.5:
                prompt = system + prompt
            sampling = dict(max_new_tokens=rng.randint(1, 12), stop_token_ids=(rng.randint(3, 95),),
                            do_sample=rng.random() < 0.3, seed=rng.randint(0, 9))
            try:
                engine.add_request(request(rid, prompt, **sampling))
            except (QueueFull, PromptTooLong):
                rejected += 1
        live = list(engine.sequences)
        for rid in live:
            if rng.random() < 0.005:
                engine.abort(rid)
                reasons["abort"] = reasons.get("abort", 0) + 1
        for out in engine.step():
            if out.finished:
                reasons[out.finish_reason] = reasons.get(out.finish_reason, 0) + 1
        if submitted % 500 < 4:
            bm.check_invariants(engine.sequences.values())
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                reasons[out.finish_reason] = reasons.get(out.finish_reason, 0) + 1
    assert not engine.sequences
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])
    assert sum(reasons.values()) + rejected == submitted
    assert all(reasons.get(k, 0) > 0 for k in ("stop", "length", "abort", "error")), reasons
    assert rejected > 0 and engine.scheduler.num_preemptions > 0


# --------------------------------------------------------------------------- streamed text


class CharDecoder:
    """A stand-in detokenizer: token t is the character chr(t) (no held-back bytes)."""

    def push(self, token_id: int) -> str:
        return chr(token_id)

    def flush(self) -> str:
        return ""


def stream(text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    out = OutputText(CharDecoder(), stop)
    deltas = []
    for ch in text:
        delta, stopped = out.push(ord(ch))
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(out.finish())
    return deltas, False


def test_stop_string_is_never_half_streamed() -> None:
    deltas, stopped = stream("hello wor", ("world",))
    assert not stopped and "".join(deltas) == "hello wor"
    assert deltas[-1] == "wor"  # "wor" was held back until the end: it may have become "world"
    deltas, stopped = stream("hello world and more", ("world", "xyz"))
    assert stopped and "".join(deltas) == "hello "
    deltas, stopped = stream("aab", ("ab",))
    assert stopped and "".join(deltas) == "a"


def test_stop_string_ends_the_engine_sequence(model) -> None:
    engine = tiny_engine(model, max_num_batched_tokens=32)
    engine._detokenizer_factory = CharDecoder
    prompt = [40, 41, 42]
    ref = reference_greedy(model, prompt, 12)
    text = "".join(chr(t) for t in ref)
    stop = text[5:7]
    out = engine.run_until_done([request("s", prompt, max_new_tokens=12, stop=(stop,))])
    joined = "".join(o.text for o in out["s"])
    assert joined == text[: text.index(stop)]
    assert out["s"][-1].finish_reason == "stop"


def test_cuda_graph_decode_body_runs_eagerly_on_cpu(model) -> None:
    """The static-shape decode body the GPU captures (padded batch, bucketed keys, scratch block)."""
    from services.language_decoder.engine.cuda_graphs import DecodeGraphs

    engine = tiny_engine(model, block_size=4, max_num_seqs=5, max_num_batched_tokens=24, max_model_len=300,
                         num_kv_blocks=400)
    graphs = DecodeGraphs(model, engine.runner.kv_cache, engine.config, use_flash=False, capture=False)
    engine.runner.graphs = graphs
    used = []
    run = graphs.run

    def spy(decodes):
        used.append(len(decodes))
        return run(decodes)

    graphs.run = spy
    gen = torch.Generator().manual_seed(9)
    prompts = [random_prompt(gen, 1, 270) for _ in range(7)]  # contexts cross the 256-key bucket
    out = engine.run_until_done(request(f"r{i}", p, max_new_tokens=20) for i, p in enumerate(prompts))
    for i, p in enumerate(prompts):
        assert token_ids(out[f"r{i}"]) == reference_greedy(model, p, 20), i
    assert used and {3, 5} & set(used)  # padded batch buckets (3 -> 4, 5) were exercised
    assert graphs.batch_buckets == [1, 2, 4, 5]


def test_dynamic_ntk_rope_past_the_table_matches_reference() -> None:
    """Past max_position_embeddings RoPE depends on each sequence's own length, chunked or not."""
    model = tiny_model(max_position_embeddings=32)
    engine = tiny_engine(model, max_model_len=96, max_num_batched_tokens=16)
    assert not engine.block_manager.enable_prefix_caching  # cached KV would carry a stale RoPE base
    first_logits = {}
    execute = engine.runner.execute

    def spy(batch):
        seqs, logits = execute(batch)
        for seq, row in zip(seqs, logits, strict=True):
            first_logits.setdefault(seq.request_id, row.clone())
        return seqs, logits

    engine.runner.execute = spy
    gen = torch.Generator().manual_seed(10)
    prompts = [random_prompt(gen, 20, 20), random_prompt(gen, 45, 45), random_prompt(gen, 5, 5)]
    out = engine.run_until_done(request(f"r{i}", p, max_new_tokens=30) for i, p in enumerate(prompts))
    for i, p in enumerate(prompts):  # r0 and r2 cross the threshold while decoding, r1 starts past it
        assert token_ids(out[f"r{i}"]) == reference_greedy(model, p, 30), i
    # r1's prompt is prefilled in 3 chunks; every chunk must use the base of the whole prompt (45).
    ids = torch.tensor([prompts[1]])
    with torch.inference_mode():
        ref = model(model.embed(ids), torch.arange(45)[None])[0, -1]
    torch.testing.assert_close(first_logits["r1"], ref, atol=1e-4, rtol=1e-4)


def test_cpu_weight_layouts_keep_every_linear_result() -> None:
    """K-major weights and the oneDNN-prepacked copy change speed, not results (beyond fp32 rounding)."""
    import torch.nn.functional as F

    from services.language_decoder.engine.cpu_weights import (
        PrepackedLinear,
        kmajor_linear_weights,
        prepack_linear_weights,
    )

    model = tiny_model(seed=3)
    linears = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kmajor_linear_weights(model)
    assert prepack_linear_weights(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(module.weight, linears[name]) and not module.weight.is_contiguous()
            for rows in (1, 2, 16, 300):  # MKL, packed, packed, MKL
                x = torch.randn(1, rows, module.in_features)
                torch.testing.assert_close(module(x), F.linear(x, linears[name]), atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(tiny_model(seed=3).state_dict())  # nothing added to the checkpoint
    untouched = tiny_model(seed=3)
    tiny_engine(untouched, cpu_prepacked_weights=False)
    assert not any(isinstance(m, PrepackedLinear) for m in untouched.modules())


def test_compiled_layers_give_the_eager_tokens_on_cpu() -> None:
    """torch.compile'd layers (the GPU default) break their graph at the KV store and change nothing.

    One layer and few shapes keep Inductor's CPU compile to a few seconds per graph.
    """
    eager, compiled = tiny_model(num_hidden_layers=1), tiny_model(num_hidden_layers=1)
    gen = torch.Generator().manual_seed(4)
    prompts = [random_prompt(gen, 20, 60) for _ in range(3)]
    outs = []
    for m, compile_ in ((eager, False), (compiled, True)):
        engine = tiny_engine(m, compile_layers=compile_, cpu_prepacked_weights=False)
        out = engine.run_until_done(request(f"r{i}", p, max_new_tokens=6) for i, p in enumerate(prompts))
        outs.append([token_ids(out[f"r{i}"]) for i in range(len(prompts))])
    assert outs[0] == outs[1]
    assert all(callable(getattr(layer, "_compiled_call_impl", None)) for layer in compiled.model.layers)


def test_warm_up_leaves_no_sequences_blocks_or_stats(model) -> None:
    engine = tiny_engine(model)
    free = engine.block_manager.num_free_blocks
    engine.warm_up()
    assert not engine.has_unfinished() and not engine.sequences
    assert engine.block_manager.num_free_blocks == free
    assert engine.stats.steps == 0 and engine.stats.generated_tokens == 0
    p = random_prompt(torch.Generator().manual_seed(5), 10, 40)
    out = engine.run_until_done([request("after", p, max_new_tokens=8)])
    assert token_ids(out["after"]) == reference_greedy(model, p, 8)


def test_warm_up_raises_when_a_step_fails(model) -> None:
    engine = tiny_engine(model)

    def broken(batch):
        raise RuntimeError("no C compiler")

    engine.runner.execute = broken
    with pytest.raises(RuntimeError, match="warm-up failed: RuntimeError: no C compiler"):
        engine.warm_up()
    assert not engine.sequences and engine.block_manager.num_free_blocks == engine.runner.num_blocks


def test_decoder_start_fails_with_a_hint_when_warm_up_fails(monkeypatch) -> None:
    from services.language_decoder.config import DecoderConfig
    from services.language_decoder.engine import LLMEngine
    from services.language_decoder.servicer import DecoderRuntime
    from tests.conftest import load_kit

    def broken(self, max_batch=3):
        raise RuntimeError("decoder warm-up failed: BackendCompilerFailed: no C compiler")

    monkeypatch.setattr(LLMEngine, "warm_up", broken)
    root = str(load_kit().root)
    with pytest.raises(RuntimeError, match="no C compiler \\(if torch.compile cannot run here, start with "
                                           "--compile-layers off\\)"):
        DecoderRuntime.load(DecoderConfig(model=root, device="cpu", warmup="on", compile_layers="on"))
    with pytest.raises(RuntimeError, match="no C compiler$"):
        DecoderRuntime.load(DecoderConfig(model=root, device="cpu", warmup="on"))
