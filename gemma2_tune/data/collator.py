"""Batches for image + text checkpoints: blocks with and without images in one batch.

On top of BlockCollator's padding (packing.py), every batch carries the token-type input the family's image mask
reads (`token_type_ids` for Gemma 3, `mm_token_type_ids` for Gemma 4: 1 on image soft tokens, 0 elsewhere,
padding included), always, also for a batch of text rows: without it transformers silently builds a causal mask
over image tokens (Gemma 3 since transformers 5.6). A batch's images are made into pixels here, through the
checkpoint's image processor, in the order their soft tokens appear (row by row): the model puts image k's
features in the k-th run of soft tokens of the batch.

    batch = ImageBlockCollator(pad_token_id, images=processing, dtype="bfloat16")(items)
    # input_ids, labels, position_ids (batch, length); token_type_ids or mm_token_type_ids (batch, length);
    # with images: pixel_values (images, ...) in `dtype`; Gemma 4: image_position_ids (images, patches, 2)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .images import ImageProcessing, image_from_record, image_record
from .packing import Block, BlockCollator
from .turns import BadRow

# a dataset column: per item, its images as JSON (data/images.py image_record). Not "images": TRL takes a dataset
# with that column for one it must process itself (SFTTrainer refuses it for a tokenizer); here rows come tokenized
IMAGES_COLUMN = "image_records"


def images_column(blocks: list[Block]) -> list[str] | None:
    """The IMAGES_COLUMN of a dataset of `blocks` (JSON text per item), or None when no block has images."""
    if not any(b.images for b in blocks):
        return None
    return [json.dumps([image_record(i) for i in b.images]) for b in blocks]


@dataclass
class ImageBlockCollator(BlockCollator):
    """BlockCollator plus the token types of the family's image mask (always) and the pixels of the batch's
    images. `images`: the checkpoint's ImageProcessing; `soft_token_id`/`token_type_key`: from it (or given, for
    a checkpoint without an image processor trained on text); `dtype`: the model's (pixel values are cast to it).

    Raises UserError when an image file changed or disappeared since the data was read, or when the soft tokens of
    the batch and its images' disagree (a cache from another processor: never silently misplaced features)."""

    images: ImageProcessing | None = None
    soft_token_id: int = -1
    token_type_key: str = "token_type_ids"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.images is not None:
            self.soft_token_id, self.token_type_key = self.images.ids["soft"], self.images.token_type_key

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = super().__call__(features)
        soft = batch["input_ids"] == self.soft_token_id
        batch[self.token_type_key] = soft.long()
        images = [image_from_record(r) for f in features for r in json.loads(f.get(IMAGES_COLUMN) or "[]")]
        if not images:
            return batch
        if self.images is None:
            raise UserError("a batch holds images but the checkpoint has no image processor")
        try:
            out = self.images.features(images)
        except BadRow as exc:
            raise UserError(f"data: {exc}") from None
        if sum(out["soft_tokens"]) != int(soft.sum()):
            raise UserError(f"data: a batch has {int(soft.sum())} image soft tokens but its images make "
                            f"{sum(out['soft_tokens'])}: the tokenized data does not match this image processor; "
                            "delete its cache entry and run again")
        batch["pixel_values"] = out["pixel_values"].to(getattr(torch, self.dtype))
        if "image_position_ids" in out:
            batch["image_position_ids"] = out["image_position_ids"]
        return batch
