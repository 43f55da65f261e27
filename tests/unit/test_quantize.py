"""Weight-only int8 (services/language_decoder/quantize.py): the scheme, the layer, the load, the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.common.checkpoint import CheckpointError
from services.common.quantization import INT8, NO_QUANTIZATION, check_quantize
from services.language_decoder.engine.cpu_weights import kmajor_linear_weights, prepack_linear_weights
from services.language_decoder.generate import generate
from services.language_decoder.model import load_language_model
from services.language_decoder.quantize import (
    Int8Linear,
    _cpu_int8_kernel_ok,
    quantization_of,
    quantize_model,
    quantize_per_channel,
    weight_bytes,
)
from services.tools.make_tiny_checkpoint import write_tiny_checkpoint
from tests.engine_support import random_prompt, reference_greedy, request, tiny_engine, tiny_model, token_ids

BLOCK_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def test_per_channel_rounding_error_is_at_most_half_a_step() -> None:
    w = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitudes
    w[5] = 0.0
    q, scales = quantize_per_channel(w, torch.float32)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q[5], torch.zeros(80, dtype=torch.int8)) and scales[5] == 1.0
    err = (q.float() * scales[:, None] - w).abs()
    assert bool((err <= scales[:, None] / 2 * (1 + 1e-5)).all())


def test_bf16_scales_are_the_ones_the_values_were_rounded_against() -> None:
    w = torch.randn(64, 32)
    q, scales = quantize_per_channel(w, torch.bfloat16)
    assert scales.dtype == torch.bfloat16
    # Rounded against the stored bf16 scale, the error stays within half a step of that scale.
    err = (q.float() * scales.float()[:, None] - w).abs()
    assert bool((err <= scales.float()[:, None] * 0.51).all())


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_the_dequantised_linear_fp32(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(40, 24, bias=bias)
    layer = Int8Linear.from_linear(linear, torch.float32)
    dequant = layer.weight.float() * layer.scales[:, None]
    for shape in ((1, 1, 40), (3, 7, 40), (5, 40)):
        x = torch.randn(shape)
        torch.testing.assert_close(layer(x), F.linear(x, dequant, linear.bias), atol=1e-5, rtol=1e-5)
    # ... and stays close to the unquantised layer.
    x = torch.randn(16, 40)
    torch.testing.assert_close(layer(x), linear(x), atol=0.02, rtol=0.02)


def test_cpu_int8_kernel_serves_bf16_and_matches_the_dequantised_linear() -> None:
    # Skipped only where the kernel cannot exist (not in this torch build, or no bf16 on this CPU); where it
    # can, the product's own check must accept it, so a broken check fails here instead of silently falling back.
    if getattr(torch.ops.aten, "_weight_int8pack_mm", None) is None or not (
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip(f"torch {torch.__version__} on this CPU has no aten._weight_int8pack_mm for bf16")
    assert _cpu_int8_kernel_ok(torch.bfloat16), "the int8 CPU kernel exists here but the check refuses it"
    torch.manual_seed(1)
    linear = nn.Linear(64, 32, bias=False)
    layer = Int8Linear.from_linear(linear, torch.bfloat16)
    assert layer.cpu_kernel
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    expected = F.linear(x.float(), layer.weight.float() * layer.scales.float()[:, None])
    with torch.autograd.profiler.profile() as prof:
        out = layer(x)
    calls = [e.name for e in prof.function_events if "int8pack" in e.name]
    assert calls, "the bf16 CPU path did not use aten._weight_int8pack_mm"
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 32)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_quantize_model_swaps_exactly_the_block_linears_and_is_idempotent() -> None:
    model = tiny_model(seed=1)
    before = weight_bytes(model)
    head, embed = model.output.weight.clone(), model.model.tok_embeddings.weight.clone()
    quantize_model(model, INT8)
    names = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert names == {f"model.layers.{i}.{s}" for i in range(len(model.model.layers)) for s in BLOCK_LINEARS}
    assert type(model.output) is nn.Linear and torch.equal(model.output.weight, head)
    assert torch.equal(model.model.tok_embeddings.weight, embed)
    assert quantization_of(model) == INT8 and model.dtype == torch.float32
    state = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_model(model, INT8)  # already int8: nothing changes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # int8 weights: a quarter of fp32's bytes, plus one fp32 scale per output channel.
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear))
    scales = sum(m.scales.numel() for m in model.modules() if isinstance(m, Int8Linear))
    assert weight_bytes(model) == before - 3 * linear_params + 4 * scales
    assert quantize_model(tiny_model(), NO_QUANTIZATION) is not None
    with pytest.raises(ValueError, match="use one of none, int8"):
        check_quantize("int4")


def test_cpu_weight_layouts_leave_int8_layers_alone() -> None:
    model = quantize_model(tiny_model(seed=2), INT8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    int8_layers = {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    kmajor_linear_weights(model)
    prepack_linear_weights(model)
    assert int8_layers and {name for name, m in model.named_modules() if isinstance(m, Int8Linear)} == int8_layers
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_quantised_load_equals_quantising_the_loaded_model(tmp_path) -> None:
    """The loader quantises each tensor as it is read; the result is the in-memory conversion's, bit for bit,
    whether the checkpoint is one file or shards."""
    one = write_tiny_checkpoint(tmp_path / "one", seed=3)
    sharded = write_tiny_checkpoint(tmp_path / "sharded", seed=3, shards=3)
    expected = quantize_model(load_language_model(one, dtype=torch.float32), INT8).state_dict()
    for root in (one, sharded):
        loaded = load_language_model(root, dtype=torch.float32, quantize=INT8)
        got = loaded.state_dict()
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), (root.name, name)
        assert loaded.rotary.inv_freq.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown weight quantisation"):
        load_language_model(one, quantize="fp8")


def test_quantised_load_rejects_a_checkpoint_that_does_not_fit(tmp_path) -> None:
    root = write_tiny_checkpoint(tmp_path / "ckpt", seed=4)
    from safetensors.torch import load_file, save_file

    tensors = load_file(root / "model.safetensors")
    del tensors["language_model.model.layers.0.feed_forward.w2.weight"]
    save_file(tensors, root / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_language_model(root, quantize=INT8)


def test_engine_with_int8_weights_decodes_what_the_simple_loop_decodes() -> None:
    """The engine's paged batches over int8 weights give the reference loop's tokens on the same weights."""
    model = tiny_model(seed=5)
    engine = tiny_engine(model, quantize=INT8)
    assert quantization_of(model) == INT8  # the engine quantised the model it was given, in place
    gen = torch.Generator().manual_seed(6)
    prompts = [random_prompt(gen, 3, 60) for _ in range(6)]
    out = engine.run_until_done(request(f"r{i}", p, max_new_tokens=16) for i, p in enumerate(prompts))
    for i, p in enumerate(prompts):
        assert token_ids(out[f"r{i}"]) == reference_greedy(model, p, 16), i


def test_int8_logits_stay_close_to_the_unquantised_model() -> None:
    full, q = tiny_model(seed=7), quantize_model(tiny_model(seed=7), INT8)
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(8), 30, 30)])
    with torch.inference_mode():
        a = generate(full, full.embed(ids), torch.ones_like(ids), max_new_tokens=4, eos_token_id=-1,
                     pad_token_id=2, return_step_logits=True).step_logits[0, 0]
        b = generate(q, q.embed(ids), torch.ones_like(ids), max_new_tokens=4, eos_token_id=-1,
                     pad_token_id=2, return_step_logits=True).step_logits[0, 0]
    assert float(F.cosine_similarity(a, b, dim=0)) > 0.999
    assert not torch.equal(a, b)  # int8 really is in use


def test_compiled_int8_layers_give_the_eager_tokens_on_cpu() -> None:
    """torch.compile traces the int8 layer (its one-row GEMV form included) without changing tokens."""
    eager = quantize_model(tiny_model(num_hidden_layers=1, seed=9), INT8)
    compiled = quantize_model(tiny_model(num_hidden_layers=1, seed=9), INT8)
    prompt = random_prompt(torch.Generator().manual_seed(10), 20, 60)
    outs = []
    for m, compile_ in ((eager, False), (compiled, True)):
        engine = tiny_engine(m, compile_layers=compile_)
        # One prompt (one prefill shape, then one-row decodes: the GEMV form); few shapes, short compiles.
        outs.append(token_ids(engine.run_until_done([request("r", prompt, max_new_tokens=5)])["r"]))
    assert outs[0] == outs[1]
