"""Hidden states: the transformer blocks of a frozen encoder, the hooks that capture what enters its last k blocks
(`embcache extract --cache-layers k`), and a runner that replays those k blocks from the cached states.

`embcache.prompts` builds its read-only prompt predictor on the runner (the paper's predictor; docs/training.md).
Backends: Hugging Face BERT-like encoders (`encoder.layer[i]` with attention.self.{query,key,value},
attention.output, intermediate, output: BERT, MiniLM, RoBERTa...) and open_clip ViTs (`transformer.resblocks`
of ResidualAttentionBlock). Others (timm CNNs, timm ViTs, open_clip custom blocks) have no runner here:
`blocks_of` returns None and the MLP predictor is used for them.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embcache.config import FitError

HIDDEN_KEY = "{}/hidden"          # keys of the hidden states in a split's `emb` dict (and in the batch dict)
MASK_KEY = "{}/hidden_mask"


class PromptError(FitError):
    """An encoder or a cache that the prompt predictor cannot use."""


# ------------------------------------------------------------------------------------------------
# Finding the blocks of an encoder
# ------------------------------------------------------------------------------------------------
def _bert_like(module: nn.Module) -> bool:
    layers = getattr(getattr(module, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return False
    layer = layers[0]
    sa = getattr(getattr(layer, "attention", None), "self", None)
    return (all(hasattr(sa, n) for n in ("query", "key", "value", "scaling", "attention_head_size"))
            and hasattr(layer.attention, "output") and hasattr(layer, "feed_forward_chunk")
            and not getattr(module.config, "is_decoder", False))


def _open_clip_vit(module: nn.Module) -> bool:
    blocks = getattr(getattr(module, "transformer", None), "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        return False
    from open_clip.transformer import ResidualAttentionBlock

    return (all(type(b) is ResidualAttentionBlock for b in blocks) and getattr(module, "attn_pool", None) is None
            and getattr(module, "pool_type", "tok") in ("tok", "avg") and hasattr(module, "ln_post"))


def blocks_of(backend: str, module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(family, the encoder's transformer blocks) or None when there is no runner for this encoder."""
    if backend == "hf" and _bert_like(module):
        return "bert", module.encoder.layer
    if backend == "open_clip" and _open_clip_vit(module):
        return "open_clip", module.transformer.resblocks
    return None


def why_no_blocks(backend: str, module: nn.Module) -> str:
    if backend == "timm":
        return "it has no transformer blocks with a prompt runner (timm encoders are not supported)"
    if backend == "open_clip":
        return "its blocks are not plain open_clip ViT ResidualAttentionBlocks with token pooling"
    if backend == "hf":
        return "it is not a BERT-like Hugging Face encoder (encoder.layer[i].attention.self.query/key/value)"
    return f"the {backend} backend has no transformer blocks"


class StateCapture:
    """Forward pre-hook on block L-k that records the hidden states entering it, batch-first (B, T, W)."""

    def __init__(self, family: str, batch_first: bool = True):
        self.family, self.batch_first = family, batch_first
        self.states: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("q_x"))
        if not self.batch_first:
            x = x.transpose(0, 1)
        self.states.append(x.detach().float())


def top_blocks(backend: str, module: nn.Module, k: int, what: str) -> tuple[str, list]:
    """(family, blocks) of an encoder that has at least k transformer blocks, else a PromptError."""
    found = blocks_of(backend, module)
    if found is None:
        raise PromptError(why_no_blocks(backend, module))
    family, blocks = found
    if not 1 <= k <= len(blocks):
        raise PromptError(f"{what} {k}: the encoder has {len(blocks)} transformer blocks")
    return family, blocks


def attach_capture(backend: str, module: nn.Module, k: int) -> tuple[StateCapture, int]:
    """Hook the input of the k-th block from the end; returns (capture, index of that block)."""
    family, blocks = top_blocks(backend, module, k, "--cache-layers")
    batch_first = True if family == "bert" else bool(getattr(module.transformer, "batch_first", True))
    capture = StateCapture(family, batch_first)
    index = len(blocks) - k
    blocks[index].register_forward_pre_hook(capture, with_kwargs=True)
    return capture, index


