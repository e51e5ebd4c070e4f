"""Image decoding (embcache/images.py): every input is turned into RGB the way a person sees it."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, features

from embcache import bundle, extract, images
from embcache import store as st
from embcache.encoders import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from tiny_encoders import tiny_extract_options

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures")
PRE = ImagePreprocess(size=16, resize=18, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def pixels(path) -> torch.Tensor:
    tensor, reason = images.read_image(str(path), PRE)
    assert reason is None
    return tensor


def decoded(path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        out = images.to_rgb(image)
    assert out.mode == "RGB"
    return np.asarray(out)


def on_white(rgb, alpha) -> np.ndarray:
    """The white composite, written independently of the implementation."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


def save_rgb(array, path) -> str:
    Image.fromarray(array, "RGB").save(path)
    return str(path)


def test_one_decoder_for_extract_tune_and_predict():
    assert extract.read_image is images.read_image and bundle.read_image is images.read_image
    assert PRE.config["decode"] == images.DECODE


def test_transparent_png_equals_its_white_composited_copy(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    rgba[:5, :, 3], rgba[5:10, :, 3] = 0, 255  # fully transparent and fully opaque bands
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    expected = on_white(rgba[..., :3], rgba[..., 3])
    copy = save_rgb(expected, tmp_path / "white.png")
    assert np.array_equal(decoded(tmp_path / "a.png"), expected)
    assert torch.equal(pixels(tmp_path / "a.png"), pixels(copy))
    assert np.all(decoded(tmp_path / "a.png")[:5] == 255)  # transparent is white, not black


def test_black_icon_on_transparency_is_not_black_on_black(tmp_path):
    icon = np.zeros((16, 16, 4), np.uint8)
    icon[4:12, 4:12, 3] = 255  # a black square, the rest transparent (and black underneath)
    Image.fromarray(icon, "RGBA").save(tmp_path / "icon.png")
    out = decoded(tmp_path / "icon.png")
    assert np.all(out[4:12, 4:12] == 0) and np.all(out[:4] == 255)


def test_palette_with_transparency_bytes(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 12)
    index = np.array([[0, 1, 2, 3]] * 4, np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette)
    alpha = bytes([0, 128, 255, 64])  # tRNS: one alpha per palette entry
    image.save(tmp_path / "p.png", transparency=alpha)
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P" and isinstance(check.info["transparency"], bytes)
    rgb = np.array(palette[:12], np.uint8).reshape(4, 3)[index]
    expected = on_white(rgb, np.array(list(alpha), np.uint8)[index])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency expressed in bytes" warning
        out = decoded(tmp_path / "p.png")
        tensor = pixels(tmp_path / "p.png")
    assert np.array_equal(out, expected)
    assert torch.equal(tensor, pixels(save_rgb(expected, tmp_path / "white.png")))


def test_palette_gif_with_a_transparent_index(tmp_path):
    index = np.array([[0, 1], [1, 0]], np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * (254 * 3))
    image.save(tmp_path / "t.gif", transparency=0)
    assert np.array_equal(decoded(tmp_path / "t.gif"),
                          np.array([[[255] * 3, [200, 10, 10]], [[200, 10, 10], [255] * 3]], np.uint8))


def test_la(tmp_path):
    la = np.stack([np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1)),
                   np.repeat(np.array([0, 100, 200, 255], np.uint8)[:, None], 16, axis=1)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    grey = np.repeat(la[..., :1], 3, axis=2)
    expected = on_white(grey, la[..., 1])
    assert np.array_equal(decoded(tmp_path / "la.png"), expected)
    assert torch.equal(pixels(tmp_path / "la.png"), pixels(save_rgb(expected, tmp_path / "white.png")))


@pytest.mark.parametrize("mode,key,fill", [("RGB", (10, 20, 30), (10, 20, 30)), ("L", 7, 7)])
def test_colour_key_transparency(tmp_path, mode, key, fill):
    image = Image.new(mode, (6, 4), fill)
    image.putpixel((0, 0), (1, 2, 3) if mode == "RGB" else 90)
    image.save(tmp_path / "k.png", transparency=key)
    out = decoded(tmp_path / "k.png")
    first = [1, 2, 3] if mode == "RGB" else [90] * 3
    assert out[0, 0].tolist() == first and np.all(out.reshape(-1, 3)[1:] == 255)


# EXIF orientation -> the transpose that shows the picture upright (EXIF 2.32, tag 0x0112).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270,
           8: Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_rotated_jpeg_equals_the_rotated_pixels(tmp_path, orientation):
    y, x = np.mgrid[0:24, 0:40]
    array = np.stack([x * 6, y * 10, 255 - x * 6], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    Image.fromarray(array).save(tmp_path / "r.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "r.jpg") as raw:  # the stored pixels, not rotated
        upright = raw.convert("RGB").transpose(UPRIGHT[orientation])
    out = decoded(tmp_path / "r.jpg")
    assert out.shape[:2] == (upright.height, upright.width)
    assert np.array_equal(out, np.asarray(upright))
    assert torch.equal(pixels(tmp_path / "r.jpg"), pixels(save_rgb(np.asarray(upright), tmp_path / "up.png")))


def test_cmyk(tmp_path):
    values = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)]
    image = Image.new("CMYK", (len(values), 1))
    for i, v in enumerate(values):
        image.putpixel((i, 0), v)
    image.save(tmp_path / "c.tif")
    assert decoded(tmp_path / "c.tif")[0].tolist() == [[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0],
                                                      [255, 255, 255]]


def test_16_bit_greyscale_png_is_scaled_not_saturated(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 1000, 30000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")  # I;16 (or I with older Pillow)
    out = decoded(tmp_path / "g16.png")
    assert out[0, :, 0].tolist() == [0, 100, 255, 4, 117] and np.all(out == out[..., :1])


def test_32_bit_integer_and_float_greyscale():
    integer = images.to_rgb(Image.fromarray(np.array([[0, 65535, 70000, -5]], np.int32)))
    assert np.asarray(integer)[0, :, 0].tolist() == [0, 255, 255, 0]
    floats = images.to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0, 3.0, -1.0]], np.float32)))
    assert np.asarray(floats)[0, :, 0].tolist() == [0, 128, 255, 255, 0]


