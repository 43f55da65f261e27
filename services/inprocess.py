"""Both halves of InternVL2 in one process: upstream's `chat()` / `batch_chat()` without remote code.

This is the reference path: the one-shot CLI and the parity tests use it, and the split services
must give the same answers. Serving goes through the gRPC services and the decoder's engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.checkpoint import parse_dtype, resolve_model_dir
from services.common.model_config import InternVLConfig
from services.common.quantization import NO_QUANTIZATION
from services.language_decoder.generate import generate
from services.language_decoder.models import CausalLM, load_language_model
from services.language_decoder.prompt import build_batch_prompts, build_chat_prompt, extract_response, get_template
from services.language_decoder.tokenizer_loader import Tokenizer, load_tokenizer, stop_token_id
from services.vision_encoder.model import VisionEncoder, load_vision_encoder

History = list[tuple[str, str]]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 1024
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


class InternVLChat:
    def __init__(
        self,
        config: InternVLConfig,
        vision: VisionEncoder,
        llm: CausalLM,
        tokenizer: Tokenizer,
    ):
        self.config = config
        self.vision = vision
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = get_template(config.template)
        self.stop_token_id = stop_token_id(tokenizer, self.template)  # chat() stops on the separator only

    @classmethod
    def load(
        cls, model: str | Path, device: str = "cpu", dtype: str | None = None, quantize: str = NO_QUANTIZATION
    ) -> InternVLChat:
        """`quantize="int8"`: the language decoder's block weights as int8 (the vision half is unchanged)."""
        model_dir = resolve_model_dir(model)
        torch_dtype = parse_dtype(dtype, device)
        return cls(
            InternVLConfig.from_dir(model_dir),
            load_vision_encoder(model_dir, device=device, dtype=torch_dtype),
            load_language_model(model_dir, device=device, dtype=torch_dtype, quantize=quantize),
            load_tokenizer(model_dir),
        )

    @torch.inference_mode()
    def chat(
        self,
        question: str,
        pixel_values: torch.Tensor | None = None,
        num_patches_list: Sequence[int] | None = None,
        history: History | None = None,
        generation: GenerationSettings = GenerationSettings(),
    ) -> tuple[str, History]:
        """Upstream `chat()`: returns (response, history including this round)."""
        if pixel_values is not None and num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]]  # all tiles as one image block
        prompt, stored_question = build_chat_prompt(
            question, history, num_patches_list if pixel_values is not None else None,
            self.config.num_image_token, template=self.template,
        )
        ids = torch.tensor([self.tokenizer.encode(prompt)], device=self.llm.device)
        response = self._generate(ids, torch.ones_like(ids), pixel_values, generation)[0]
        return response, [*(history or []), (stored_question, response)]

    @torch.inference_mode()
    def batch_chat(
        self,
        questions: Sequence[str],
        pixel_values: torch.Tensor,
        num_patches_list: Sequence[int],
        generation: GenerationSettings = GenerationSettings(),
    ) -> list[str]:
        """Upstream `batch_chat()`: independent single-turn questions, one image each, left-padded."""
        prompts = build_batch_prompts(questions, num_patches_list, self.config.num_image_token, template=self.template)
        ids, mask = self.tokenizer.encode_batch(prompts)
        device = self.llm.device
        return self._generate(
            torch.tensor(ids, device=device), torch.tensor(mask, device=device), pixel_values, generation
        )

    def _generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        generation: GenerationSettings,
    ) -> list[str]:
        image_embeds = None
        if pixel_values is not None:
            image_embeds = self.vision.extract_feature(pixel_values.to(self.vision.device))
        embeds = self.llm.embed(input_ids, image_embeds, self.tokenizer.img_context_id)
        generator = None
        if generation.seed is not None:
            generator = torch.Generator(device=self.llm.device).manual_seed(generation.seed)
        out = generate(
            self.llm,
            embeds,
            attention_mask,
            max_new_tokens=generation.max_new_tokens,
            eos_token_id=self.stop_token_id,
            pad_token_id=self.tokenizer.pad_id,
            do_sample=generation.do_sample,
            temperature=generation.temperature,
            top_p=generation.top_p,
            top_k=generation.top_k,
            repetition_penalty=generation.repetition_penalty,
            generator=generator,
        )
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in out.token_ids]
        return [extract_response(text, self.template) for text in texts]
