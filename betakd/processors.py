"""Processors of image-only variants of families whose stock processor also wants video
(they would need torchvision's video support): what the tiny test models and users'
saved models of these families load. They are found by the ``processor_class`` that
``save_pretrained`` writes (:data:`OWN_PROCESSORS`, read by
:func:`betakd.models.load_processor`).
"""

from __future__ import annotations

import re

from transformers import (
    InternVLProcessor,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    Qwen2VLProcessor,
)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor for images only.

    The stock processor requires a video processor, and every video processor in
    transformers 5 needs torchvision, which CPU-only installs lack. Images need
    only the (PIL) image processor and the tokenizer.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision processor for images only (no video processor, as above)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or "<image>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<video>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class InternVLImageOnlyProcessor(InternVLProcessor):
    """InternVL processor for images only (no video processor, as above)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length=256,
        chat_template=None,
        **kwargs,
    ):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


# Processor classes of this package, found by the `processor_class` that
# save_pretrained writes; everything else loads through AutoProcessor.
OWN_PROCESSORS = {
    "Qwen2VLImageOnlyProcessor": Qwen2VLImageOnlyProcessor,
    "LlavaOnevisionImageOnlyProcessor": LlavaOnevisionImageOnlyProcessor,
    "InternVLImageOnlyProcessor": InternVLImageOnlyProcessor,
}
