"""InternLM2 building blocks and the generation loop, on tiny hand-made inputs and random weights."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from services.common.model_config import LLMConfig, RopeScaling
from services.language_decoder import model as lm_module
from services.language_decoder import models as models_package
from services.language_decoder.generate import generate
from services.language_decoder.model import (
    InternLM2ForCausalLM,
    RotaryEmbedding,
    load_language_model,
    position_ids_from_mask,
    split_wqkv,
)
from services.language_decoder.sampling import process_logits, sample
from tests.conftest import Kit

PAD = 2


def tiny_config(**overrides) -> LLMConfig:
    base = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, rope_scaling=RopeScaling("dynamic", 2.0),
        max_position_embeddings=64,
    )
    return LLMConfig(**{**base, **overrides})


def tiny_model(cfg: LLMConfig | None = None, seed: int = 0) -> InternLM2ForCausalLM:
    torch.manual_seed(seed)
    model = InternLM2ForCausalLM(cfg or tiny_config()).eval()
    with torch.no_grad():  # larger embeddings so attention patterns and logits are far from uniform
        model.model.tok_embeddings.weight.mul_(4.0)
    return model


def full_mask(b: int, t: int) -> torch.Tensor:
    return torch.ones(b, t, dtype=torch.long)


# ----------------------------------------------------------------------------- fused wqkv layout


def test_wqkv_split_is_interleaved_per_kv_group() -> None:
    heads, kv_heads, d = 4, 2, 3
    group = heads // kv_heads
    # Row label = 100 * kv_group + 10 * slot + dim, slots 0..group-1 = queries, group = key, group+1 = value.
    labels = [100 * g + 10 * s + i for g in range(kv_heads) for s in range(group + 2) for i in range(d)]
    qkv = torch.tensor(labels, dtype=torch.float32).view(1, 1, -1)
    q, k, v = split_wqkv(qkv, heads, kv_heads, d)
    assert q.shape == (1, 1, heads, d) and k.shape == v.shape == (1, 1, kv_heads, d)
    for h in range(heads):  # query head h is query slot h % group of kv group h // group
        assert q[0, 0, h].tolist() == [100 * (h // group) + 10 * (h % group) + i for i in range(d)]
    for g in range(kv_heads):
        assert k[0, 0, g].tolist() == [100 * g + 10 * group + i for i in range(d)]
        assert v[0, 0, g].tolist() == [100 * g + 10 * (group + 1) + i for i in range(d)]


# ----------------------------------------------------------------------------- RoPE / dynamic NTK


class UpstreamDynamicNTK:
    """The stateful cos/sin cache of upstream's InternLM2DynamicNTKScalingRotaryEmbedding, for comparison."""

    def __init__(self, dim: int, max_pos: int, base: float, factor: float) -> None:
        self.dim, self.max_pos, self.base, self.factor = dim, max_pos, base, factor
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self._set_cache(max_pos)

    def _set_cache(self, seq_len: int) -> None:
        self.cached = seq_len
        if seq_len > self.max_pos:
            base = self.base * ((self.factor * seq_len / self.max_pos) - (self.factor - 1)) ** (
                self.dim / (self.dim - 2)
            )
            self.inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2).float() / self.dim))
        t = torch.arange(seq_len).float()
        emb = torch.cat([torch.einsum("i,j->ij", t, self.inv_freq)] * 2, dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def __call__(self, kv_seq_len: int, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if kv_seq_len > self.cached:
            self._set_cache(kv_seq_len)
        return self.cos[:kv_seq_len][position_ids], self.sin[:kv_seq_len][position_ids]


def test_rope_base_switches_above_max_position_embeddings() -> None:
    cfg = tiny_config(max_position_embeddings=8, hidden_size=64, num_attention_heads=4)  # head_dim 16
    rope = RotaryEmbedding(cfg)
    dim = cfg.head_dim
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    torch.testing.assert_close(rope.inv_freq_for(8).double(), plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(rope.inv_freq_for(1).double(), plain, rtol=1e-6, atol=0)
    # seq_len 20 > 8: base = theta * ((2 * 20 / 8) - 1) ** (16 / 14)
    scaled_base = cfg.rope_theta * 4.0 ** (dim / (dim - 2))
    scaled = 1.0 / (scaled_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    torch.testing.assert_close(rope.inv_freq_for(20).double(), scaled, rtol=1e-6, atol=0)
    assert not torch.allclose(rope.inv_freq_for(9), rope.inv_freq_for(8))
    # no scaling configured: never switches
    no_scaling = RotaryEmbedding(dataclasses.replace(cfg, rope_scaling=None))
    torch.testing.assert_close(no_scaling.inv_freq_for(10_000).double(), plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("prefill_len", [5, 8, 13])
def test_rope_per_forward_semantics_equal_fresh_upstream(prefill_len: int) -> None:
    """Prefill then decode across max_position_embeddings: same cos/sin as a fresh upstream model."""
    cfg = tiny_config(max_position_embeddings=8)
    ours = RotaryEmbedding(cfg)
    upstream = UpstreamDynamicNTK(cfg.head_dim, 8, cfg.rope_theta, 2.0)
    calls = [(prefill_len, torch.arange(prefill_len)[None])]
    calls += [(n, torch.tensor([[n - 1]])) for n in range(prefill_len + 1, 20)]
    for kv_len, pos in calls:
        cos, sin = ours(pos, kv_len, torch.float32)
        ref_cos, ref_sin = upstream(kv_len, pos)
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)
    # Upstream's table never shrinks, so a later short request would reuse the scaled base there;
    # we deliberately match a *fresh* upstream model instead.
    cos, _ = ours(torch.arange(4)[None], 4, torch.float32)
    fresh_cos, _ = UpstreamDynamicNTK(cfg.head_dim, 8, cfg.rope_theta, 2.0)(4, torch.arange(4)[None])
    torch.testing.assert_close(cos, fresh_cos)


def test_model_rotates_with_the_key_length_of_each_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The NTK base follows each forward's past + new slots (padding included), like upstream's kv_seq_len."""
    model = tiny_model(tiny_config(max_position_embeddings=8))
    seen: list[int] = []
    real = model.rotary.forward

    def spy(pos: torch.Tensor, seq_len: int, dtype: torch.dtype):
        seen.append(seq_len)
        return real(pos, seq_len, dtype)

    monkeypatch.setattr(model.rotary, "forward", spy)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    generate(model, model.embed(ids), mask, max_new_tokens=6, eos_token_id=-1, pad_token_id=PAD)
    assert seen == [6, 7, 8, 9, 10, 11]


def test_model_uses_scaled_rope_only_above_max_position_embeddings() -> None:
    cfg = tiny_config(max_position_embeddings=8)
    scaled = tiny_model(cfg)
    unscaled = InternLM2ForCausalLM(dataclasses.replace(cfg, rope_scaling=None)).eval()
    unscaled.load_state_dict(scaled.state_dict())
    ids = torch.randint(3, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for n, same in ((8, True), (12, False)):
            emb = scaled.embed(ids[:, :n])
            pos = torch.arange(n)[None]
            a, b = scaled(emb, pos), unscaled(emb, pos)
            assert torch.allclose(a, b, atol=1e-6) == same, f"length {n}"


# ----------------------------------------------------------------------------- KV cache and padding


def test_kv_cache_decode_equals_full_recompute() -> None:
    model = tiny_model()
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        emb = model.embed(ids)
        pos = torch.arange(11).expand(2, 11)
        full = model(emb, pos)
        cache = model.new_kv_cache(2, 16)
        pieces = [model(emb[:, :4], pos[:, :4], cache)]  # prefill (causal fast path)
        pieces.append(model(emb[:, 4:7], pos[:, 4:7], cache))  # chunk after a past (explicit mask)
        for i in range(7, 11):  # one token at a time
            pieces.append(model(emb[:, i : i + 1], pos[:, i : i + 1], cache))
    assert cache.seq_len == 11
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=2e-5)


def test_kv_cache_overflow_raises() -> None:
    model = tiny_model()
    cache = model.new_kv_cache(1, 4)
    with torch.inference_mode(), pytest.raises(ValueError, match="overflow"):
        model(model.embed(torch.ones(1, 5, dtype=torch.long)), torch.arange(5)[None], cache)


def test_attention_mask_never_masks_a_whole_row() -> None:
    """Pad queries may see their own slot only, so no row is all -inf (NaN in some SDPA kernels)."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    allowed, is_causal = lm_module.build_attention_mask(mask, 4, 0, torch.device("cpu"))
    assert not is_causal and allowed.shape == (2, 1, 4, 4)
    assert allowed[0, 0].tolist() == [
        [True, False, False, False],
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]
    assert allowed[1, 0].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    decode, _ = lm_module.build_attention_mask(torch.tensor([[0, 1, 1]]), 1, 2, torch.device("cpu"))
    assert decode[0, 0].tolist() == [[False, True, True]]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_position_ids_from_mask_matches_upstream_rule() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_left_padded_batch_equals_each_row_alone() -> None:
    model = tiny_model()
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (9, 4, 6)]
    ids, mask = left_pad(rows)
    with torch.inference_mode():
        batch_logits = model(model.embed(ids), position_ids_from_mask(mask), attention_mask=mask)
        assert torch.isfinite(batch_logits).all()
        for b, row in enumerate(rows):
            alone = model(model.embed(torch.tensor([row])), torch.arange(len(row))[None])
            torch.testing.assert_close(batch_logits[b, -len(row) :], alone[0], rtol=0, atol=2e-5)

    # Generation: pick an EOS that the shortest row emits early, so a row finishes and gets pads.
    kw = dict(max_new_tokens=8, pad_token_id=PAD, return_step_logits=True)

    def alone(row: list[int], eos: int):
        emb = model.embed(torch.tensor([row]))
        return generate(model, emb, full_mask(1, len(row)), eos_token_id=eos, **kw)

    eos = alone(rows[1], -1).token_ids[0][2]
    alone_outs = [alone(r, eos) for r in rows]
    batch = generate(model, model.embed(ids), mask, eos_token_id=eos, **kw)
    assert batch.sequences.shape[1] == max(o.sequences.shape[1] for o in alone_outs)
    assert any(o.finished[0] and o.sequences.shape[1] < batch.sequences.shape[1] for o in alone_outs)
    for b, out in enumerate(alone_outs):
        n = out.sequences.shape[1]
        assert batch.token_ids[b][:n] == out.token_ids[0]
        assert batch.token_ids[b][n:] == [PAD] * (batch.sequences.shape[1] - n)  # finished rows get pad
        assert batch.finished[b] == out.finished[0]
        torch.testing.assert_close(batch.step_logits[:n, b], out.step_logits[:, 0], rtol=0, atol=2e-5)


def test_generate_stops_when_all_rows_finished() -> None:
    model = tiny_model()
    emb = model.embed(torch.tensor([[5, 6, 7]]))
    first = generate(model, emb, full_mask(1, 3), max_new_tokens=5, eos_token_id=-1, pad_token_id=PAD)
    assert first.sequences.shape == (1, 5) and first.finished == [False]
    eos = first.token_ids[0][0]
    out = generate(model, emb, full_mask(1, 3), max_new_tokens=5, eos_token_id=[-1, eos], pad_token_id=PAD)
    assert out.token_ids == [[eos]] and out.finished == [True]


# ----------------------------------------------------------------------------- embedding of image rows


def test_embed_places_image_rows_in_order() -> None:
    model = tiny_model()
    ctx = 50
    ids = torch.tensor([[1, ctx, ctx, 7], [ctx, 8, 9, ctx]])
    rows = torch.arange(4 * 32, dtype=torch.float32).view(4, 32)
    with torch.inference_mode():
        out = model.embed(ids, rows, ctx)
        tok = model.model.tok_embeddings(ids)
    expected = tok.clone()
    expected[0, 1], expected[0, 2], expected[1, 0], expected[1, 3] = rows  # row-major order
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        model.embed(ids, rows[:3], ctx)
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        model.embed(ids, None, ctx)


# ----------------------------------------------------------------------------- sampler


def test_repetition_penalty_hf_rule() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    prev = torch.tensor([[0, 1, 1]])
    out = process_logits(logits, repetition_penalty=2.0, prev_tokens=prev)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # positive / penalty, negative * penalty, once per token
    # greedy decisions see the penalty too (HF treats it as a processor, not a warper)
    penalised = sample(torch.tensor([[3.0, 2.0]]), repetition_penalty=2.0, prev_tokens=torch.tensor([[0]]))
    assert penalised.tolist() == [1]
    assert sample(torch.tensor([[3.0, 2.0]])).tolist() == [0]


def test_temperature_and_top_k() -> None:
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    assert process_logits(logits, do_sample=True, temperature=2.0).tolist() == [[0.5, 2.0, 1.0, 1.5]]
    inf = float("-inf")
    assert process_logits(logits, do_sample=True, top_k=2).tolist() == [[inf, 4.0, inf, 3.0]]
    assert process_logits(logits, do_sample=True, top_k=10).tolist() == logits.tolist()
    # greedy ignores the warpers
    assert process_logits(logits, do_sample=False, temperature=0.5, top_k=1).tolist() == logits.tolist()


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda **kw: torch.isfinite(process_logits(logits, do_sample=True, **kw))[0].tolist()  # noqa: E731
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.05 + 0.15 <= 0.3 dropped
    assert kept(top_p=0.9) == [True, True, True, False]
    assert kept(top_p=0.01) == [True, False, False, False]  # always keeps at least one token
    # HF order: top-k first, then top-p on the renormalised survivors (0.526, 0.316, 0.158)
    assert kept(top_k=3, top_p=0.8) == [True, True, False, False]


def test_sampling_is_seeded_and_respects_filters() -> None:
    logits = torch.zeros(4, 1000)
    draw = lambda seed, **kw: sample(  # noqa: E731
        logits, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw
    )
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    peaked = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).expand(200, 4)
    picks = sample(peaked, do_sample=True, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2}
    picks = sample(peaked, do_sample=True, temperature=1e-3, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1}


def test_generate_sampling_reproducible_and_top_k1_is_greedy() -> None:
    model = tiny_model()
    emb = model.embed(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]))
    mask = full_mask(2, 4)
    kw = dict(max_new_tokens=10, eos_token_id=-1, pad_token_id=PAD)
    run = lambda seed, **extra: generate(  # noqa: E731
        model, emb, mask, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw, **extra
    ).token_ids
    assert run(11, temperature=1.5) == run(11, temperature=1.5)
    assert run(11, temperature=3.0) != run(12, temperature=3.0)
    assert run(11, top_k=1) == generate(model, emb, mask, **kw).token_ids


# ----------------------------------------------------------------------------- loading


def test_load_reads_only_language_tensors(kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, ...]] = []
    real = models_package.load_tensors  # the loader reads through the models package's import

    def spy(model_dir, prefixes, **kw):
        seen.append(tuple(prefixes))
        tensors = real(model_dir, prefixes, **kw)
        assert not any(name.startswith(("vision_model.", "mlp1.")) for name in tensors)
        return tensors

    monkeypatch.setattr(models_package, "load_tensors", spy)
    model = load_language_model(kit.root, dtype=torch.float32)
    assert seen == [("language_model.",)]
    assert all(not p.is_meta and p.dtype == torch.float32 for p in model.parameters())
    assert model.rotary.inv_freq.device.type == "cpu" and model.rotary.inv_freq.dtype == torch.float32
    dim = model.config.head_dim
    expected = 1.0 / (model.config.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
    torch.testing.assert_close(model.rotary.inv_freq, expected, rtol=0, atol=0)
    assert math.isclose(model.model.norm.eps, model.config.rms_norm_eps)
