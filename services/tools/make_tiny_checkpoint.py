"""Write a tiny random-weight InternVL2 checkpoint in the exact on-disk layout of `OpenGVLab/InternVL2-8B`.

Demos and tests run anywhere with it, without the 16 GB download:

    python -m services.tools.make_tiny_checkpoint --out .cache/tiny-internvl2 [--shards 3] [--seed 0]

The directory holds what the real Hub repo holds (minus the upstream `.py` files):

- `config.json` (`InternVLConfig.to_dict`, real geometry: 448 px, patch 14, downsample 0.5, ps v2,
  256 tokens per tile) and `generation_config.json`;
- the weights in bfloat16, as one `model.safetensors` or, with `--shards N`, as
  `model-0000k-of-0000N.safetensors` plus `model.safetensors.index.json` (`metadata.total_size` and
  `weight_map`, as Hugging Face writes it). The vision tensors come first, so a sharded checkpoint
  has shards that only the language decoder opens (and usually shards only the encoder opens);
- `tokenizer.model`: a small SentencePiece BPE model trained on the spot from a built-in
  English + Chinese corpus (byte fallback, split digits, dummy prefix, identity normalization),
  whose last 6 pieces are the USER_DEFINED `[UNUSED_TOKEN_141..146]` placeholders, like InternLM2's;
- `tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json`, which relabel those 6
  pieces as `<|plugin|> ... <|im_start|>` and add the 9 InternVL tokens at `sp_vocab .. sp_vocab+8`
  (as 92538-92552 in the real model). The LLM vocabulary is `sp_vocab + 9`.

Tensor names and shapes come from the serving modules themselves, built on the meta device, so the
checkpoint always matches what the services load. Everything is deterministic in `--seed`: every
tensor is drawn from its own generator seeded by (seed, name).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.common.checkpoint import INDEX_FILE, LLM_PREFIXES, SINGLE_FILE, VISION_PREFIXES
from services.common.model_config import InternVLConfig, LLMConfig, RopeScaling, VisionConfig

# InternLM2 keeps 6 placeholder pieces at the end of its SentencePiece vocabulary and relabels them
# in tokenizer_config.json (ids 92538..92543 in the real model).
UNUSED_PIECES = [f"[UNUSED_TOKEN_{i}]" for i in range(141, 147)]
RELABELLED = [
    "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"
]
# Added by InternVL's fine-tuning script with add_tokens(special_tokens=True), ids sp_vocab.. (92544..).
INTERNVL_TOKENS = [
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"
]

# As transformers' save_pretrained writes it for a config without generation settings (like the kit's).
GENERATION_CONFIG = {"_from_model_config": True, "transformers_version": "4.44.2"}

DEFAULT_SP_VOCAB = 1024  # differs from the dev kit's 1280 on purpose: code must read ids from the files
INIT_STD = 0.02
LAYER_SCALE_INIT = 0.1

# A few KB of English and Chinese text for the tokenizer. Lines are sentences; nothing else reads it.
CORPUS = """\
Hello, who are you? I am an AI assistant that can look at pictures and answer questions about them.
Please describe the image in detail. The picture shows a small red house next to a quiet river.
There are three children playing football on the green grass, and a dog is running after the ball.
What is the man in the blue shirt doing? He is reading a newspaper while waiting for the train.
Describe the two images briefly. The first image is a city at night; the second one is a mountain lake.
What is in the video? A cat walks across the kitchen, jumps onto the table and looks out of the window.
Count the apples on the plate. There are 7 apples, 2 of them are green and 5 of them are red.
The meeting starts at 10:30 on March 14, 2024, in room 512 of the main building.
Our company sold 1,250 units in the first quarter and 3,480 units in the second quarter.
The temperature today is 23 degrees, with light wind from the south and a chance of rain in the evening.
Read the text in the image. The sign says: Welcome to the museum of modern art, open every day.
Where is the bicycle? The bicycle is leaning against the wall on the left side of the street.
A photo of a bowl of noodles with eggs, green onions and a few slices of beef on a wooden table.
The chart shows that sales increased steadily from January to June and then dropped in July.
Can you tell me the color of the car? The car is white, and it is parked in front of a bakery.
The woman is holding an umbrella because it is raining, and the road is wet and shiny.
In the bottom right corner there is a small logo, and in the top left corner there is a date.
Answer the question using a single word or phrase. Is there a person in the image? Yes.
Please provide the bounding box coordinates of the region this sentence describes: the black dog.
The model looks at each tile of the image, turns it into visual tokens and reads them like words.
Language models predict the next token, one step at a time, until they reach the end of the answer.
This is a test of the tokenizer with numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 42 and 2048.
Thank you very much! You are welcome. Have a nice day, and see you tomorrow morning.
The quick brown fox jumps over the lazy dog near the old bridge by the river bank.
Students are studying mathematics, physics, chemistry, biology, history and geography at school.
The weather in spring is warm and pleasant; flowers bloom in the park and birds sing in the trees.
He opened the door, turned on the light and found a letter on the desk next to the computer.
A train is arriving at the station, and many people are standing on the platform with their bags.
The recipe needs two cups of flour, one cup of sugar, three eggs and a little butter and milk.
She took a picture of the sunset over the sea, where the sky was orange, pink and purple.
你好，你是谁？我是一个人工智能助手，可以看图片并回答关于图片的问题。
请详细描述这张图片。图片中有一座红色的小房子，旁边是一条安静的小河。
草地上有三个孩子在踢足球，一只小狗正在追着球跑。
穿蓝色衬衫的男人在做什么？他一边等火车，一边看报纸。
请简要描述这两张图片。第一张是夜晚的城市，第二张是山间的湖泊。
视频里有什么？一只猫走过厨房，跳上桌子，然后看着窗外。
数一数盘子里有几个苹果。一共有七个苹果，其中两个是绿色的，五个是红色的。
会议将在二零二四年三月十四日上午十点半在主楼五一二房间举行。
今天的气温是二十三度，南风微弱，傍晚可能会下雨。
请读出图片中的文字。牌子上写着：欢迎来到现代艺术博物馆，每天开放。
自行车在哪里？自行车靠在街道左边的墙上。
这是一张照片，木桌上放着一碗面条，里面有鸡蛋、葱花和几片牛肉。
图表显示，销售额从一月到六月稳步增长，七月份有所下降。
你能告诉我汽车的颜色吗？汽车是白色的，停在一家面包店前面。
那个女人拿着一把雨伞，因为正在下雨，路面又湿又亮。
图片右下角有一个小标志，左上角有一个日期。
请用一个词或短语回答问题。图片中有人吗？有。
你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。
模型会查看图片的每一个小块，把它变成视觉标记，然后像读文字一样读它们。
语言模型每次预测下一个词，一步一步地生成，直到回答结束。
非常感谢！不客气。祝你今天愉快，明天早上见。
学生们在学校学习数学、物理、化学、生物、历史和地理。
春天的天气温暖宜人，公园里鲜花盛开，鸟儿在树上唱歌。
他打开门，开了灯，发现电脑旁边的桌子上有一封信。
一列火车正在进站，许多人拿着行李站在站台上。
这个菜谱需要两杯面粉、一杯糖、三个鸡蛋，还有一点黄油和牛奶。
她拍了一张海上日落的照片，天空是橙色、粉色和紫色的。
北京是中国的首都，上海是一个重要的经济中心，长江是中国最长的河流。
人工智能正在改变我们的生活，从手机里的语音助手到医院里的影像诊断。
"""


# ----------------------------------------------------------------------------------------------
# Configuration


def tiny_config(
    *,
    vocab_size: int,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_mlp: int = 256,
    llm_hidden: int = 64,
    llm_layers: int = 2,
    llm_heads: int = 4,
    llm_kv_heads: int = 2,
    llm_ffn: int = 128,
) -> InternVLConfig:
    """The InternVL2-8B architecture shrunk to the given sizes; geometry and LLM settings stay real."""
    if vision_hidden % vision_heads or llm_hidden % llm_heads or llm_heads % llm_kv_heads:
        raise ValueError("hidden sizes must divide by the head counts, and heads by the kv heads")
    return InternVLConfig(
        vision=VisionConfig(
            hidden_size=vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            intermediate_size=vision_mlp,
            image_size=448,
            patch_size=14,
        ),
        llm=LLMConfig(
            vocab_size=vocab_size,
            hidden_size=llm_hidden,
            intermediate_size=llm_ffn,
            num_hidden_layers=llm_layers,
            num_attention_heads=llm_heads,
            num_key_value_heads=llm_kv_heads,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            rope_scaling=RopeScaling(type="dynamic", factor=2.0),
            max_position_embeddings=32768,
        ),
        downsample_ratio=0.5,
        ps_version="v2",
        select_layer=-1,
        force_image_size=448,
    )


def config_json(cfg: InternVLConfig) -> dict:
    """`config.json` as the real checkpoint has it (auto_map entries kept; the .py files are not shipped)."""
    raw = cfg.to_dict()
    raw["auto_map"] = {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
    }
    raw["llm_config"] = {
        "_name_or_path": "internlm/internlm2_5-7b-chat",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        **raw["llm_config"],
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
    }
    raw["vision_config"].update(
        attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02
    )
    return raw


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(sp_vocab: int = DEFAULT_SP_VOCAB) -> bytes:
    """A serialized SentencePiece BPE model with `sp_vocab` pieces, the last 6 `[UNUSED_TOKEN_141..146]`.

    Deterministic (one thread, no sampling): the same `sp_vocab` always gives the same bytes.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    writer = io.BytesIO()
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=writer,
            model_type="bpe",
            vocab_size=sp_vocab - len(UNUSED_PIECES),
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(
            f"cannot train a {sp_vocab}-piece tokenizer on the built-in corpus (use 700 or more): {exc}"
        ) from exc

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(writer.getvalue())
    for piece in UNUSED_PIECES:
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, 0.0, sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    proto.trainer_spec.vocab_size = len(proto.pieces)
    if len(proto.pieces) != sp_vocab:
        raise ValueError(f"tokenizer has {len(proto.pieces)} pieces, wanted {sp_vocab}")
    return proto.SerializeToString()


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_files(sp_vocab: int) -> dict[str, dict]:
    """tokenizer_config.json, special_tokens_map.json and added_tokens.json, mirroring the parity kit."""
    first_unused = sp_vocab - len(UNUSED_PIECES)
    decoder: dict[str, dict] = {
        str(i): {**_token_entry(tok), "special": True} for i, tok in enumerate(["<unk>", "<s>", "</s>"])
    }
    for i, tok in enumerate(RELABELLED):
        decoder[str(first_unused + i)] = {**_token_entry(tok), "special": True}
    for i, tok in enumerate(INTERNVL_TOKENS):
        decoder[str(sp_vocab + i)] = {**_token_entry(tok), "special": True}
    internlm_specials = list(reversed(RELABELLED))  # <|im_start|>, <|im_end|>, ... as InternLM2 lists them
    tokenizer_config = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": internlm_specials + INTERNVL_TOKENS,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>",
        "chat_template": "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + "
        "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    special_tokens_map = {
        "additional_special_tokens": internlm_specials + [_token_entry(t) for t in INTERNVL_TOKENS],
        "bos_token": _token_entry("<s>"),
        "eos_token": _token_entry("</s>"),
        "pad_token": _token_entry("</s>"),
        "unk_token": _token_entry("<unk>"),
    }
    added_tokens = {tok: sp_vocab + i for i, tok in sorted(enumerate(INTERNVL_TOKENS), key=lambda t: t[1])}
    return {
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special_tokens_map,
        "added_tokens.json": added_tokens,
    }


