"""Images in rows and requests: where an image part points, reading and checking its bytes, and how the
checkpoint's image processor turns it into soft tokens and pixel values.

Where an image can come from (`source_of`):
    {"type": "image_url", "image_url": {"url": URL}}      OpenAI chat completions (also "image_url": URL)
    {"type": "input_image", "image_url": URL}             OpenAI Responses API
    {"type": "image", "image": PATH}                       Hugging Face processors ("url" and "path" are read too)
URL or PATH: a local path (relative paths are resolved against the data file's folder), a file:// URL, or a
data: URL (base64). Remote URLs (http, https, any other scheme) are refused: training reads local files, and a
server fetching what a request names would reach whatever the request names.

`ImageReader` reads and checks an image (missing, unreadable, over the size limits: a BadRow naming the file);
`ImageProcessing` is the checkpoint's image processor (transformers' Gemma3ImageProcessorPil /
Gemma4ImageProcessorPil: no torchvision needed) and the text its processor puts where an image was. Gemma 4's
processor class (Gemma4Processor) cannot be built without torchvision (its video processor needs it), so the
expansion of both processors is reproduced here and tested against transformers' (tests/unit/test_images.py):

    Gemma 3: <start_of_image>  ->  "\\n\\n<start_of_image>" + <image_soft_token> x 256 + "<end_of_image>\\n\\n"
             (pan-and-scan, when on: the original image and its crops, each so, in Gemma3Processor's words)
    Gemma 4: <|image|>          ->  "<|image>" + <|image|> x n + "<image|>", n from the image's size (<= 280)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urlparse

from ..families import Family
from .turns import BadRow, Image, Rendered, Turn

# Pillow's own decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS: 89,478,485 pixels, about 1/4 GiB at 24 bits):
# a larger image is refused before it is decoded.
MAX_PIXELS = 89_478_485
DEFAULT_MAX_MB = 20.0  # OpenAI's limit per image in a request (its vision guide), the default here too
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# The Gemma 3 processor's pan-and-scan settings, used where the checkpoint's image processor leaves them null
# (Gemma3Processor.images_kwargs in transformers 5.25; the published preprocessor configs have nulls)
PAN_AND_SCAN_DEFAULTS = {"pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                         "pan_and_scan_min_ratio_to_activate": 1.2}


def source_of(part: Mapping[str, Any], where: str) -> str:
    """The URL or path an image content part points at. Raises BadRow when it names none."""
    kind = part.get("type")
    if kind in ("image_url", "input_image"):
        value = part.get("image_url")
        value = value.get("url") if isinstance(value, Mapping) else value
    else:
        value = next((part[k] for k in ("image", "url", "path") if isinstance(part.get(k), str)), None)
    if not isinstance(value, str) or not value.strip():
        expected = ('"image_url": {"url": ...}' if kind == "image_url" else '"image_url": "..."' if kind == "input_image"
                    else '"image": PATH')
        raise BadRow(f"{where} ({kind}) names no image (expected {expected})")
    return value.strip()


def _data_url(url: str, where: str) -> bytes:
    """The bytes of a base64 data: URL. Raises BadRow."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise BadRow(f"{where} is a data: URL that is not base64 (expected data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRow(f"{where} is a data: URL whose base64 does not decode") from None


@dataclass
class ImageReader:
    """Reads an image content part into an Image (turns.ReadImage), checked: the file exists and is readable, its
    bytes are at most `max_mb` MiB, Pillow decodes it, it has at most MAX_PIXELS pixels. `base`: the folder
    relative paths are resolved against (the data file's; None: the working folder). `allow_paths`: False for
    server requests (data: URLs only). Raises BadRow naming the part, the file and the reason."""

    base: Path | None = None
    max_mb: float = DEFAULT_MAX_MB
    allow_paths: bool = True

    def __call__(self, part: Mapping[str, Any], where: str) -> Image:
        source = source_of(part, where)
        return self.read(source, where)

    def read(self, source: str, where: str) -> Image:
        """An image from a URL or path string (see the module docstring), decoded once to check it."""
        data, path = self.raw(source, where)
        return self._decoded(data, where, path)

    def raw(self, source: str, where: str) -> tuple[bytes, str | None]:
        """The bytes an image source holds and, for a file, its absolute path; checked for size, not decoded."""
        scheme = _SCHEME.match(source)
        kind = scheme.group(1).lower() if scheme and len(scheme.group(1)) > 1 else None  # C:\\ is a path
        if kind == "data":
            data = _data_url(source, where)
            self._check_size(len(data), where, "the data: URL's image")
            return data, None
        if kind not in (None, "file"):
            raise BadRow(f"{where} is a remote image ({source[:60]}); " + (
                "images are read from local files or data: URLs only (nothing is fetched): download it and give its "
                "path" if self.allow_paths else "this server takes images as data: URLs only (base64) and fetches "
                "nothing: send the image's bytes"))
        if not self.allow_paths:
            raise BadRow(f"{where} is a file path; this server takes images as data: URLs only (base64), never "
                         "paths on its own disk")
        path = Path(unquote(urlparse(source).path)) if kind == "file" else Path(source).expanduser()
        if not path.is_absolute() and self.base is not None:
            path = self.base / path
        try:
            size = path.stat().st_size
            self._check_size(size, where, str(path))
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadRow(f"{where}: image {path} does not exist") from None
        except IsADirectoryError:
            raise BadRow(f"{where}: image {path} is a folder") from None
        except OSError as exc:
            raise BadRow(f"{where}: image {path} cannot be read ({exc.strerror or exc})") from None
        return data, str(path.resolve())

    def _check_size(self, size: int, where: str, what: str) -> None:
        if size > self.max_mb * 2**20:
            raise BadRow(f"{where}: {what} is {size / 2**20:.1f} MiB, over the {self.max_mb:g} MiB limit "
                         "(data.max_image_mb)")

    @staticmethod
    def _decoded(data: bytes, where: str, path: str | None) -> Image:
        width, height = image_size(data, f"{where}: image {path or '(data: URL)'}")
        return Image(hashlib.sha256(data).hexdigest(), width, height, path=path, data=None if path else data)


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) of encoded image bytes, decoded once to be sure they are an image. Raises BadRow: not an
    image Pillow reads, truncated, over MAX_PIXELS (checked before decoding)."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise BadRow(f"{what} is {width}x{height} pixels, over {MAX_PIXELS:,} (Pillow's decompression-bomb "
                             "limit)")
            img.load()
    except BadRow:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for one cause: not a readable image
        raise BadRow(f"{what} is not a readable image ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not width or not height:
        raise BadRow(f"{what} has no pixels")
    return width, height


class BadImage(BadRow):
    """An image that was read but cannot be made into pixels now (its file changed or disappeared, no image
    processor): its row is a bad row."""


def pixels(image: Image):
    """The image's pixels as an RGB PIL image: its bytes (a file read again) checked against its digest. Raises
    BadImage when the file changed or disappeared since it was read."""
    from PIL import Image as PILImage

    data = image.data
    if data is None:
        try:
            data = Path(image.path).read_bytes()
        except OSError as exc:
            raise BadImage(f"image {image.path} cannot be read any more ({exc.strerror or exc})") from None
        if hashlib.sha256(data).hexdigest() != image.digest:
            raise BadImage(f"image {image.path} changed since the data was read (its bytes differ); run again")
    with PILImage.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def image_record(image: Image) -> dict[str, Any]:
    """An Image as JSON-ready data (the tokenized cache, a dataset column): inline bytes in base64."""
    return {"digest": image.digest, "width": image.width, "height": image.height, "path": image.path,
            "data": base64.b64encode(image.data).decode() if image.data is not None else None}


def image_from_record(record: Mapping[str, Any]) -> Image:
    """The Image an `image_record` describes."""
    data = record.get("data")
    return Image(record["digest"], record["width"], record["height"], record.get("path"),
                 base64.b64decode(data) if data is not None else None)


def images_of(turns: Sequence[Turn]) -> list[Image]:
    """The Image parts of turns, in the order they are rendered."""
    return [p for t in turns for p in t.parts if isinstance(p, Image)]


# --- rows: where their images are, before reading them ----------------------------------------------------------

def row_image_sources(data: Any) -> list[str]:
    """Every image a raw row points at (content parts of its messages, its `images` column), without reading them:
    for the tokenized cache's key, which covers the images' bytes."""
    if not isinstance(data, dict):
        return []
    found = [v for v in data.get("images") or [] if isinstance(v, str)] if isinstance(data.get("images"), list) else []
    for key in ("messages", "conversations", "prompt", "completion"):
        value = data.get(key)
        if isinstance(value, list):
            for message in value:
                content = message.get("content", message.get("value")) if isinstance(message, dict) else None
                for part in content if isinstance(content, list) else []:
                    if isinstance(part, dict) and part.get("type") in ("image_url", "image", "input_image"):
                        try:
                            found.append(source_of(part, ""))
                        except BadRow:
                            continue
    return found


def images_fingerprint(rows: Sequence[Any], max_mb: float = DEFAULT_MAX_MB) -> str | None:
    """16 hex digits over the bytes of every local image the rows point at (a path resolved as ImageReader
    resolves it: against the row's file's folder), or None when no row points at an image. A file that is missing,
    unreadable or over the size limit contributes its state, so fixing it changes the key."""
    digest, seen = hashlib.sha256(), False
    for row in rows:
        base = Path(row.file).parent if getattr(row, "file", None) else None
        for source in row_image_sources(row.data):
            seen = True
            reader = ImageReader(base, max_mb)
            try:
                digest.update(hashlib.sha256(reader.raw(source, "")[0]).digest())
            except BadRow as exc:
                digest.update(str(exc).encode())
    return digest.hexdigest()[:16] if seen else None


# --- the checkpoint's image processor ---------------------------------------------------------------------------

@dataclass
class ImageProcessing:
    """The checkpoint's image processor and what its processor writes in place of an image.

    `image_processor`: transformers' image processor loaded from the checkpoint (models/loading.py
    `load_image_processing`); `ids`: the token ids of the begin marker, the soft token and the end marker;
    `image_seq_length`: Gemma 3's soft tokens per image (its processor_config.json); `pan_and_scan`: Gemma 3's
    pan-and-scan (data.pan_and_scan)."""

    family: Family
    image_processor: Any
    ids: dict[str, int]  # begin, soft, end -> token id
    image_seq_length: int = 0
    pan_and_scan: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments to the image processor

    @property
    def gemma4(self) -> bool:
        return self.family.images.processor_class == "Gemma4Processor"

    @property
    def token_type_key(self) -> str:
        """The forward's input marking image tokens: token_type_ids (Gemma 3), mm_token_type_ids (Gemma 4)."""
        return self.family.images.token_type_key

    def features(self, images: Sequence[Image]) -> dict[str, Any]:
        """The image processor's output for `images` (torch tensors): pixel_values (Gemma 3: (n, 3, H, W), one per
        image and crop; Gemma 4: (n, max_patches, 3 * patch^2)), Gemma 4's image_position_ids (n, max_patches, 2),
        and `soft_tokens`: per image, the soft tokens its expansion holds. Raises BadImage when an image's file
        changed since it was read."""
        import torch

        out = self.image_processor([pixels(i) for i in images], return_tensors="pt", **self.options)
        if self.gemma4:
            soft = [int(n) for n in out["num_soft_tokens_per_image"]]
            return {"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"],
                    "soft_tokens": soft}
        crops = [int(n) for n in out.get("num_crops", [0] * len(images))]
        return {"pixel_values": out["pixel_values"], "soft_tokens": [self.image_seq_length * (1 + c) for c in crops],
                "crops": crops}

    def expansion(self, features: dict[str, Any], k: int) -> str:
        """The text the processor puts where image `k` was (module docstring), from its `features`."""
        f = self.family.images
        if self.gemma4:
            return f.begin + f.soft_token * features["soft_tokens"][k] + f.end
        full = f"\n\n{f.begin}{f.soft_token * self.image_seq_length}{f.end}\n\n"
        crops = features["crops"][k]
        if not crops:
            return full
        return (f"Here is the original image {full} and here are some crops to help you see better "
                + " ".join([full] * crops))

    def expand(self, rendered: Rendered, images: Sequence[Image]) -> tuple[Rendered, list[tuple[int, int]], dict]:
        """A rendered conversation with each image placeholder replaced by its expansion: (the new text with its
        supervised spans moved, the character span of each image's expansion, the features). Images sit in user
        turns, outside every supervised span."""
        placeholder = self.family.images.placeholder
        starts = [m.start() for m in re.finditer(re.escape(placeholder), rendered.text)]
        if len(starts) != len(images):  # the renderer writes one placeholder per Image part, and refuses the marker
            raise ValueError(f"{len(starts)} image placeholders for {len(images)} images")
        features = self.features(images) if images else {"soft_tokens": []}
        pieces, spans, shift, pos = [], [], [], 0
        for k, start in enumerate(starts):
            pieces.append(rendered.text[pos:start])
            new_start = sum(map(len, pieces))
            text = self.expansion(features, k)
            pieces.append(text)
            spans.append((new_start, new_start + len(text)))
            shift.append((start, len(text) - len(placeholder)))
            pos = start + len(placeholder)
        pieces.append(rendered.text[pos:])

        def moved(x: int) -> int:
            return x + sum(d for s, d in shift if s < x)

        supervised = tuple((moved(a), moved(b)) for a, b in rendered.supervised)
        return Rendered("".join(pieces), supervised), spans, features

    def is_image_token(self, token_id: int) -> bool:
        """Is this id one of an image's tokens (begin marker, soft token, end marker)? Never learned."""
        return token_id in self.ids.values()

    def describe(self) -> str:
        """The processor's resolution in words, e.g. 'Gemma3ImageProcessorPil: 896x896 pixels, 256 soft tokens per
        image, pan-and-scan off'."""
        ip = self.image_processor
        name = type(ip).__name__
        if self.gemma4:
            per = ip.max_soft_tokens
            side = ip.patch_size * ip.pooling_kernel_size
            return (f"{name}: up to {per} soft tokens per image ({per * ip.pooling_kernel_size ** 2} patches of "
                    f"{ip.patch_size}x{ip.patch_size} pixels; each image resized keeping its aspect ratio to sides "
                    f"that are multiples of {side} pixels)")
        size = ip.size
        return (f"{name}: {size.height}x{size.width} pixels, {self.image_seq_length} soft tokens per image, "
                f"pan-and-scan {'on (up to ' + str(self.options.get('pan_and_scan_max_num_crops')) + ' crops more)' if self.pan_and_scan else 'off'}")

    def save(self, folder: Path) -> None:
        """Write processor_config.json into a model or run folder as the published checkpoints ship it (the image
        processor's settings, Gemma 3's soft tokens per image, the processor class), so chat, serve, merge and
        export read the same image processor from it."""
        settings = json.loads(self.image_processor.to_json_string())
        record = {"image_processor": settings, "processor_class": self.family.images.processor_class,
                  "image_seq_length": self.image_seq_length or getattr(self.image_processor, "max_soft_tokens", 0)}
        (Path(folder) / "processor_config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    def fingerprint(self) -> str:
        """16 hex digits over what changes an image's tokens and pixels: the image processor's settings, the soft
        tokens per image, pan-and-scan."""
        text = self.image_processor.to_json_string() + json.dumps(
            [self.image_seq_length, self.pan_and_scan, self.options, self.ids], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
