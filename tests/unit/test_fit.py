"""The start-up fit check: what each InternVL2 member needs (services/common/fit.py) and the services'
refusal, before reading a weight, when the device cannot hold it.

The members' numbers come from their real configs (tests/fixtures/real_configs) with weights counted on
the meta device; the byte rules are checked against real loads of the tiny kits (quantize.py's own
`weight_bytes` of a loaded model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from services.common.device_memory import cpu_memory
from services.common.fit import (
    DeviceMemory,
    GiB,
    LanguageWeights,
    ModelDoesNotFit,
    Need,
    check_fits,
    encoder_activation_bytes,
    kv_bytes_per_token,
    usable_bytes,
)
from services.common.model_config import InternVLConfig
from services.common.quantization import INT8, NO_QUANTIZATION
from services.language_decoder.config import DecoderConfig
from services.language_decoder.engine.kv_cache import bytes_per_block
from services.language_decoder.footprint import language_weights
from services.language_decoder.model import load_language_model
from services.language_decoder.quantize import weight_bytes
from services.language_decoder.servicer import DecoderRuntime
from services.tools.member_sizes import Defaults, gpu, member_needs, one_gpu
from services.vision_encoder.config import EncoderConfig
from services.vision_encoder.footprint import vision_parameters
from services.vision_encoder.model import load_vision_encoder
from services.vision_encoder.servicer import ModelRuntime
from tests.kits import fixture_kit

REAL_CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "real_configs"
MiB = 1 << 20
GB80 = 81_559 * MiB  # an A100/H100 80 GB card as mem_get_info reports it
GB141 = 143_771 * MiB  # an H200


def real(member: str) -> tuple[str, InternVLConfig]:
    raw = json.loads((REAL_CONFIGS / f"{member}.json").read_text(encoding="utf-8"))
    return raw["_name"], InternVLConfig.from_dict(raw)


def one_gpu_fits(member: str, quantize: str, total: int) -> bool:
    d = Defaults()
    return one_gpu(member_needs(*real(member)), quantize, d).fits(gpu("card", total, 2, d.gpu_memory_utilization))


# ---------------------------------------------------------------------------------------------
# The byte rules


def test_kv_bytes_per_token_of_real_members():
    # layers x kv heads x head dim x (K and V) x 2 bytes
    assert kv_bytes_per_token(real("internvl2-8b")[1].llm, 2) == 32 * 8 * 128 * 2 * 2 == 128 * 1024
    assert kv_bytes_per_token(real("internvl2-26b")[1].llm, 2) == 48 * 8 * 128 * 2 * 2
    assert kv_bytes_per_token(real("internvl2-llama3-76b")[1].llm, 2) == 80 * 8 * 128 * 2 * 2
    assert kv_bytes_per_token(real("internvl2-1b")[1].llm, 4) == 24 * 2 * 64 * 2 * 4
    # the engine's block size uses the same rule
    llm = real("internvl2-2b")[1].llm
    assert bytes_per_block(llm, 16, torch.bfloat16) == 16 * kv_bytes_per_token(llm, 2)


def test_language_weights_split():
    weights = LanguageWeights(block_linear=1000, block_linear_rows=10, other_linear=200, other=50)
    assert weights.parameters == 1250
    assert weights.bytes(2, NO_QUANTIZATION) == 2500
    assert weights.bytes(4, NO_QUANTIZATION) == 5000
    assert weights.bytes(2, INT8) == 1000 + (10 + 200 + 50) * 2
    assert weights.cpu_prepacked_copy_bytes(NO_QUANTIZATION) == 1200 * 4
    assert weights.cpu_prepacked_copy_bytes(INT8) == 200 * 4
    with pytest.raises(ValueError, match="int4"):
        weights.bytes(2, "int4")


@pytest.mark.parametrize("kit_name", ["dev", "internvl2-26b"])
@pytest.mark.parametrize(("dtype", "quantize"), [
    (torch.bfloat16, NO_QUANTIZATION), (torch.float32, NO_QUANTIZATION), (torch.bfloat16, INT8)])
def test_weight_bytes_are_what_a_load_holds(kit_name, dtype, quantize):
    """The meta-device count gives exactly the bytes of a real load (quantize.py's int8 rule included)."""
    root = fixture_kit(kit_name).root
    cfg = InternVLConfig.from_dir(root)
    model = load_language_model(root, dtype=dtype, quantize=quantize)
    size = torch.empty((), dtype=dtype).element_size()
    assert language_weights(cfg.llm).bytes(size, quantize) == weight_bytes(model)
    encoder = load_vision_encoder(root, dtype=dtype)
    assert vision_parameters(cfg) * size == weight_bytes(encoder)


def test_encoder_activations_grow_with_tiles():
    vision = real("internvl2-26b")[1].vision
    one = encoder_activation_bytes(vision, 1, 2)
    assert one == 1025 * (6 * 3200 + 12800) * 2
    assert encoder_activation_bytes(vision, 32, 2) == 32 * one


def test_usable_bytes_leaves_the_utilization_share():
    assert usable_bytes(free=80 * GiB, total=80 * GiB, utilization=0.9) == 72 * GiB
    assert usable_bytes(free=50 * GiB, total=80 * GiB, utilization=0.9) == 42 * GiB


# ---------------------------------------------------------------------------------------------
# The members (issue #18: 26B bf16 ~51 GB fits an 80 GB GPU; 40B and 76B do not in bf16; 76B int8 fits 141 GB)


def test_26b_weighs_about_51_gb_in_bf16():
    member = member_needs(*real("internvl2-26b"))
    assert 50.5e9 < member.vision_bytes() + member.language_bytes(NO_QUANTIZATION) < 51.5e9


def test_26b_bf16_fits_one_80_gb_gpu():
    assert one_gpu_fits("internvl2-26b", NO_QUANTIZATION, GB80)


@pytest.mark.parametrize("member", ["internvl2-40b", "internvl2-llama3-76b"])
def test_40b_and_76b_bf16_do_not_fit_one_80_gb_gpu(member):
    assert not one_gpu_fits(member, NO_QUANTIZATION, GB80)


def test_76b_fits_one_141_gb_gpu_in_int8_only():
    assert one_gpu_fits("internvl2-llama3-76b", INT8, GB141)
    assert not one_gpu_fits("internvl2-llama3-76b", NO_QUANTIZATION, GB141)
    assert not one_gpu_fits("internvl2-llama3-76b", INT8, GB80)


def test_40b_decoder_alone_fits_an_80_gb_gpu_in_bf16():
    """Two 80 GB GPUs serve the 40B in bf16: the encoder on one, the decoder on the other."""
    d = Defaults()
    need = member_needs(*real("internvl2-40b")).decoder_need(NO_QUANTIZATION, d.max_model_len, d.activation_reserve)
    assert need.fits(gpu("card", GB80, 1, d.gpu_memory_utilization))


def test_the_refusal_says_what_is_needed_what_there_is_and_what_to_do():
    need = Need("X language model", (("weights (bf16)", 100 * GiB), ("KV cache for 8192 tokens", 2 * GiB)))
    memory = DeviceMemory("cuda:0", free=79 * GiB, total=80 * GiB, usable=71 * GiB, source="probe")
    check_fits(need, DeviceMemory("cuda:0", 200 * GiB, 200 * GiB, 180 * GiB, "probe"), ["never shown"])
    check_fits(need, None, ["never shown"])  # a device that is not checked
    with pytest.raises(ModelDoesNotFit) as caught:
        check_fits(need, memory, ["--quantize int8", "a bigger GPU"])
    assert str(caught.value) == (
        "X language model does not fit cuda:0: it needs 102.0 GiB (100.0 GiB weights (bf16) + 2.0 GiB KV cache "
        "for 8192 tokens), the device has 71.0 GiB usable (79.0 GiB free of 80.0 GiB; probe). To serve it: "
        "--quantize int8; or a bigger GPU.")


# ---------------------------------------------------------------------------------------------
# The services' start path, with the device's memory given (the real probe is the default)


def checkpoint_without_weights(tmp_path: Path, member: str) -> Path:
    """A directory holding only a member's config.json: a start that reads any weight fails differently."""
    name, _ = real(member)
    root = tmp_path / name
    root.mkdir()
    shutil.copy(REAL_CONFIGS / f"{member}.json", root / "config.json")
    return root


def test_decoder_refuses_76b_bf16_on_an_80_gb_gpu(tmp_path):
    root = checkpoint_without_weights(tmp_path, "internvl2-llama3-76b")
    card = DeviceMemory("cuda:0", free=GB80 - 512 * MiB, total=GB80, usable=usable_bytes(GB80 - 512 * MiB, GB80, 0.9),
                        source="given")
    with pytest.raises(ModelDoesNotFit) as caught:
        DecoderRuntime.load(DecoderConfig(model=str(root), device="cuda:0"), memory=card)
    message = str(caught.value)
    assert message.startswith("InternVL2-Llama3-76B language model does not fit cuda:0: it needs 136.9 GiB "
                              "(131.4 GiB weights (bf16) + 2.5 GiB KV cache for 8192 tokens + 3.0 GiB activation "
                              "reserve), the device has 71.2 GiB usable"), message
    assert "--quantize int8 (int8 decoder-block weights: 73.2 GiB in all, still too much)" in message
    assert "a GPU with 136.9 GiB usable" in message
    assert message.endswith("Splitting one language model across several GPUs (tensor parallelism) is not "
                            "supported yet.")


def test_decoder_start_suggests_int8_when_int8_fits(tmp_path):
    root = checkpoint_without_weights(tmp_path, "internvl2-llama3-76b")
    card = DeviceMemory("cuda:0", free=GB141 - 512 * MiB, total=GB141,
                        usable=usable_bytes(GB141 - 512 * MiB, GB141, 0.9), source="given")
    with pytest.raises(ModelDoesNotFit, match=r"--quantize int8 \(int8 decoder-block weights: 73\.2 GiB in all, "
                                               r"which fits\)"):
        DecoderRuntime.load(DecoderConfig(model=str(root), device="cuda:0"), memory=card)


def test_decoder_that_fits_goes_on_to_read_the_weights(tmp_path):
    """26B in bf16 fits the 80 GB card: the check passes and the load then looks for the weights."""
    root = checkpoint_without_weights(tmp_path, "internvl2-26b")
    card = DeviceMemory("cpu", free=GB80, total=GB80, usable=GB80, source="given")
    with pytest.raises(Exception, match="has neither model.safetensors nor model.safetensors.index.json"):
        DecoderRuntime.load(DecoderConfig(model=str(root), device="cpu", dtype="bf16"), memory=card)


def test_decoder_on_cpu_counts_fp32_and_the_prepacked_copy(tmp_path):
    root = checkpoint_without_weights(tmp_path, "internvl2-8b")
    ram = DeviceMemory("cpu", free=32 * GiB, total=64 * GiB, usable=32 * GiB, source="given")
    with pytest.raises(ModelDoesNotFit) as caught:
        DecoderRuntime.load(DecoderConfig(model=str(root), device="cpu"), memory=ram)
    message = str(caught.value)
    assert "28.8 GiB weights (fp32)" in message and "prepacked copy of the linear weights" in message
    assert "--dtype bf16" in message and "--no-cpu-prepacked-weights" in message


def test_encoder_refuses_a_tower_that_does_not_fit(tmp_path):
    root = checkpoint_without_weights(tmp_path, "internvl2-26b")
    card = DeviceMemory("cuda:1", free=8 * GiB, total=8 * GiB, usable=8 * GiB, source="given")
    with pytest.raises(ModelDoesNotFit) as caught:
        ModelRuntime.load(EncoderConfig(model=str(root), device="cuda:1", dtype="bf16"), memory=card)
    message = str(caught.value)
    assert message.startswith("InternVL2-26B vision encoder does not fit cuda:1: it needs 12.5 GiB "
                              "(10.5 GiB weights (bf16) + 2.0 GiB activations of a 32-tile batch)"), message
    assert "a smaller --max-batch-tiles" in message


def test_cpu_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:   32768000 kB\n")
    ram = cpu_memory(meminfo)
    assert (ram.device, ram.total, ram.free, ram.usable) == ("cpu", 65536000 * 1024, 32768000 * 1024, 32768000 * 1024)
    assert cpu_memory(tmp_path / "missing") is None
    meminfo.write_text("MemTotal: 1 kB\n")  # no MemAvailable (kernels before 3.14)
    assert cpu_memory(meminfo) is None
