"""GPU-only checks of int8 weights (skipped without CUDA): CUDA graphs, compiled layers, loading onto the GPU.

The CPU tests (test_quantize.py) cover the scheme, the load and the engine; these cover what only a GPU
runs: graph capture and replay over `Int8Linear`, Inductor's kernels for it (the one-row GEMV form
included), and a checkpoint quantised straight onto the device.
"""

from __future__ import annotations

import copy

import pytest
import torch

from services.common.quantization import INT8
from services.language_decoder.engine import EngineConfig, LLMEngine
from services.language_decoder.model import load_language_model
from services.language_decoder.quantize import Int8Linear, quantize_model, weight_bytes
from services.tools.make_tiny_checkpoint import write_tiny_checkpoint
from tests.engine_support import random_prompt, reference_greedy, request, tiny_model, token_ids

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (int8 under CUDA graphs and compiled layers)"
)


def gpu_engine(model, **config) -> LLMEngine:
    defaults = dict(block_size=16, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=64,
                    max_model_len=512, device="cuda")
    return LLMEngine(model, EngineConfig(**{**defaults, **config}))


def run(engine: LLMEngine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    # Different lengths: the last steps decode one sequence alone (batch-1 graph, GEMV form).
    out = engine.run_until_done(
        request(f"r{i}", p, max_new_tokens=max_new_tokens + 3 * i) for i, p in enumerate(prompts))
    return [token_ids(out[f"r{i}"]) for i in range(len(prompts))]


def test_int8_cuda_graph_decode_matches_the_cpu_int8_reference_fp32() -> None:
    cpu = quantize_model(tiny_model(seed=11), INT8)
    gpu = copy.deepcopy(cpu).cuda()
    assert all(m.weight.is_cuda and m.weight.dtype == torch.int8 for m in gpu.modules() if isinstance(m, Int8Linear))
    gen = torch.Generator().manual_seed(0)
    prompts = [random_prompt(gen, 1, 300) for _ in range(9)]
    eng = gpu_engine(gpu, compile_layers=False)
    assert eng.runner.graphs is not None
    got = run(eng, prompts, 24)
    for i, p in enumerate(prompts):
        assert got[i] == reference_greedy(cpu, p, 24 + 3 * i), i
    assert len(eng.runner.graphs.graphs) >= 2


def test_compiled_int8_layers_match_eager_int8_layers_fp32() -> None:
    gen = torch.Generator().manual_seed(2)
    prompts = [random_prompt(gen, 1, 200) for _ in range(5)]
    runs = []
    for compiled in (True, False):
        eng = gpu_engine(quantize_model(tiny_model(seed=12), INT8).cuda(), compile_layers=compiled)
        runs.append(run(eng, prompts, 20))
    assert runs[0] == runs[1]


def test_bf16_int8_compiled_graphs_agree_with_eager_and_warm_up() -> None:
    """The served GPU setting: bf16 activations, int8 weights, compiled layers, CUDA graphs, warm-up."""
    model = tiny_model(seed=13).to("cuda", torch.bfloat16)
    model.rotary.init_buffers("cuda")
    served = gpu_engine(copy.deepcopy(model), quantize=INT8, compile_layers=True)
    served.warm_up()
    assert {b for b, _ in served.runner.graphs.graphs} >= {1, 2, 4}
    plain = gpu_engine(copy.deepcopy(model), quantize=INT8, compile_layers=False, use_cuda_graphs=False)
    gen = torch.Generator().manual_seed(1)
    prompts = [random_prompt(gen, 1, 100) for _ in range(6)]
    a, b = run(served, prompts, 16), run(plain, prompts, 16)
    same = sum(x == y for x, y in zip(a, b, strict=True))
    assert same >= len(prompts) - 1  # bf16 reductions may differ with the padded shape at a near-tie


def test_checkpoint_quantised_onto_the_gpu_holds_int8_weights(tmp_path) -> None:
    root = write_tiny_checkpoint(tmp_path / "ckpt", seed=14, shards=2)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = load_language_model(root, device="cuda", dtype=torch.bfloat16, quantize=INT8)
    held = weight_bytes(model)
    # The device holds the int8 model and nothing else: no bf16 copy left behind (allocations round to 512 B).
    grown = torch.cuda.memory_allocated() - before
    assert held <= grown <= held + 512 * (len(model.state_dict()) + 1)
    blocks = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert blocks and all(m.weight.is_cuda and m.weight.dtype == torch.int8 for m in blocks)
    assert model.output.weight.dtype == torch.bfloat16 and model.rotary.inv_freq.dtype == torch.float32
    reference = load_language_model(root, device="cpu", dtype=torch.bfloat16, quantize=INT8)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name].cpu(), tensor), name
