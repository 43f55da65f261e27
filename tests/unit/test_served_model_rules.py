"""Several models behind one gateway: the --model specs, and what each service says it serves
(family member, the vision identity the feature cache keys on)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.core import ChatError, ErrorKind
from gateway.model_specs import ModelSpec, parse_model_specs
from gateway.models import ServedModel, ServedModels
from services.common.fingerprint import model_fingerprint
from services.common.model_identity import CUSTOM_MEMBER, family_member, model_name, vision_fingerprint
from services.tools.make_tiny_checkpoint import write_tiny_checkpoint


def test_model_specs():
    specs = parse_model_specs(["small=10.0.0.1:1,10.0.0.2:1@10.0.0.9:2", "big=dns:///big-decoder:50053"],
                              default_encoder="enc:50052")
    assert specs == (ModelSpec("small", "10.0.0.1:1,10.0.0.2:1", "10.0.0.9:2"),
                     ModelSpec("big", "dns:///big-decoder:50053", "enc:50052"))


@pytest.mark.parametrize(("values", "message"), [
    (["small"], "NAME=DECODERS"),
    (["small="], "NAME=DECODERS"),
    (["=dec:1"], "the name"),
    (["a b=dec:1"], "the name"),
    (["small=@enc:2"], "no decoder target"),
    (["a=dec:1", "a=dec:2"], "repeated: a"),
])
def test_bad_model_specs_say_what_to_fix(values, message):
    with pytest.raises(ValueError, match=message):
        parse_model_specs(values, default_encoder="enc:50052")


def _config(arch: str, llm_hidden: int, layers: int, vision_hidden: int) -> dict:
    return {"llm_config": {"architectures": [arch], "hidden_size": llm_hidden, "num_hidden_layers": layers},
            "vision_config": {"hidden_size": vision_hidden}}


@pytest.mark.parametrize(("config", "member"), [
    (_config("InternLM2ForCausalLM", 4096, 32, 1024), "InternVL2-8B"),
    (_config("Qwen2ForCausalLM", 896, 24, 1024), "InternVL2-1B"),
    (_config("Phi3ForCausalLM", 3072, 32, 1024), "InternVL2-4B"),
    (_config("InternLM2ForCausalLM", 6144, 48, 3200), "InternVL2-26B"),
    (_config("LlamaForCausalLM", 8192, 80, 3200), "InternVL2-Llama3-76B"),
    (_config("InternLM2ForCausalLM", 64, 2, 64), CUSTOM_MEMBER),  # a tiny test checkpoint
    ({}, CUSTOM_MEMBER),
])
def test_family_member_comes_from_the_architecture(config, member):
    assert family_member(config) == member


def test_model_name_is_the_checkpoints_last_part():
    assert model_name("/models/InternVL2-8B/") == "InternVL2-8B"
    assert model_name("OpenGVLab/InternVL2-1B") == "InternVL2-1B"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("members")
    return {
        "base": write_tiny_checkpoint(root / "base"),
        # Same tower and projector (same seed, same LLM width), a deeper language model.
        "deeper": write_tiny_checkpoint(root / "deeper", llm_layers=3),
        # Same seed and tower, another LLM width: mlp1 projects to another size.
        "wider": write_tiny_checkpoint(root / "wider", llm_hidden=96, llm_ffn=192),
        "sharded": write_tiny_checkpoint(root / "sharded", shards=3),
        "reseeded": write_tiny_checkpoint(root / "reseeded", seed=1),
    }


def test_vision_identity_is_shared_exactly_when_the_encoders_compute_the_same_features(checkpoints):
    tower = {name: vision_fingerprint(path, "fp32") for name, path in checkpoints.items()}
    whole = {name: model_fingerprint(path, "fp32") for name, path in checkpoints.items()}
    assert whole["base"] != whole["deeper"]  # different checkpoints...
    assert tower["base"] == tower["deeper"]  # ...whose encoders compute the same features: shared
    assert tower["base"] == tower["sharded"]  # the same tensors sharded otherwise
    assert tower["base"] != tower["wider"]  # mlp1 projects to another width
    assert tower["base"] != tower["reseeded"]  # other weights (a fine-tune)
    assert tower["base"] != vision_fingerprint(checkpoints["base"], "bf16")  # other dtype, other numbers
    config = json.loads((checkpoints["base"] / "config.json").read_text())
    assert family_member(config) == CUSTOM_MEMBER


def test_served_models_pick_by_name_and_refuse_unknown_ones():
    small, wide = object(), object()  # named models never ask their core anything
    models = ServedModels([ServedModel("small", small), ServedModel("wide", wide)])

    async def main():
        assert await models.names() == ["small", "wide"]
        assert await models.core_for("") is small  # gRPC: an empty model is the default, the first
        assert await models.core_for("wide") is wide
        assert await models.find("") is None  # OpenAI: the model must name one
        with pytest.raises(ChatError) as err:
            await models.core_for("huge")
        assert err.value.kind is ErrorKind.NOT_FOUND and err.value.param == "model"
        assert "'huge'" in err.value.message and "'small', 'wide'" in err.value.message

    asyncio.run(main())
    with pytest.raises(ValueError, match="at least one model"):
        ServedModels([])
