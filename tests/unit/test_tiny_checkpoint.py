"""The tiny random-weight checkpoint writer and the Hub layout it shares with the real InternVL2-8B.

Single-file and sharded checkpoints load through the services' own loaders with identical tensors;
each half opens only the shards holding its tensors; the tokenizer works; broken checkpoints fail
with `CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import services.common.checkpoint as checkpoint
from services.common.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, resolve_model_dir
from services.common.model_config import InternVLConfig
from services.language_decoder.model import load_language_model
from services.tools.make_tiny_checkpoint import (
    DEFAULT_SP_VOCAB,
    INTERNVL_TOKENS,
    RELABELLED,
    UNUSED_PIECES,
    main,
    shard_names,
    write_tiny_checkpoint,
)
from services.vision_encoder.model import load_vision_encoder
from tests.conftest import DEFAULT_KIT, Kit

SHARDS = 3
VISION = ("vision_model.", "mlp1.")
LLM = "language_model."


@pytest.fixture(scope="module")
def kit() -> Kit:
    """The repo's dev kit, whatever PARITY_KIT names: the tiny checkpoint mirrors the InternVL2-8B layout,
    and the dev kit is that layout's reference (a family kit such as internvl2-1b is another architecture)."""
    return Kit(DEFAULT_KIT)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("single"), seed=7)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sharded"), shards=SHARDS, seed=7)


def weight_map(model_dir: Path) -> dict[str, str]:
    return json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]


