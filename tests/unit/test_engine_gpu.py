"""GPU-only engine checks (skipped without CUDA): CUDA-graph decode, compiled layers, bf16, KV sizing."""

from __future__ import annotations

import pytest
import torch

from services.language_decoder.engine import EngineConfig, LLMEngine
from tests.engine_support import random_prompt, reference_greedy, request, tiny_model, token_ids

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (GPU path: CUDA graphs, bf16)"
)


def gpu_engine(model, **config) -> LLMEngine:
    defaults = dict(block_size=16, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=64,
                    max_model_len=512, device="cuda")
    return LLMEngine(model, EngineConfig(**{**defaults, **config}))


def test_cuda_graph_decode_matches_cpu_reference_fp32() -> None:
    cpu = tiny_model()
    gpu = tiny_model().cuda()
    gen = torch.Generator().manual_seed(0)
    prompts = [random_prompt(gen, 1, 300) for _ in range(11)]  # several batch and context buckets
    eng = gpu_engine(gpu)
    assert eng.runner.graphs is not None
    out = eng.run_until_done(request(f"r{i}", p, max_new_tokens=40) for i, p in enumerate(prompts))
    for i, p in enumerate(prompts):
        assert token_ids(out[f"r{i}"]) == reference_greedy(cpu, p, 40), i
    assert len(eng.runner.graphs.graphs) >= 2


def test_compiled_layers_match_eager_layers_fp32() -> None:
    gen = torch.Generator().manual_seed(2)
    prompts = [random_prompt(gen, 1, 200) for _ in range(5)]
    runs = []
    for compiled in (True, False):
        eng = gpu_engine(tiny_model().cuda(), compile_layers=compiled)
        out = eng.run_until_done(request(f"r{i}", p, max_new_tokens=24) for i, p in enumerate(prompts))
        runs.append([token_ids(out[f"r{i}"]) for i in range(len(prompts))])
    assert runs[0] == runs[1]


def test_bf16_graphs_and_eager_agree() -> None:
    model = tiny_model().to("cuda", torch.bfloat16)
    model.rotary.init_buffers("cuda")  # RoPE frequencies stay fp32, as load_language_model keeps them
    gen = torch.Generator().manual_seed(1)
    prompts = [random_prompt(gen, 1, 100) for _ in range(6)]
    runs = []
    for graphs in (True, False):
        eng = gpu_engine(model, use_cuda_graphs=graphs)
        out = eng.run_until_done(request(f"r{i}", p, max_new_tokens=16) for i, p in enumerate(prompts))
        runs.append([token_ids(out[f"r{i}"]) for i in range(len(prompts))])
    same = sum(a == b for a, b in zip(runs[0], runs[1], strict=True))
    assert same >= len(prompts) - 1  # bf16 reductions may differ with the padded shape at a near-tie


def test_kv_cache_is_sized_from_free_device_memory() -> None:
    model = tiny_model().cuda()
    eng = gpu_engine(model, num_kv_blocks=None, gpu_memory_utilization=0.5,
                     gpu_activation_reserve_bytes=1 << 28)
    assert eng.runner.num_blocks > 1000
    assert eng.runner.kv_cache.storage.device.type == "cuda"


def test_warm_up_captures_graphs_and_leaves_outputs_exact() -> None:
    cpu = tiny_model()
    eng = gpu_engine(tiny_model().cuda())
    eng.warm_up()
    assert {b for b, _ in eng.runner.graphs.graphs} >= {1, 2, 4}
    assert eng.stats.steps == 0 and not eng.sequences
    p = random_prompt(torch.Generator().manual_seed(3), 10, 120)
    out = eng.run_until_done([request("after", p, max_new_tokens=30)])
    assert token_ids(out["after"]) == reference_greedy(cpu, p, 30)