# ------------------------------------------------------------------------------------------------
# Top-k runners
# ------------------------------------------------------------------------------------------------
class TopKOutput(NamedTuple):
    pooled: torch.Tensor | None        # (B, D) the encoder's pooled embedding, as it computes it
    tokens: torch.Tensor | None        # (B, T, W) the real tokens' outputs of the last block
    prompts: torch.Tensor | None       # (B, K, W) the prompts' outputs of the last block
    prompt_pooled: torch.Tensor | None # (B, W) their mean (after the encoder's final norm, if any)


class TopKRunner(nn.Module):
    """The encoder's last k blocks and its pooling: forward(hidden (B,T,W), mask (B,T) or None, prompts (K,W)
    or None) -> TopKOutput."""

    family = ""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in blocks)
        for m in self.blocks.modules():  # no extraction hooks (StateCapture) ride along with the copies
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks_with_kwargs.clear()
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen encoder blocks: always eval (no dropout on real tokens)
        return super().train(False)

    def bias_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.blocks.named_parameters() if n.endswith("bias")]

    @property
    def width(self) -> int:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                prompts: torch.Tensor | None = None, real_output: bool = True) -> TopKOutput:
        """real_output False: skip the last block's real-token path (the prompts only read its input)."""
        if mask is not None:
            # A row without any real token (an absent modality) would attend to nothing (NaN): let it see its
            # first (zero) token instead; its prediction is discarded anyway.
            mask = mask.bool()
            mask = torch.cat([mask[:, :1] | ~mask.any(1, keepdim=True), mask[:, 1:]], dim=1)
        ctx = self.context(hidden, mask)
        x = self.to_native(hidden)
        p = None if prompts is None else self.to_native(prompts.unsqueeze(0).expand(hidden.shape[0], -1, -1))
        grad = torch.is_grad_enabled() and any(q.requires_grad for q in self.blocks.parameters())
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x_next = None
            if real_output or not last:
                with torch.set_grad_enabled(grad):
                    x_next = self.real_block(block, x, ctx)
            if p is not None:
                p = self.prompt_block(block, p, x, ctx)
            x = x_next
        p = None if p is None else self.from_native(p)
        prompt_pooled = None if p is None else self.prompt_pool(p)
        if x is None:
            return TopKOutput(None, None, p, prompt_pooled)
        x = self.from_native(x)
        return TopKOutput(self.pool(x, mask), x, p, prompt_pooled)

    # per family
    def context(self, hidden, mask):
        return None

    def to_native(self, x):
        return x

    def from_native(self, x):
        return x

    def real_block(self, block, x, ctx):
        raise NotImplementedError

    def prompt_block(self, block, p, x, ctx):
        raise NotImplementedError

    def pool(self, x, mask):
        raise NotImplementedError

    def prompt_pool(self, p):
        return p.mean(1)