def file_digests(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


# ---------------------------------------------------------------------------------------------
# Layout


def test_single_file_layout(single):
    names = {p.name for p in single.iterdir()}
    assert names == {
        "config.json", "generation_config.json", SINGLE_FILE, "tokenizer.model", "tokenizer_config.json",
        "special_tokens_map.json", "added_tokens.json",
    }
    with safe_open(single / SINGLE_FILE, framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert len(keys) == 55  # the same tensor set as the dev kit (2 + 2 layers)


def test_sharded_layout_is_what_the_hub_serves(sharded, single):
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert set(index) == {"metadata", "weight_map"}
    files = [f"model-{k:05d}-of-{SHARDS:05d}.safetensors" for k in range(1, SHARDS + 1)]
    assert sorted(set(index["weight_map"].values())) == files
    assert not (sharded / SINGLE_FILE).exists()

    total, seen = 0, {}
    for file in files:
        with safe_open(sharded / file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor = f.get_tensor(name)
                seen[name] = file
                total += tensor.numel() * tensor.element_size()
    assert seen == index["weight_map"]  # every tensor is where the index says, exactly once
    assert index["metadata"]["total_size"] == total
    with safe_open(single / SINGLE_FILE, framework="pt") as f:
        assert set(f.keys()) == set(seen)

    # vision tensors first: every vision shard comes before (or is) the first language shard
    shard_no = {name: int(re.match(r"model-(\d+)-of", file).group(1)) for name, file in seen.items()}
    last_vision = max(n for name, n in shard_no.items() if name.startswith(VISION))
    first_llm = min(n for name, n in shard_no.items() if name.startswith(LLM))
    assert last_vision <= first_llm


def test_config_and_generation_config(single, kit):
    cfg = InternVLConfig.from_dir(single)
    assert cfg.llm.vocab_size == DEFAULT_SP_VOCAB + len(INTERNVL_TOKENS)
    assert (cfg.image_size, cfg.vision.patch_size) == (448, 14)
    assert (cfg.downsample_ratio, cfg.ps_version) == (0.5, "v2")
    assert cfg.num_image_token == 256 and cfg.select_layer == -1 and cfg.template == "internlm2-chat"
    raw = json.loads((single / "config.json").read_text())
    kit_raw = json.loads(kit.path("config.json").read_text())
    # the same top-level shape and the fields the serving code reads, as the kit (and the real repo) has them
    assert set(raw) <= set(kit_raw) and {"llm_config", "vision_config", "auto_map"} <= set(raw)
    assert set(raw["llm_config"]) <= set(kit_raw["llm_config"])
    assert set(raw["vision_config"]) <= set(kit_raw["vision_config"])
    for key in ("architectures", "model_type", "torch_dtype", "auto_map", "ps_version", "template"):
        assert raw[key] == kit_raw[key], key
    for key in ("architectures", "model_type", "rope_scaling", "rope_theta", "auto_map", "_name_or_path"):
        assert raw["llm_config"][key] == kit_raw["llm_config"][key], key
    assert json.loads((single / "generation_config.json").read_text()) == json.loads(
        kit.path("generation_config.json").read_text()
    )


def test_tokenizer_files_mirror_the_kit(single, kit):
    sp = DEFAULT_SP_VOCAB
    files = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
    ours = {n: json.loads((single / n).read_text()) for n in files}
    theirs = {n: json.loads(kit.path(n).read_text()) for n in ours}
    kit_sp = kit.manifest["model"]["sp_vocab_size"]

    assert ours["special_tokens_map.json"] == theirs["special_tokens_map.json"]
    for key, value in theirs["tokenizer_config.json"].items():
        if key != "added_tokens_decoder":
            assert ours["tokenizer_config.json"][key] == value, key
    assert set(ours["tokenizer_config.json"]) == set(theirs["tokenizer_config.json"])

    def renumbered(decoder: dict, sp_vocab: int) -> list:
        # the kit's entries with ids shifted by the vocabulary difference, in file order
        return [(int(i) - sp_vocab if int(i) > 2 else int(i), entry) for i, entry in decoder.items()]

    assert renumbered(ours["tokenizer_config.json"]["added_tokens_decoder"], sp) == renumbered(
        theirs["tokenizer_config.json"]["added_tokens_decoder"], kit_sp
    )
    decoder = ours["tokenizer_config.json"]["added_tokens_decoder"]
    assert [decoder[str(i)]["content"] for i in range(sp - 6, sp + 9)] == RELABELLED + INTERNVL_TOKENS
    assert ours["added_tokens.json"] == {tok: sp + i for i, tok in enumerate(INTERNVL_TOKENS)}
    assert list(ours["added_tokens.json"]) == list(theirs["added_tokens.json"])  # same (sorted) order


def test_sentencepiece_model_is_configured_like_the_kit(single, kit):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    def proto(path: Path):
        m = sp_pb2.ModelProto()
        m.ParseFromString(path.read_bytes())
        return m

    ours, theirs = proto(single / "tokenizer.model"), proto(kit.path("tokenizer.model"))
    assert len(ours.pieces) == DEFAULT_SP_VOCAB == ours.trainer_spec.vocab_size
    for field in ("model_type", "byte_fallback", "split_digits", "unk_id", "bos_id", "eos_id", "pad_id",
                  "allow_whitespace_only_pieces"):
        assert getattr(ours.trainer_spec, field) == getattr(theirs.trainer_spec, field), field
    assert ours.normalizer_spec == theirs.normalizer_spec  # identity, dummy prefix, extra spaces kept
    user = sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    assert [(p.piece, p.type) for p in ours.pieces[-6:]] == [(u, user) for u in UNUSED_PIECES]
    assert sum(p.type == user for p in ours.pieces) == 6
    assert [p.piece for p in ours.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert sum(p.type == sp_pb2.ModelProto.SentencePiece.BYTE for p in ours.pieces) == 256


# ---------------------------------------------------------------------------------------------
# Determinism


def test_deterministic_in_the_seed(tmp_path, single):
    again = write_tiny_checkpoint(tmp_path / "again", seed=7)
    assert file_digests(again) == file_digests(single)  # byte for byte, tokenizer included

    other = write_tiny_checkpoint(tmp_path / "other", seed=8)
    a, b = load_file(single / SINGLE_FILE), load_file(other / SINGLE_FILE)
    assert a.keys() == b.keys()
    assert not torch.equal(a["language_model.output.weight"], b["language_model.output.weight"])
    assert (single / "tokenizer.model").read_bytes() == (other / "tokenizer.model").read_bytes()


def test_rewriting_a_directory_replaces_the_old_layout(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "ckpt", shards=2)
    write_tiny_checkpoint(out)
    assert not (out / INDEX_FILE).exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == [SINGLE_FILE]


def test_init_is_tame(single):
    tensors = load_file(single / SINGLE_FILE)
    for name, t in tensors.items():
        assert t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all(), name
        if re.search(r"(norm\d?|mlp1\.0)\.weight$", name):
            assert torch.equal(t, torch.ones_like(t)), name  # LayerNorm / RMSNorm weights are 1
        elif name.endswith((".ls1", ".ls2")):
            assert 0 < float(t.float().max()) <= 0.2, name
        else:
            assert float(t.float().abs().max()) < 1.0, name


def test_shard_names_split():
    items = [(f"t{i}", size) for i, size in enumerate([10, 10, 100, 10, 10])]
    groups = shard_names(items, 3)
    assert [n for g in groups for n in g] == [n for n, _ in items] and all(groups)
    assert len(shard_names(items, 5)) == 5
    with pytest.raises(ValueError):
        shard_names(items, 6)


# ---------------------------------------------------------------------------------------------
# Loading through the services


def test_sharded_and_single_load_identical_tensors(single, sharded):
    for load in (load_vision_encoder, load_language_model):
        a = load(single, "cpu", torch.bfloat16).state_dict()
        b = load(sharded, "cpu", torch.bfloat16).state_dict()
        assert a.keys() == b.keys() and a
        for name in a:
            assert a[name].dtype == torch.bfloat16
            assert torch.equal(a[name], b[name]), name
    # and the loaded values are the stored ones
    stored = load_file(single / SINGLE_FILE)
    vision = load_vision_encoder(sharded, "cpu", torch.bfloat16).state_dict()
    assert torch.equal(vision["mlp1.1.weight"], stored["mlp1.1.weight"])
    llm = load_language_model(sharded, "cpu", torch.float32).state_dict()
    assert torch.equal(llm["output.weight"], stored["language_model.output.weight"].float())


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Names of the safetensors files the checkpoint reader opens."""
    files: list[str] = []
    real = checkpoint.safe_open

    def spy(path, *args, **kwargs):
        files.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", spy)
    return files


def test_each_half_opens_only_its_own_shards(sharded, opened):
    wmap = weight_map(sharded)
    vision_files = {f for n, f in wmap.items() if n.startswith(VISION)}
    llm_files = {f for n, f in wmap.items() if n.startswith(LLM)}
    llm_only, vision_only = llm_files - vision_files, vision_files - llm_files
    assert llm_only and vision_only, "the tiny sharded checkpoint should have a shard for each half alone"

    load_vision_encoder(sharded, "cpu")
    assert set(opened) == vision_files and len(opened) == len(vision_files)
    assert not set(opened) & llm_only

    opened.clear()
    load_language_model(sharded, "cpu")
    assert set(opened) == llm_files and len(opened) == len(llm_files)
    assert not set(opened) & vision_only


def test_vision_encoder_runs(single):
    encoder = load_vision_encoder(single, "cpu")
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = encoder.extract_feature(pixels)
    cfg = InternVLConfig.from_dir(single)
    assert feats.shape == (2, 256, cfg.llm.hidden_size)
    assert torch.isfinite(feats).all() and 0 < float(feats.std()) < 10


def test_language_model_runs(single):
    model = load_language_model(single, "cpu")
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        logits = model(model.embed(ids), torch.arange(ids.shape[1])[None])
    assert logits.shape == (1, ids.shape[1], DEFAULT_SP_VOCAB + 9)
    assert torch.isfinite(logits).all() and 0.1 < float(logits.std()) < 10


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_from_the_tiny_dir(single):
    from services.language_decoder.tokenizer import InternLM2Tokenizer

    tok = InternLM2Tokenizer.from_dir(single)
    sp = DEFAULT_SP_VOCAB
    assert tok.im_end_id == sp - 2 and tok.img_context_id == sp + 2
    assert (tok.im_start_id, tok.img_start_id, tok.img_end_id) == (sp - 1, sp, sp + 1)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    assert tok.sp_vocab_size == sp and tok.vocab_size == InternVLConfig.from_dir(single).llm.vocab_size
    for text in ["Hello, who are you?", "你好，你是谁？请详细描述这张图片。", "Count 12345 apples.",
                 "  two spaces,\ttab and\nnewline  ", "emoji 🙂 and rare 龘 characters"]:
        ids = tok.encode(text)
        assert ids[0] == 1  # BOS
        assert all(0 <= i < sp for i in ids)
        assert tok.decode(ids, skip_special_tokens=True) == text

    prompt = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nhi<|im_end|>"
    ids = tok.encode(prompt)
    for token, expected in [("<|im_start|>", sp - 1), ("<|im_end|>", sp - 2), ("<img>", sp),
                            ("</img>", sp + 1), ("<IMG_CONTEXT>", sp + 2)]:
        assert expected in ids, token
    assert ids.count(sp + 2) == 2
    assert tok.decode(ids).startswith(" <s><|im_start|>")  # upstream's decode quirk, see the kit README
    shown = tok.decode(ids, skip_special_tokens=True)  # each chunk after a special token gets a "▁" prefix
    assert "<" not in shown and shown.split() == ["user", "hi"]
    # the raw placeholder piece is a USER_DEFINED SentencePiece piece: it encodes to the <|im_end|> id
    assert sp - 2 in tok.encode("[UNUSED_TOKEN_145]")
    for i, token in enumerate(INTERNVL_TOKENS):
        assert tok.encode(token)[-1] == sp + i


# ---------------------------------------------------------------------------------------------
# Broken checkpoints


def test_missing_shard_is_a_clear_error(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "ckpt", shards=SHARDS)
    last = f"model-{SHARDS:05d}-of-{SHARDS:05d}.safetensors"
    (out / last).unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(last)}.*missing"):
        load_language_model(out, "cpu")
    load_vision_encoder(out, "cpu")  # the vision half never needed that shard


def test_mismatched_tensor_is_a_clear_error(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "ckpt")
    tensors = load_file(out / SINGLE_FILE)
    tensors["mlp1.1.weight"] = tensors["mlp1.1.weight"].t().contiguous()
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    shape = tuple(tensors["mlp1.1.weight"].shape)
    with pytest.raises(CheckpointError, match=rf"mlp1\.1\.weight has shape {re.escape(str(shape))}"):
        load_vision_encoder(out, "cpu")


def test_missing_and_unexpected_tensors_are_clear_errors(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "ckpt")
    tensors = load_file(out / SINGLE_FILE)
    del tensors["language_model.model.layers.1.ffn_norm.weight"]
    tensors["language_model.model.layers.2.ffn_norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    expected = r"missing \['model\.layers\.1\.ffn_norm\.weight'\].*unexpected \['model\.layers\.2\."
    with pytest.raises(CheckpointError, match=expected):
        load_language_model(out, "cpu")


def test_checkpoint_without_weights_is_a_clear_error(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "ckpt")
    (out / SINGLE_FILE).unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_vision_encoder(out, "cpu")


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read once at import time
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    repo = "internvl-serving-tests/no-such-model"
    with pytest.raises(CheckpointError, match=rf"could not fetch '{repo}' from the Hugging Face Hub") as err:
        resolve_model_dir(repo)
    assert "pass its directory" in str(err.value)
    with pytest.raises(CheckpointError, match=re.escape(repo)):
        load_vision_encoder(repo, "cpu")


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--shards", "2", "--seed", "3", "--layers", "1", "--llm-hidden", "32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "model-00001-of-00002.safetensors" in printed
    cfg = InternVLConfig.from_dir(out)
    assert (cfg.vision.num_hidden_layers, cfg.llm.num_hidden_layers, cfg.llm.hidden_size) == (1, 1, 32)
    assert len(set(weight_map(out).values())) == 2
    load_language_model(out, "cpu")

    assert main(["--out", str(tmp_path / "bad"), "--shards", "1000"]) == 2
    assert "cannot split" in capsys.readouterr().err
