"""Grounding boxes as data: InternVL2's `<ref>label</ref><box>[[x1, y1, x2, y2], ...]</box>` parsed.

InternVL2 answers grounding prompts ("Please provide the bounding box coordinates of the region this
sentence describes: <ref>{}</ref>") with boxes on a 0-1000 scale of the image's width and height
(upstream's evaluation maps them back with `x / 1000 * width`). For a turn with exactly one image the
boxes are given in pixels of the original image; otherwise (several images or video frames, which the
text does not tell apart) in normalised 0-1 coordinates with no image index. The text itself is
never changed.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

BOX_SCALE = 1000.0  # upstream's coordinate range

# A box group, with the label of the `<ref>` right before it (a `<box>` may also stand alone).
_GROUP = re.compile(r"(?:<ref>(?P<label>.*?)</ref>\s*)?<box>(?P<boxes>.*?)</box>", re.S)
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


@dataclass(frozen=True)
class ImageSize:
    width: int
    height: int


@dataclass(frozen=True)
class GroundingBox:
    """One box: corners (x1, y1) top-left and (x2, y2) bottom-right.

    `image_index` is the image the box lies in when the turn has exactly one (0), None otherwise;
    `normalized` says whether the corners are fractions of the image (0-1) or pixels.
    """

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    image_index: int | None = None
    normalized: bool = True


def image_size(data: bytes) -> ImageSize | None:
    """Width and height from the file's header (Pillow reads no pixels); None if it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return ImageSize(*img.size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def parse_boxes(text: str, image_sizes: list[ImageSize | None]) -> list[GroundingBox]:
    """Every box in an answer, in order; pixels when the turn had one image of known size."""
    size = image_sizes[0] if len(image_sizes) == 1 else None
    boxes: list[GroundingBox] = []
    for group in _GROUP.finditer(text):
        label = (group.group("label") or "").strip()
        for match in _BOX.finditer(group.group("boxes")):
            x1, y1, x2, y2 = (min(max(float(v), 0.0), BOX_SCALE) / BOX_SCALE for v in match.groups())
            if size is None:
                boxes.append(GroundingBox(label, x1, y1, x2, y2))
            else:
                boxes.append(GroundingBox(label, x1 * size.width, y1 * size.height, x2 * size.width,
                                          y2 * size.height, image_index=0, normalized=False))
    return boxes
