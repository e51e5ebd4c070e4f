"""Image decoding: the one function (`read_image`) that extract, tune and predict use to turn a file into pixels."""
from __future__ import annotations

import numpy as np

# The decoding rules below, versioned: recorded in the image encoder's `preprocess` (the cache fingerprint), so
# features decoded under other rules are never mixed with these. Change the name when the rules change.
DECODE = "rgb-on-white/1"
# Larger images are refused before decoding: one would take gigabytes (PIL only refuses above 179M pixels).
MAX_IMAGE_PIXELS = 64_000_000
DECODE_REASONS = ("undecodable_image", "truncated_image", "oversized_image")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
EXIF_ORIENTATION = 0x0112


def read_image(path, preprocess):
    """Decode and preprocess one image file (a path, or a binary file object such as the BytesIO of a shard
    member); on failure return (None, reason) instead of raising.

    `preprocess` receives the opened image and decodes it with `to_rgb` (encoders.ImagePreprocess does);
    reasons are those of DECODE_REASONS."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return None, "oversized_image"
            image.load()  # PIL decodes lazily: force it here so a truncated file fails now
            return preprocess(image), None
    except Image.DecompressionBombError:
        return None, "oversized_image"
    except OSError as exc:
        return None, "truncated_image" if "truncated" in str(exc).lower() else "undecodable_image"
    except (ValueError, SyntaxError, EOFError):  # PIL raises these for some corrupt headers and frames
        return None, "undecodable_image"


def to_rgb(image):
    """Any PIL image -> the 8-bit RGB image the encoders see (rules `DECODE`, docs/cache-format.md):

    - animated images (GIF, APNG, WebP): the first frame;
    - the EXIF orientation is applied;
    - transparency (an alpha channel, or a `transparency` key: palette bytes, a colour key) is composited on white;
    - 16/32-bit integer greyscale (I;16*, I) is read as 16-bit and scaled to 8 bits (v / 257, rounded),
      32-bit float (F) as [0, 1] (clipped, x 255, rounded); CMYK, YCbCr, LAB, 1-bit, L, P convert to RGB.
    The input image is not modified.
    """
    from PIL import ImageOps

    if getattr(image, "n_frames", 1) > 1 and image.tell() != 0:
        image.seek(0)
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block: decode the pixels as stored
        orientation = 1
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
    return _rgb(image)


def _rgb(image):
    from PIL import Image

    mode = image.mode
    transparency = image.info.get("transparency")
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = np.asarray(image)
        if mode == "F":
            grey = np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255)
        else:
            grey = np.rint(np.clip(values.astype(np.float64), 0, 65535) / 257)
        rgb = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
        if transparency is not None and not isinstance(transparency, (bytes, tuple)):
            return Image.fromarray(on_white(rgb, np.where(values == transparency, 0, 255)))
        return Image.fromarray(rgb)
    if mode in ALPHA_MODES or transparency is not None or (mode == "P" and image.palette.mode == "RGBA"):
        rgba = np.asarray(image.convert("RGBA"))  # un-premultiplies RGBa/La; palette and colour-key alpha
        return Image.fromarray(on_white(rgba[..., :3], rgba[..., 3]))
    if mode == "RGB":
        return image
    if mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransformFromOpenProfiles(ImageCms.createProfile("LAB"),
                                                            ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(image, transform)
    return image.convert("RGB")


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colour over white with (H, W) alpha in 0..255: round((c a + 255 (255 - a)) / 255)."""
    a = alpha.astype(np.uint32)[..., None]
    return ((rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