# ----------------------------------------------------------------------------------------------
# Weights


def meta_state_shapes(cfg: InternVLConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, vision tensors first, from the serving modules built on meta."""
    kinds = _norm_kinds(cfg)
    return {name: shape for name, (shape, _) in kinds.items()}


def _norm_kinds(cfg: InternVLConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, kind) with kind one of norm_weight, norm_bias, other; in checkpoint order."""
    from services.language_decoder.model import build_language_model
    from services.vision_encoder.model import build_vision_encoder

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    with torch.device("meta"):
        vision = build_vision_encoder(cfg)
        llm = build_language_model(cfg.llm)
    for prefix, module in (("", vision), (LLM_PREFIXES[0], llm)):
        norm_params: dict[str, str] = {}
        for mod_name, mod in module.named_modules():
            if _is_norm(mod):
                for p_name, _ in mod.named_parameters(recurse=False):
                    full = f"{mod_name}.{p_name}" if mod_name else p_name
                    norm_params[full] = "norm_weight" if p_name == "weight" else "norm_bias"
        for name, tensor in module.state_dict().items():
            out[prefix + name] = (tuple(tensor.shape), norm_params.get(name) or _norm_kind_by_name(name))
    bad = [n for n in out if not n.startswith(VISION_PREFIXES + LLM_PREFIXES)]
    if bad:
        raise RuntimeError(f"unexpected tensor names from the serving modules: {bad[:5]}")
    return dict(sorted(out.items(), key=lambda kv: _order_key(kv[0])))


def _norm_kind_by_name(name: str) -> str:
    """Fallback for norms the module-type check missed: `...norm.weight`, `...norm1.bias` and the like."""
    parent, _, leaf = name.rpartition(".")
    if re.search(r"norm\d*$", parent.rsplit(".", 1)[-1]) and leaf in ("weight", "bias"):
        return "norm_weight" if leaf == "weight" else "norm_bias"
    return "other"


def _is_norm(mod: torch.nn.Module) -> bool:
    if isinstance(mod, torch.nn.LayerNorm | torch.nn.GroupNorm):
        return True
    rms = getattr(torch.nn, "RMSNorm", None)
    return (rms is not None and isinstance(mod, rms)) or type(mod).__name__.lower().endswith("norm")


def _order_key(name: str) -> tuple:
    """Vision tensors first, then the LLM; layers in numeric order inside each half."""
    half = 0 if name.startswith(VISION_PREFIXES) else 1
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
    return (half, parts)


def _init_tensor(
    name: str, shape: tuple[int, ...], kind: str, seed: int, cfg: InternVLConfig
) -> torch.Tensor:
    if kind == "norm_weight":
        return torch.ones(shape)
    if kind == "norm_bias":
        return torch.zeros(shape)
    if name.rsplit(".", 1)[-1] in ("ls1", "ls2"):
        return torch.full(shape, LAYER_SCALE_INIT)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    std = INIT_STD
    if name == "language_model.output.weight":
        # Logits of order 1 instead of 0.1: fewer near-ties, so greedy decoding is stable across dtypes.
        std = cfg.llm.hidden_size**-0.5
    return torch.randn(shape, generator=gen) * std


def random_weights(cfg: InternVLConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor in bfloat16, in checkpoint order (vision first)."""
    return {
        name: _init_tensor(name, shape, kind, seed, cfg).to(torch.bfloat16).contiguous()
        for name, (shape, kind) in _norm_kinds(cfg).items()
    }


def shard_names(names_bytes: list[tuple[str, int]], shards: int) -> list[list[str]]:
    """Split tensors, kept in order, into `shards` non-empty contiguous groups of about equal bytes."""
    if shards < 1 or shards > len(names_bytes):
        raise ValueError(f"cannot split {len(names_bytes)} tensors into {shards} shards")
    total = sum(b for _, b in names_bytes)
    groups: list[list[str]] = [[]]
    done = 0
    for i, (name, nbytes) in enumerate(names_bytes):
        remaining_tensors = len(names_bytes) - i
        remaining_groups = shards - len(groups)
        middle = done + nbytes / 2
        if groups[-1] and remaining_groups > 0 and (
            middle >= total * len(groups) / shards or remaining_tensors == remaining_groups
        ):
            groups.append([])
        groups[-1].append(name)
        done += nbytes
    assert len(groups) == shards and all(groups)
    return groups


def save_weights(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> list[str]:
    """Write `model.safetensors`, or N shards plus `model.safetensors.index.json`; returns the file names."""
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(out_dir / SINGLE_FILE), metadata=metadata)
        _readable(out_dir / SINGLE_FILE)
        return [SINGLE_FILE]
    groups = shard_names([(n, t.numel() * t.element_size()) for n, t in tensors.items()], shards)
    weight_map: dict[str, str] = {}
    files = []
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out_dir / file), metadata=metadata)
        _readable(out_dir / file)
        weight_map.update(dict.fromkeys(group, file))
        files.append(file)
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(out_dir / INDEX_FILE, index)
    return files


def _readable(path: Path) -> None:
    """safetensors writes 0600 files; give them the usual umask-based mode like the JSON files."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _write_json(path: Path, body: dict) -> None:
    # config.json / generation_config.json are key-sorted, as save_pretrained writes them; the tokenizer
    # files and the index keep their insertion order (e.g. added_tokens_decoder in id order, as the kit).
    sort_keys = path.name in ("config.json", "generation_config.json")
    with path.open("w", encoding="utf-8") as f:
        json.dump(body, f, indent=2, ensure_ascii=False, sort_keys=sort_keys)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Entry points


def write_tiny_checkpoint(
    out_dir: str | Path,
    *,
    shards: int = 1,
    seed: int = 0,
    sp_vocab: int = DEFAULT_SP_VOCAB,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_mlp: int = 256,
    llm_hidden: int = 64,
    llm_layers: int = 2,
    llm_heads: int = 4,
    llm_kv_heads: int = 2,
    llm_ffn: int = 128,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write a complete random-weight InternVL2 checkpoint into `out_dir` (created if needed)."""
    log = log or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # never leave a previous layout next to the new one
    start = time.perf_counter()

    sp_model = train_tokenizer(sp_vocab)
    (out / "tokenizer.model").write_bytes(sp_model)
    for name, body in tokenizer_files(sp_vocab).items():
        _write_json(out / name, body)
    log(f"tokenizer: SentencePiece BPE, {sp_vocab} pieces + {len(INTERNVL_TOKENS)} added tokens")

    cfg = tiny_config(
        vocab_size=sp_vocab + len(INTERNVL_TOKENS),
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        vision_mlp=vision_mlp,
        llm_hidden=llm_hidden,
        llm_layers=llm_layers,
        llm_heads=llm_heads,
        llm_kv_heads=llm_kv_heads,
        llm_ffn=llm_ffn,
    )
    _write_json(out / "config.json", config_json(cfg))
    _write_json(out / "generation_config.json", GENERATION_CONFIG)

    tensors = random_weights(cfg, seed)
    files = save_weights(out, tensors, shards)
    n_vision = sum(t.numel() for n, t in tensors.items() if n.startswith(VISION_PREFIXES))
    n_llm = sum(t.numel() for n, t in tensors.items() if n.startswith(LLM_PREFIXES))
    log(
        f"weights: {len(tensors)} tensors, bf16, vision {n_vision:,} + language {n_llm:,} parameters "
        f"in {', '.join(files)}"
    )
    log(
        f"wrote {out} in {time.perf_counter() - start:.2f}s (seed {seed}; vision {vision_hidden}d x "
        f"{vision_layers} layers, LLM {llm_hidden}d x {llm_layers} layers, vocab {cfg.llm.vocab_size}, "
        f"{cfg.num_image_token} image tokens per tile)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="internvl-make-tiny",
        description="Write a tiny random-weight InternVL2 checkpoint in the OpenGVLab/InternVL2-8B layout.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--shards", type=int, default=1, help="N > 1 writes N shards plus an index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sp-vocab", type=int, default=DEFAULT_SP_VOCAB, help="SentencePiece pieces")
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--vision-layers", type=int, default=None)
    parser.add_argument("--vision-heads", type=int, default=4)
    parser.add_argument("--vision-mlp", type=int, default=None, help="default: 4 x vision hidden")
    parser.add_argument("--llm-hidden", type=int, default=64)
    parser.add_argument("--llm-layers", type=int, default=None)
    parser.add_argument("--llm-heads", type=int, default=4)
    parser.add_argument("--llm-kv-heads", type=int, default=2)
    parser.add_argument("--llm-ffn", type=int, default=None, help="default: 2 x LLM hidden")
    parser.add_argument("--layers", type=int, default=2, help="layers of both halves unless set apiece")
    args = parser.parse_args(argv)
    try:
        write_tiny_checkpoint(
            args.out,
            shards=args.shards,
            seed=args.seed,
            sp_vocab=args.sp_vocab,
            vision_hidden=args.vision_hidden,
            vision_layers=args.vision_layers if args.vision_layers is not None else args.layers,
            vision_heads=args.vision_heads,
            vision_mlp=args.vision_mlp if args.vision_mlp is not None else 4 * args.vision_hidden,
            llm_hidden=args.llm_hidden,
            llm_layers=args.llm_layers if args.llm_layers is not None else args.layers,
            llm_heads=args.llm_heads,
            llm_kv_heads=args.llm_kv_heads,
            llm_ffn=args.llm_ffn if args.llm_ffn is not None else 2 * args.llm_hidden,
            log=print,
        )
    except ValueError as exc:
        print(f"internvl-make-tiny: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
