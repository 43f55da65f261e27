"""The language-model registry and what each architecture adds, on tiny random models (no kit needed):
choice by `llm_config.architectures`, checkpoint names (Phi-3's fused tensors, tied embeddings), the RoPE
variants against upstream's formulas, int8 finding every block linear, and the serving engine giving the
reference loop's tokens for each architecture, past the long-context RoPE limit included."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file

from services.common.model_config import InternVLConfig, LLMConfig, RopeScaling
from services.language_decoder.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams
from services.language_decoder.generate import generate
from services.language_decoder.models import (
    ARCHITECTURES,
    CausalLM,
    build_language_model,
    checkpoint_shapes,
    language_model_class,
    load_language_model,
)
from services.language_decoder.models.rope import Llama3RotaryEmbedding, LongRopeEmbedding
from services.language_decoder.quantize import Int8Linear, quantize_model

VOCAB = 97
HALF = 4  # head_dim 8 -> 4 rotary frequencies

PHI3_SCALING = RopeScaling(type="su", short_factor=(1.0, 1.1, 1.2, 1.3), long_factor=(1.0, 2.0, 4.0, 8.0))


def tiny(arch: str, **overrides) -> LLMConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=4096, architecture=arch)
    if arch == "Phi3ForCausalLM":
        base.update(rope_scaling=PHI3_SCALING, max_position_embeddings=512, original_max_position_embeddings=32)
    if arch == "InternLM2ForCausalLM":
        base.update(rope_scaling=RopeScaling("dynamic", 2.0))
    return LLMConfig(**{**base, **overrides})


def random_model(cfg: LLMConfig, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = build_language_model(cfg, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        model.embedding.weight.mul_(4.0)  # peaked logits: greedy ties far away
    return model.eval()


def test_unknown_architecture_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="supported: InternLM2ForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM"):
        language_model_class(tiny("MistralForCausalLM"))
    assert set(ARCHITECTURES) == {"InternLM2ForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "LlamaForCausalLM"}


def test_config_reads_architecture_and_every_rope_scaling_variant() -> None:
    raw = InternVLConfig.from_dir("tests/fixtures/parity/dev").to_dict()
    llm = raw["llm_config"]
    llm.update(architectures=["Phi3ForCausalLM"], original_max_position_embeddings=4096,
               rope_scaling={"type": "longrope", "short_factor": [1, 2], "long_factor": [3, 4]})
    cfg = InternVLConfig.from_dict(raw).llm
    assert cfg.architecture == "Phi3ForCausalLM" and cfg.original_max_position_embeddings == 4096
    assert cfg.rope_scaling == RopeScaling(type="longrope", short_factor=(1.0, 2.0), long_factor=(3.0, 4.0))
    llm.update(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
    assert InternVLConfig.from_dict(raw).llm.rope_scaling == RopeScaling(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    # and back: the writer's llm_config is read as the same config
    again = InternVLConfig.from_dict(InternVLConfig.from_dict(raw).to_dict())
    assert again.llm == InternVLConfig.from_dict(raw).llm


def test_module_names_biases_and_tied_head() -> None:
    names = set(checkpoint_shapes(tiny("Qwen2ForCausalLM")))
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias", "lm_head.weight"} <= names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    llama = set(checkpoint_shapes(tiny("LlamaForCausalLM")))
    assert not any(n.endswith(".bias") for n in llama)
    tied = build_language_model(tiny("Qwen2ForCausalLM", tie_word_embeddings=True), device="cpu")
    assert "lm_head.weight" not in tied.checkpoint_shapes()
    h = torch.randn(3, 32)
    torch.testing.assert_close(tied.logits(h), h @ tied.model.embed_tokens.weight.t())


def test_phi3_fused_checkpoint_tensors_split_into_plain_projections(tmp_path) -> None:
    cfg = tiny("Phi3ForCausalLM", num_key_value_heads=4)
    shapes = checkpoint_shapes(cfg)
    assert shapes["model.layers.1.self_attn.qkv_proj.weight"] == (3 * 32, 32)
    assert shapes["model.layers.1.mlp.gate_up_proj.weight"] == (2 * 64, 32)
    assert not any(n.endswith((".q_proj.weight", ".gate_proj.weight", ".up_proj.weight")) for n in shapes)
    model = random_model(cfg)
    fused = model.from_checkpoint("model.layers.1.self_attn.qkv_proj.weight", torch.arange(96 * 32.0).view(96, 32))
    assert [tuple(t.shape) for t in fused.values()] == [(32, 32)] * 3
    assert fused["model.layers.1.self_attn.k_proj.weight"][0, 0] == 32 * 32  # rows [q | k | v]

    # a checkpoint in the published layout loads into the split modules, int8 included
    sd = model.state_dict()
    stored = {}
    for name in shapes:
        if name.endswith("qkv_proj.weight"):
            p = name.removesuffix("qkv_proj.weight")
            stored[name] = torch.cat([sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]])
        elif name.endswith("gate_up_proj.weight"):
            p = name.removesuffix("gate_up_proj.weight")
            stored[name] = torch.cat([sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"]])
        else:
            stored[name] = sd[name]
    raw = InternVLConfig.from_dir("tests/fixtures/parity/dev").to_dict()
    raw["llm_config"] = InternVLConfig(vision=InternVLConfig.from_dir("tests/fixtures/parity/dev").vision,
                                       llm=cfg).to_dict()["llm_config"]
    import json

    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file({f"language_model.{k}": v.contiguous() for k, v in stored.items()}, tmp_path / "model.safetensors")
    loaded = load_language_model(tmp_path, dtype=torch.float32)
    assert type(loaded).__name__ == "Phi3ForCausalLM"
    for name, tensor in sd.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    int8 = load_language_model(tmp_path, dtype=torch.float32, quantize="int8")
    assert isinstance(int8.model.layers[0].self_attn.q_proj, Int8Linear)
    assert isinstance(int8.model.layers[0].mlp.up_proj, Int8Linear)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_int8_finds_every_block_linear(arch: str) -> None:
    model = quantize_model(random_model(tiny(arch)), "int8")
    linears = [m for m in model.model.layers[0].modules() if isinstance(m, (Int8Linear, torch.nn.Linear))]
    assert {type(m) for m in linears} == {Int8Linear}
    # InternLM2: wqkv wo w1 w2 w3; the others: q k v o gate up down
    assert len(linears) == (5 if arch == "InternLM2ForCausalLM" else 7)


def test_phi3_long_rope_matches_upstream_formula() -> None:
    cfg = tiny("Phi3ForCausalLM")
    rope = LongRopeEmbedding(cfg)
    dim, base = cfg.head_dim, cfg.rope_theta
    scale = math.sqrt(1 + math.log(512 / 32) / math.log(32))
    pos = torch.tensor([[0, 5, 31]])
    for seq_len, factors in ((32, PHI3_SCALING.short_factor), (33, PHI3_SCALING.long_factor)):
        ext = torch.tensor(factors, dtype=torch.float32)
        inv = 1.0 / (ext * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        freqs = (inv[None, :, None] @ pos[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = rope(pos, seq_len, torch.float32)
        torch.testing.assert_close(cos, emb.cos() * scale, rtol=0, atol=0)
        torch.testing.assert_close(sin, emb.sin() * scale, rtol=0, atol=0)
    # decode table: short factors below the original context, long ones from it on
    cos, _ = rope.decode_table(40, torch.float32, "cpu")
    torch.testing.assert_close(cos[31], rope(torch.tensor([[31]]), 32, torch.float32)[0][0, 0])
    torch.testing.assert_close(cos[35], rope(torch.tensor([[35]]), 36, torch.float32)[0][0, 0])
    with pytest.raises(ValueError, match="head_dim/2"):
        LongRopeEmbedding(dataclasses.replace(cfg, rope_scaling=dataclasses.replace(PHI3_SCALING, long_factor=(1.0,))))


def test_llama3_rope_frequencies() -> None:
    scaling = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64)
    cfg = tiny("LlamaForCausalLM", hidden_size=128, num_attention_heads=4, rope_scaling=scaling)  # head_dim 32
    rope = build_language_model(cfg, device="cpu").rotary
    assert isinstance(rope, Llama3RotaryEmbedding)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))
    wavelen = 2 * math.pi / plain
    for i, w in enumerate(wavelen.tolist()):
        if w < 64 / 4:  # high frequencies: unchanged
            assert rope.inv_freq[i] == plain[i]
        elif w > 64 / 1:  # low frequencies: divided by the factor
            torch.testing.assert_close(rope.inv_freq[i], plain[i] / 8)
        else:  # in between: a blend
            smooth = (64 / w - 1) / (4 - 1)
            torch.testing.assert_close(rope.inv_freq[i], (1 - smooth) * plain[i] / 8 + smooth * plain[i])
    assert (wavelen > 64).any() and (wavelen < 16).any()


def _reference(model: CausalLM, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        return generate(model, model.embed(ids), torch.ones_like(ids), max_new_tokens=max_new, eos_token_id=-1,
                        pad_token_id=0).token_ids[0]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_engine_matches_reference_loop(arch: str) -> None:
    """Batched, chunked, prefix-shared engine steps give each prompt's own greedy tokens. For Phi-3 the
    sequences cross its original context (32): RoPE switches to the long factors mid-decode, and one
    prompt starts past it."""
    model = random_model(tiny(arch, tie_word_embeddings=arch == "Qwen2ForCausalLM"))
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 20, 40, 12]
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    prompts[3] = prompts[1][:10] + prompts[3][:2]  # shares a prefix block with prompt 1
    engine = LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=256, max_num_seqs=4,
                                           max_num_batched_tokens=16, max_model_len=96))
    out = engine.run_until_done(
        EngineRequest(f"r{i}", p, SamplingParams(max_new_tokens=24)) for i, p in enumerate(prompts)
    )
    for i, p in enumerate(prompts):
        assert [t for o in out[f"r{i}"] for t in o.token_ids] == _reference(model, p, 24), i
    if arch == "Phi3ForCausalLM":  # past the limit RoPE depends on the sequence: no prefix reuse
        assert not engine.block_manager.enable_prefix_caching
        assert engine.runner.rope.decode_table is not None  # decode steps still use a table (CUDA graphs)


@pytest.mark.parametrize("arch", ["Phi3ForCausalLM", "LlamaForCausalLM"])
def test_cuda_graph_decode_body_runs_eagerly_on_cpu(arch: str) -> None:
    """The static-shape decode body the GPU captures, RoPE from the decode table: for Phi-3 decodes cross
    its original context, where the table switches to the long factors."""
    from services.language_decoder.engine.cuda_graphs import DecodeGraphs

    model = random_model(tiny(arch))
    engine = LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=256, max_num_seqs=3,
                                           max_num_batched_tokens=16, max_model_len=96))
    graphs = DecodeGraphs(model, engine.runner.kv_cache, engine.config, use_flash=False, capture=False,
                          rope=engine.runner.rope)
    engine.runner.graphs = graphs
    used = []
    run = graphs.run
    graphs.run = lambda decodes: used.append(len(decodes)) or run(decodes)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (6, 25, 14)]
    out = engine.run_until_done(
        EngineRequest(f"r{i}", p, SamplingParams(max_new_tokens=20)) for i, p in enumerate(prompts)
    )
    for i, p in enumerate(prompts):
        assert [t for o in out[f"r{i}"] for t in o.token_ids] == _reference(model, p, 20), i
    assert used


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Phi3ForCausalLM", "LlamaForCausalLM"])
def test_compiled_layers_give_the_eager_tokens(arch: str) -> None:
    """torch.compile'd layers (the GPU default) give each architecture's eager tokens (InternLM2's twin is
    in test_engine.py). One layer and few shapes keep Inductor's CPU compile to seconds per graph."""
    model = random_model(tiny(arch, num_hidden_layers=1))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (9, 30)]
    outs = []
    for compile_layers in (False, True):
        engine = LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=128, max_num_seqs=2,
                                               max_num_batched_tokens=64, max_model_len=64,
                                               compile_layers=compile_layers, cpu_prepacked_weights=False))
        out = engine.run_until_done(
            EngineRequest(f"r{i}", p, SamplingParams(max_new_tokens=6)) for i, p in enumerate(prompts))
        outs.append([[t for o in out[f"r{i}"] for t in o.token_ids] for i in range(len(prompts))])
    assert outs[0] == outs[1]
    assert all(callable(getattr(layer, "_compiled_call_impl", None)) for layer in model.model.layers)
