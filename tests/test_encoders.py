import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from embcache import encoders as enc
from tiny_encoders import register_tiny_open_clip, tiny_bert_dir, tiny_timm_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert_dir(str(tmp_path_factory.mktemp("bert")))


def test_default_image_encoder_holds_the_shipped_imagenet_weights():
    encoder = enc.load_image_encoder()
    shipped = torch.load(enc.efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    shipped = [v for k, v in shipped.items() if not k.startswith("_fc.")]
    loaded = list(encoder.module.state_dict().values())
    assert len(loaded) == len(shipped)
    assert all(torch.equal(a, b) for a, b in zip(loaded, shipped))
    # torch.hub names weight files after the first 8 hex digits of their sha256: this is the published file.
    assert encoder.attrs["checkpoint_sha256"].startswith("57934424")
    assert encoder.dim == 1280 and encoder.attrs["pooling"] == "avg"


def test_positional_loading_refuses_a_shape_mismatch():
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    state = dict(model.state_dict())
    first = next(iter(state))
    state[first] = torch.zeros(1, 2, 3)
    with pytest.raises(enc.EncoderError, match="does not fit"):
        enc.load_state_dict_by_position(model, state)


def test_text_mean_pooling_ignores_padding(bert_dir):
    encoder = enc.load_text_encoder(f"hf:{bert_dir}", pooling="mean", max_length=32)
    alone = encoder.encode(encoder.preprocess(["a short text"]), CPU)
    padded = encoder.encode(encoder.preprocess(["a short text", "a much longer text with many more words in it"]), CPU)
    assert encoder.dim == 32
    torch.testing.assert_close(alone[0], padded[0], rtol=1e-4, atol=1e-5)


def test_text_cls_pooling_is_the_first_token(bert_dir):
    encoder = enc.load_text_encoder(f"hf:{bert_dir}", pooling="cls")
    tokens = encoder.preprocess(["hello there"])
    hidden = encoder.module(**tokens).last_hidden_state
    torch.testing.assert_close(encoder.encode(tokens, CPU), hidden[:, 0])


def test_timm_checkpoint_and_fingerprint(tmp_path):
    ckpt = tiny_timm_checkpoint(str(tmp_path / "w.pth"))
    encoder = enc.load_image_encoder("timm:test_efficientnet", ckpt)
    assert encoder.attrs["checkpoint_sha256"] == enc.sha256_file(ckpt)
    x = encoder.preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert x.shape[0] == 3 and encoder.encode(x[None], CPU).shape == (1, encoder.dim)


@pytest.mark.parametrize("arch", ["test_vit", "test_convnext"])
def test_timm_checkpoint_with_its_classifier_head_loads(tmp_path, arch):
    """A timm checkpoint as published (ViT `head.*`, ConvNeXt `head.fc.*`) loads into the headless encoder."""
    import timm

    path = str(tmp_path / "w.pth")
    torch.manual_seed(0)
    full = timm.create_model(arch, pretrained=False)
    torch.save(full.state_dict(), path)
    encoder = enc.load_image_encoder(f"timm:{arch}", path)
    x = encoder.preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))[None]
    full.reset_classifier(0)
    full.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(x, CPU).float(), full(x).float(), rtol=2e-2, atol=2e-2)


def test_timm_without_checkpoint_is_refused():
    with pytest.raises(enc.EncoderError, match="--image-checkpoint"):
        enc.load_image_encoder("timm:test_efficientnet")


def test_open_clip_vit_backend(tmp_path):
    name = register_tiny_open_clip(str(tmp_path))
    encoder = enc.load_image_encoder(f"open_clip:{name}")
    x = encoder.preprocess(Image.new("RGB", (64, 64), (0, 0, 255)))
    assert encoder.encode(x[None], CPU).shape == (1, 24) and encoder.dim == 24


def test_bad_specs_name_the_problem():
    with pytest.raises(enc.EncoderError, match="backend:model"):
        enc.load_image_encoder("efficientnet")
    with pytest.raises(enc.EncoderError, match="unknown image backend"):
        enc.load_image_encoder("keras:resnet")
    with pytest.raises(enc.EncoderError, match="unknown text backend"):
        enc.load_text_encoder("timm:bert")


def test_bitfit_deltas_are_added_and_checked_against_the_base(bert_dir, tmp_path):
    base = enc.load_text_encoder(f"hf:{bert_dir}")
    name = "encoder.layer.0.output.dense.bias"
    delta = torch.full_like(dict(base.module.named_parameters())[name], 0.5)
    path = str(tmp_path / "d.safetensors")
    save_file({f"delta.{name}": delta}, path, metadata={"base_checkpoint_sha256": base.attrs["checkpoint_sha256"]})
    tuned = enc.load_text_encoder(f"hf:{bert_dir}", bitfit=path)
    before, after = dict(base.module.named_parameters())[name], dict(tuned.module.named_parameters())[name]
    torch.testing.assert_close(after, before + 0.5)
    assert tuned.attrs["bitfit_sha256"] == enc.sha256_file(path)
    wrong = str(tmp_path / "wrong.safetensors")
    save_file({f"delta.{name}": delta}, wrong, metadata={"base_checkpoint_sha256": "0" * 64})
    with pytest.raises(enc.EncoderError, match="tuned on checkpoint"):
        enc.load_text_encoder(f"hf:{bert_dir}", bitfit=wrong)


def test_bitfit_files_must_name_their_base_and_fit_the_shapes(bert_dir, tmp_path):
    base = enc.load_text_encoder(f"hf:{bert_dir}")
    name = "encoder.layer.0.output.dense.bias"
    shape = dict(base.module.named_parameters())[name].shape
    anonymous = str(tmp_path / "anon.safetensors")
    save_file({f"delta.{name}": torch.zeros(shape)}, anonymous)
    with pytest.raises(enc.EncoderError, match="base_checkpoint_sha256"):
        enc.load_text_encoder(f"hf:{bert_dir}", bitfit=anonymous)
    wrong_shape = str(tmp_path / "shape.safetensors")
    save_file({f"delta.{name}": torch.zeros(3)}, wrong_shape,
              metadata={"base_checkpoint_sha256": base.attrs["checkpoint_sha256"]})
    with pytest.raises(enc.EncoderError, match="has shape"):
        enc.load_text_encoder(f"hf:{bert_dir}", bitfit=wrong_shape)