class BertTopK(TopKRunner):
    """Hugging Face BERT-like layers (post-LN): the real path is `layer(x, extended_mask)` as in BertEncoder."""

    family = "bert"

    def __init__(self, model: nn.Module, k: int, pooling: str):
        super().__init__(list(model.encoder.layer[len(model.encoder.layer) - k:]))
        self.config = model.config
        self.pooling = pooling

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)

    def context(self, hidden, mask):
        from transformers.masking_utils import create_bidirectional_mask

        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return mask, create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask.long())

    def real_block(self, block, x, ctx):
        return block(x, ctx[1])

    def prompt_block(self, block, p, x, ctx):
        sa = block.attention.self
        b, n_p, _ = p.shape
        heads, dh = -1, sa.attention_head_size
        q = sa.query(p).view(b, n_p, heads, dh).transpose(1, 2)
        k = sa.key(x).view(b, x.shape[1], heads, dh).transpose(1, 2)
        v = sa.value(x).view(b, x.shape[1], heads, dh).transpose(1, 2)
        keys = ctx[0][:, None, None, :]  # prompts attend to the real (unpadded) tokens only
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=sa.scaling)
        o = o.transpose(1, 2).reshape(b, n_p, -1)
        return block.feed_forward_chunk(block.attention.output(o, p))

    def pool(self, x, mask):  # as encoders.HFPooledForward
        if self.pooling == "cls":
            return x[:, 0]
        m = (torch.ones(x.shape[:2], device=x.device) if mask is None else mask).unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class OpenClipTopK(TopKRunner):
    """open_clip ViT resblocks (pre-LN): the real path is `block(x, attn_mask=None)` as in Transformer.forward;
    pooling as VisionTransformer.forward (ln_post, class token or patch mean, then `@ proj`)."""

    family = "open_clip"

    def __init__(self, visual: nn.Module, k: int):
        blocks = visual.transformer.resblocks
        super().__init__(list(blocks[len(blocks) - k:]))
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        self.ln_post = copy.deepcopy(visual.ln_post).requires_grad_(False)
        self.final_ln_after_pool = bool(getattr(visual, "final_ln_after_pool", False))
        self.pool_type = getattr(visual, "pool_type", "tok")
        self.register_buffer("proj", None if visual.proj is None else visual.proj.detach().clone())
        self._width = int(visual.transformer.width)

    @property
    def width(self) -> int:
        return self._width

    def to_native(self, x):
        return x if self.batch_first else x.transpose(0, 1)

    def from_native(self, x):
        return x if self.batch_first else x.transpose(0, 1)

    def real_block(self, block, x, ctx):
        return block(x, attn_mask=None)

    def prompt_block(self, block, p, x, ctx):
        kv = block.ln_1(x)
        p = p + block.ls_1(block.attention(q_x=block.ln_1(p), k_x=kv, v_x=kv))
        return p + block.ls_2(block.mlp(block.ln_2(p)))

    def _global_pool(self, x):
        return x[:, 1:].mean(1) if self.pool_type == "avg" else x[:, 0]

    def pool(self, x, mask):
        if self.final_ln_after_pool:
            pooled = self.ln_post(self._global_pool(x))
        else:
            pooled = self._global_pool(self.ln_post(x))
        return pooled if self.proj is None else pooled @ self.proj

    def prompt_pool(self, p):
        return self.ln_post(p.mean(1))


def make_runner(backend: str, module: nn.Module, k: int, pooling: str = "mean") -> TopKRunner:
    family, _ = top_blocks(backend, module, k, "k =")
    return BertTopK(module, k, pooling) if family == "bert" else OpenClipTopK(module, k)


def runner_from_attrs(attrs: dict) -> TopKRunner:
    """Rebuild the last `cache_layers` blocks of the encoder a cache was made with, from its checkpoint."""
    from embcache.encoders import EncoderError, load_image_encoder, load_text_encoder

    k = int(attrs.get("cache_layers") or 0)
    if k < 1:
        raise PromptError("the store holds no hidden states for this modality (extract with --cache-layers k)")
    spec = attrs["model"]
    try:
        if attrs["backend"] == "hf":
            encoder = load_text_encoder(spec, attrs["pooling"], int(attrs["preprocess"]["max_length"]),
                                        attrs.get("bitfit"), attrs["dtype"])
        else:
            encoder = load_image_encoder(spec, attrs.get("checkpoint"), attrs.get("bitfit"), attrs["dtype"])
    except (EncoderError, OSError) as exc:
        raise PromptError(f"cannot rebuild the encoder {spec} the cache was made with: {exc}") from exc
    if encoder.attrs["checkpoint_sha256"] != attrs["checkpoint_sha256"]:
        raise PromptError(f"{spec}: the weights found now (sha256 {encoder.attrs['checkpoint_sha256'][:12]}...) are "
                          f"not those the cache was made with ({attrs['checkpoint_sha256'][:12]}...)")
    return make_runner(attrs["backend"], encoder.module, k, attrs.get("pooling", "mean"))



def hidden_bytes(n_rows: int, tokens: int, width: int, dtype: str) -> int:
    """Uncompressed size of one modality's hidden states (an upper bound of what lands on disk)."""
    return n_rows * tokens * width * np.dtype(dtype).itemsize

