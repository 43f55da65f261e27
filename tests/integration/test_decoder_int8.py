"""A real decoder process started with `--quantize int8` on the dev kit: what it reports and what it answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from internvl.v1 import decoder_pb2, decoder_pb2_grpc, tensor_pb2
from services.common.fingerprint import model_fingerprint
from services.common.model_config import InternVLConfig
from tests.conftest import load_kit
from tests.integration.observe import Observed, json_logs, start_observed
from tests.integration.stack import model_args

KIT = load_kit()
CASE = KIT.chat_cases["text_single_round"]


def int8_weight_bytes() -> int:
    """Block linears at 1 byte per weight + an fp32 scale per output row; embedding, head, norms in fp32."""
    llm = InternVLConfig.from_dir(KIT.root).llm
    h, f, d = llm.hidden_size, llm.intermediate_size, llm.head_dim
    qkv = (llm.num_attention_heads + 2 * llm.num_key_value_heads) * d
    rows = {"wqkv": (qkv, h), "wo": (h, llm.num_attention_heads * d), "w1": (f, h), "w3": (f, h), "w2": (h, f)}
    block = sum(out * inp + 4 * out for out, inp in rows.values()) + 2 * 4 * h
    return llm.num_hidden_layers * block + 2 * 4 * llm.vocab_size * h + 4 * h


@pytest.fixture(scope="module")
def decoder() -> Iterator[Observed]:
    svc = start_observed("services.language_decoder", [*model_args(KIT.root), "--quantize", "int8"], log_level="INFO")
    yield svc
    svc.process.stop()


def test_model_info_says_int8_with_its_own_fingerprint_and_sizes(decoder: Observed) -> None:
    with decoder.process.channel() as channel:
        info = decoder_pb2_grpc.LanguageDecoderStub(channel).GetModelInfo(decoder_pb2.DecoderInfoRequest(), timeout=10)
    assert info.weight_quantization == decoder_pb2.WEIGHT_QUANTIZATION_INT8
    assert info.dtype == tensor_pb2.DTYPE_FLOAT32
    assert info.fingerprint == model_fingerprint(KIT.root, "fp32", "int8") != model_fingerprint(KIT.root, "fp32")
    assert info.weight_bytes == int8_weight_bytes()
    assert abs(info.kv_cache_bytes - (1 << 30)) < (1 << 30) // 100  # --cpu-kv-cache-mib's default, in blocks
    logs = [e["message"] for e in json_logs(decoder.logs())]
    start = next(m for m in logs if m.startswith("language model weights:"))
    assert "int8 decoder blocks" in start and "KV cache:" in start


def test_int8_decoder_answers_the_kit_question_with_upstreams_greedy_tokens(decoder: Observed) -> None:
    """On the dev kit int8 weights keep every greedy token of this case (docs/benchmarks.md, quality)."""
    setup = decoder_pb2.GenerateSetup(
        conversation=decoder_pb2.Conversation(question=CASE["inputs"]["question"]),
        sampling=decoder_pb2.SamplingParams(max_new_tokens=CASE["inputs"]["effective_generate_kwargs"]["max_new_tokens"]),
    )
    with decoder.process.channel() as channel:
        replies = list(decoder_pb2_grpc.LanguageDecoderStub(channel).Generate(
            iter([decoder_pb2.GenerateRequest(setup=setup)]), timeout=60))
    tokens = [t for r in replies for t in r.token_ids]
    assert tokens == CASE["expected"]["generated_ids"][0]
    assert replies[-1].finish_reason == decoder_pb2.FINISH_REASON_LENGTH