def test_one_bit(tmp_path):
    image = Image.new("1", (4, 2), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "b.png")
    out = decoded(tmp_path / "b.png")
    assert out[..., 0].tolist() == [[0, 255, 0, 0], [0, 0, 0, 0]] and np.all(out == out[..., :1])


@pytest.mark.parametrize("mode", ["L", "P", "YCbCr", "RGBX"])
def test_other_modes_convert_as_pil_does(mode):
    image = Image.new("RGB", (4, 4), (200, 30, 90)).convert(mode)
    assert np.array_equal(np.asarray(images.to_rgb(image)), np.asarray(image.convert("RGB")))


ANIMATED = [("gif", {}), ("png", {}), ("webp", {"lossless": True})]


@pytest.mark.parametrize("ext,options", ANIMATED)
def test_animated_images_give_their_first_frame(tmp_path, ext, options):
    if ext == "webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / f"anim.{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0, **options)
    with Image.open(path) as check:
        assert check.n_frames == 3
        check.seek(2)  # a caller that left the image on another frame still gets the first
        assert np.all(np.asarray(images.to_rgb(check)) == [255, 0, 0])
    assert np.all(decoded(path) == [255, 0, 0])
    assert torch.equal(pixels(path), pixels(save_rgb(np.asarray(frames[0]), tmp_path / "first.png")))


def test_a_pil_image_given_to_predict_is_decoded_by_the_same_rules():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.equal(PRE(rgba), PRE(Image.new("RGB", (8, 8), (255, 255, 255))))


def test_decode_failures_keep_their_reason_codes(tmp_path, monkeypatch):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    good = save_rgb(noise, tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "cut.png").write_bytes(open(good, "rb").read()[:1000])
    assert images.read_image(str(tmp_path / "junk.png"), PRE) == (None, "undecodable_image")
    assert images.read_image(str(tmp_path / "cut.png"), PRE) == (None, "truncated_image")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 99)
    assert images.read_image(good, PRE) == (None, "oversized_image")


# ---------------------------------------------------------------- the rules are part of the fingerprint


def test_a_store_decoded_under_the_old_rules_is_refused_on_resume(tmp_path):
    """A store whose image `preprocess` lacks `decode` (made before the rules were versioned) is not resumed."""
    (tmp_path / "enc").mkdir()
    tiny = tiny_extract_options(tmp_path / "enc")
    root = os.path.join(FIXTURES, "hateful_memes")
    out = tmp_path / "s.zarr"
    cfg = extract.ExtractConfig(dataset="hateful_memes", root=root, out=str(out), workers=0, **tiny)
    extract.extract(cfg, progress=False, log=lambda *_: None)
    store = st.open_store(str(out), mode="r+")
    assert store.encoder("image")["preprocess"]["decode"] == images.DECODE
    # Make it look like an unfinished store written by the previous embcache.
    meta = dict(store.root.attrs[st.ATTRS_KEY])
    old = {k: v for k, v in meta["fingerprint"]["encoders"]["image"]["preprocess"].items() if k != "decode"}
    meta["fingerprint"]["encoders"]["image"]["preprocess"] = old
    meta["complete"] = False
    store.root.attrs[st.ATTRS_KEY] = meta
    store.root["image"].attrs["encoder"] = {**store.encoder("image"), "preprocess": old}
    with pytest.raises(extract.ExtractError, match=r"image\.preprocess: .*'decode': 'rgb-on-white/1'.*--overwrite"):
        extract.extract(cfg, progress=False, log=lambda *_: None)
    # Two stores decoded under different rules never pass as one (fit's --val-store / --test-store checks).
    new = st.encoder_fingerprint({**store.encoder("image"), "preprocess": {**old, "decode": images.DECODE}})
    assert st.fingerprint_diff({"encoders": {"image": st.encoder_fingerprint(store.encoder("image"))}},
                               {"encoders": {"image": new}}) != []
    extract.extract(extract.ExtractConfig(**{**cfg.__dict__, "overwrite": True}), progress=False, log=lambda *_: None)
    assert st.open_store(str(out)).encoder("image")["preprocess"]["decode"] == images.DECODE
