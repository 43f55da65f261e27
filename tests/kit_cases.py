"""A parity kit's chat cases as inputs for our code: pixel values from the raw files (as upstream's quick
start builds them) and engine requests from the kit's prompt ids, plus random traffic to mix with them.
Shared by the parity tests of the default kit and the family-kit tests."""

from __future__ import annotations

import torch

from services.language_decoder.engine import EngineRequest, SamplingParams, find_image_spans
from services.vision_encoder.preprocess import load_image, load_video
from tests.conftest import Kit


def case_pixel_values(kit: Kit, case: dict) -> tuple[torch.Tensor | None, list[int] | None]:
    """Pixel values the way upstream's quick-start builds them from the kit's source files."""
    inputs = case["inputs"]
    if not inputs["images"]:
        return None, None
    if inputs["images"] == ["video"]:
        video = kit.manifest["video"]
        args = video["load_video_args"]
        pixel_values, num_patches = load_video(
            kit.path(video["file"]), bound=args["bound"], input_size=args["input_size"],
            max_num=args["max_num"], num_segments=args["num_segments"],
        )
        assert num_patches == inputs["num_patches_list"]
        return pixel_values, num_patches
    images = kit.images
    tiles = [
        load_image(kit.path(images[i]["file"]), max_num=images[i]["max_num"],
                   image_size=kit.manifest["preprocess"]["input_size"])
        for i in inputs["images"]
    ]
    pixel_values = torch.cat(tiles)
    assert pixel_values.shape[0] == inputs["pixel_values_num_tiles"]
    return pixel_values, inputs["num_patches_list"]


def kit_requests(kit: Kit, features: dict[str, torch.Tensor]) -> tuple[list[EngineRequest], dict[str, dict]]:
    """One request per prompt row of every chat case, and what upstream produced for it."""
    ctx = kit.manifest["special_token_ids"]["<IMG_CONTEXT>"]
    requests, expected = [], {}
    for case in kit.manifest["chat_cases"]:
        exp, inputs = case["expected"], case["inputs"]
        eos = inputs["effective_generate_kwargs"]["eos_token_id"]
        max_new = inputs["effective_generate_kwargs"]["max_new_tokens"]
        ids, mask = kit.npy(exp["input_ids_file"]), kit.npy(exp["attention_mask_file"])
        images = inputs["images"]
        rows = len(ids)
        # batch_chat: one image per row; chat: every image of the case, in order, in the one row.
        per_row = [[img] for img in images] if rows > 1 else [images]
        for b in range(rows):
            prompt = ids[b][mask[b].astype(bool)].tolist()
            embeds = torch.cat([features[i] for i in per_row[b]]) if per_row[b] else None
            spans = find_image_spans(prompt, ctx) if embeds is not None else []
            gen = kit.generated_ids(case)[b]
            rid = f"{case['id']}/{b}"
            requests.append(
                EngineRequest(
                    rid, prompt, SamplingParams(max_new_tokens=max_new, stop_token_ids=(eos,)), embeds, spans
                )
            )
            expected[rid] = {"ids": gen[: gen.index(eos) + 1] if eos in gen else gen,
                             "response": exp["responses"][b]}
    return requests, expected


def other_traffic(kit: Kit, hidden: int, tokens_per_tile: int, n: int = 10) -> list[EngineRequest]:
    """Random prompts (some with one tile of random image embeddings, some sampled with a seed)."""
    gen = torch.Generator().manual_seed(11)
    ctx = kit.manifest["special_token_ids"]["<IMG_CONTEXT>"]
    text_ids = kit.text_token_range()
    out = []
    for i in range(n):
        length = int(torch.randint(5, 400, (1,), generator=gen))
        prompt = torch.randint(text_ids.start, text_ids.stop, (length,), generator=gen).tolist()
        embeds, spans = None, []
        if i % 3 == 0:
            at = min(20, len(prompt))  # the image goes after the first 20 tokens, or at the end of a shorter prompt
            prompt = prompt[:at] + [ctx] * tokens_per_tile + prompt[at:]
            embeds, spans = torch.randn(tokens_per_tile, hidden, generator=gen), [(at, at + tokens_per_tile)]
        sampling = SamplingParams(max_new_tokens=int(torch.randint(1, 160, (1,), generator=gen)),
                                  do_sample=i % 2 == 1, temperature=0.8, top_p=0.9, seed=i)
        out.append(EngineRequest(f"noise/{i}", prompt, sampling, embeds, spans))
    return out
