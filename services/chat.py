"""One-shot chat for people: `internvl-chat --model DIR --image a.jpg "What is in the picture?"`.

Runs both halves in this process (no servers needed). With several --image flags the images are
separate (`Image-1`, `Image-2` as upstream's multi-image example) unless --combine is given.
"""

from __future__ import annotations

import argparse
import sys

import torch

from services.common.checkpoint import CheckpointError
from services.common.quantization import NO_QUANTIZATION, QUANTIZE_CHOICES
from services.inprocess import GenerationSettings, InternVLChat
from services.language_decoder.prompt import IMAGE_PLACEHOLDER, video_question
from services.vision_encoder.preprocess import load_image, load_video


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="internvl-chat", description=__doc__.splitlines()[0])
    p.add_argument("question")
    p.add_argument("--model", required=True, help="checkpoint dir or Hub repo id")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    p.add_argument("--combine", action="store_true", help="put all images' tiles in one <image> block")
    p.add_argument("--video", help="video file (frames sampled with decord)")
    p.add_argument("--frames", type=int, default=8, help="video frames to sample")
    p.add_argument("--max-tiles", type=int, default=12, help="448 px tiles per image (1..40)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--quantize", default=NO_QUANTIZATION, choices=QUANTIZE_CHOICES,
                   help="int8: the language decoder's block weights as int8 (close to, not identical with, none)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.image and args.video:
        sys.exit("internvl-chat: give --image or --video, not both")
    try:
        model = InternVLChat.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    except CheckpointError as exc:
        sys.exit(f"internvl-chat: {exc}")
    question, pixel_values, num_patches_list = args.question, None, None
    if args.video:
        pixel_values, num_patches_list = load_video(args.video, num_segments=args.frames, max_num=1)
        question = video_question(question, len(num_patches_list))
    elif args.image:
        tiles = [load_image(path, max_num=args.max_tiles) for path in args.image]
        pixel_values = torch.cat(tiles)
        if len(tiles) > 1 and not args.combine:
            num_patches_list = [t.shape[0] for t in tiles]
            if IMAGE_PLACEHOLDER not in question:
                labels = "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(len(tiles)))
                question = labels + question
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    response, _ = model.chat(question, pixel_values, num_patches_list, generation=settings)
    print(response)
    return 0


if __name__ == "__main__":
    sys.exit(main())
