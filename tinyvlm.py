"""
tinyvlm: TinyGPT-V (arXiv 2312.16862) in one file of plain PyTorch.

    image (B, 3, 224, 224)
      -> ViT            EVA ViT-g/14, 39 pre-LN blocks                  (B, 257, 1408)
      -> ln_vision      LayerNorm                                       (B, 257, 1408)
      -> QFormer        32 learned queries; self-attention every layer,
                        cross-attention to the image every 2nd layer    (B, 32, 768)
      -> llama_proj     Linear 768 -> 4096   (MiniGPT-4's projection)
      -> llama_proj2    Linear 4096 -> 2560  (no activation in between)  (B, 32, 2560)
      -> spliced into the prompt where it says <ImageHere>
      -> Phi            Phi-2 with TinyGPT-V's QK-norm and post-attention RMSNorm, LoRA on qkv and dense
      -> next-token logits                                               (B, T, 51200)

Reading order: configs and presets, the building blocks (norms, activations, RoPE), ViT, QFormer, Phi, LoRA,
TinyVLM, generation, then the loaders for the public checkpoints (explicit key maps, loud failures).
The reference facts (shapes, key names, recipes) are in the project's spec, TINYGPTV.md.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import mmap
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_TOKEN = -200     # placeholder id: the 32 input positions that receive the image embeddings
IGNORE_INDEX = -100    # label of every position that is not part of the answer


# ----------------------------------------------------------------------------------------------------------------------
# Configs: one dataclass per part, and named presets

@dataclass
class ViTConfig:
    """A plain ViT that covers EVA ViT-g/14 as BLIP-2 cuts it (the default), CLIP ViT-L and SigLIP."""
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    num_layers: int = 39        # EVA-CLIP has 40 blocks; BLIP-2 takes the output of block 39 (index 38)
    num_heads: int = 16
    mlp_dim: int = 6144
    act: str = "gelu"           # "gelu" (erf) for EVA, "quick_gelu" for CLIP, "gelu_tanh" for SigLIP
    eps: float = 1e-6
    cls_token: bool = True      # SigLIP has none
    patch_bias: bool = True     # CLIP's patch embedding has no bias
    pre_norm: bool = False      # CLIP's "pre_layrnorm" before the first block
    ln_vision: bool = True      # BLIP-2's LayerNorm on the ViT output; LLaVA-style systems use raw block features
    ln_vision_eps: float = 1e-5  # LAVIS (what TinyGPT-V ran) uses 1e-5; HF's post_layernorm 1e-6 (a loader reads it)

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + int(self.cls_token)


@dataclass
class QFormerConfig:
    """BLIP-2's Querying Transformer: a BERT-base with 32 learned queries and no text branch."""
    num_queries: int = 32
    hidden: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    vision_width: int = 1408
    cross_attention_every: int = 2   # layers 0, 2, 4, ... cross-attend to the image
    eps: float = 1e-12


@dataclass
class PhiConfig:
    """microsoft/phi-2, with TinyGPT-V's two additions as switches (both off = exactly Phi-2)."""
    vocab_size: int = 51200
    hidden: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    mlp_dim: int = 10240
    rotary_dim: int = 32        # RoPE on the first 32 of 80 head dims (partial_rotary_factor 0.4)
    rope_theta: float = 10000.0
    eps: float = 1e-5
    max_positions: int = 2048
    resid_dropout: float = 0.0  # phi-2's config.json says 0.1; the loader takes it from there
    qk_norm: bool = False       # TinyGPT-V: LayerNorm(head_dim) on q and k, per head, before RoPE
    post_attn_norm: bool = False  # TinyGPT-V: RMSNorm on the attention output only
    post_attn_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021). TinyGPT-V: r 64, alpha 16, dropout 0.05 on the attention's qkv and dense."""
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("self_attn.qkv", "self_attn.dense")


@dataclass
class TinyVLMConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    phi: PhiConfig = field(default_factory=lambda: PhiConfig(qk_norm=True, post_attn_norm=True))
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)
    # "qformer": TinyGPT-V / BLIP-2 (Q-Former, then two linear projections).
    # "mlp": LLaVA-1.5 / TinyLLaVA (every ViT token through Linear-GELU-Linear, no Q-Former).
    connector: str = "qformer"
    proj_dim: int = 4096        # width between llama_proj and llama_proj2 (MiniGPT-4's LLaMA width)

    @property
    def num_image_tokens(self) -> int:
        return self.qformer.num_queries if self.connector == "qformer" else self.vit.num_positions

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyVLMConfig":
        lora = d.get("lora")
        if lora is not None:
            lora = LoRAConfig(**{**lora, "targets": tuple(lora["targets"])})
        return cls(vit=ViTConfig(**d["vit"]), qformer=QFormerConfig(**d["qformer"]), phi=PhiConfig(**d["phi"]),
                   lora=lora, connector=d.get("connector", "qformer"), proj_dim=d.get("proj_dim", 4096))


PRESETS: dict[str, Callable[[], TinyVLMConfig]] = {
    # The real TinyGPT-V: EVA ViT-g/14, BLIP-2 (flan-t5-xxl) Q-Former, Phi-2 2.7B.
    "tinygptv": lambda: TinyVLMConfig(),
    # The same architecture shrunk to train on a laptop CPU in minutes: the built-in shapes world, 64 px images,
    # and its 613-token tokenizer (data.py).
    "tiny": lambda: TinyVLMConfig(
        # 8 px patches (an 8 x 8 grid at 64 px, 12 x 12 at stage 4's 96 px): a small shape is 13 px wide, and with
        # 16 px patches the Q-Former's read-out at 96 px stopped at kind 0.83, box L1 0.027 (now 0.92, 0.017)
        vit=ViTConfig(image_size=64, patch_size=8, width=128, num_layers=4, num_heads=4, mlp_dim=512),
        qformer=QFormerConfig(num_queries=16, hidden=128, num_layers=4, num_heads=4, mlp_dim=512, vision_width=128),
        phi=PhiConfig(vocab_size=640, hidden=192, num_layers=4, num_heads=4, mlp_dim=768, rotary_dim=20,
                      max_positions=512, qk_norm=True, post_attn_norm=True),
        lora=LoRAConfig(rank=32, alpha=8.0, dropout=0.05),  # alpha / rank = 0.25, as in TinyGPT-V
        proj_dim=256),
}


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,                                          # erf form: EVA, BERT / Q-Former
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),   # Phi-2's "gelu_new", SigLIP
    "quick_gelu": quick_gelu,                               # CLIP
}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32. TinyGPT-V's post-attention norm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """A LayerNorm that computes in its parameters' dtype. TinyGPT-V trains Phi's norm weights in fp32 while the
    frozen model runs in half precision; CPU autocast does not cover layer_norm, so the cast is done here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class WidenedLinear(torch.autograd.Function):
    """x @ W^T + b computed in fp32 from a frozen half-precision W (see Linear for why), widening W a block of
    rows at a time: an 8 MB fp32 block is reused from the allocator and stays in cache, where a whole fp32 copy is
    fresh pages to fault in (3.5x slower to make here: 52 ms vs 15 ms for 10240 x 2560) and up to 0.5 GB more
    peak memory (Phi's 51200 x 2560 output layer). W is frozen, so backward needs only grad @ W; it widens W again
    rather than keeping an fp32 copy of every weight alive from forward to backward."""

    BLOCK_NUMEL = 1 << 21

    @staticmethod
    def row_blocks(weight: torch.Tensor) -> list[tuple[int, int]]:
        rows = max(1, WidenedLinear.BLOCK_NUMEL // weight.shape[1])
        return [(i, min(i + rows, weight.shape[0])) for i in range(0, weight.shape[0], rows)]

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype):
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        x32 = x.float()
        with torch.autocast("cpu", enabled=False):
            y = torch.cat([F.linear(x32, weight[i:j].float(), None if bias is None else bias[i:j].float())
                           for i, j in WidenedLinear.row_blocks(weight)], -1)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        g = grad.flatten(0, -2).float()                                   # (N, out)
        grad_x = g.new_zeros(g.shape[0], weight.shape[1])                 # (N, in)
        with torch.autocast("cpu", enabled=False):
            for i, j in WidenedLinear.row_blocks(weight):
                grad_x.addmm_(g[:, i:j], weight[i:j].float())
        return grad_x.view(*grad.shape[:-1], -1).to(ctx.x_dtype), None, None, None


class Linear(nn.Linear):
    """nn.Linear, with one CPU policy. A CPU without bf16 / fp16 instructions (AVX2: most laptops and this
    project's CI machine) multiplies half-precision matrices far slower than fp32 ones (measured on a 2-core EPYC:
    256 x 2560 @ (10240 x 2560)^T at 22 GFLOP/s in bf16 vs 146 in fp32; the backward's grad @ W 38 s vs 0.18 s), so
    on a CPU the products run in fp32 and only the stored tensors are half precision:
    - a half-precision weight that takes no gradient (inference, or frozen in training) times many rows (prefill,
      image encoding, training) is widened to fp32 a block at a time (WidenedLinear); a few rows (decoding) stay in
      half precision, where the weight's bytes, not the arithmetic, are the cost;
    - an fp32 weight under autocast (the trained projections) is not cast down.
    The output has the dtype the plain layer would give (autocast's, else the input's), so the policy changes
    speed and rounding, not the activations' dtype."""

    MIN_ROWS = 16        # the crossover measured here: 16 rows x (10240 x 2560) take 18 ms widened vs 42 ms in bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        autocast = torch.is_autocast_enabled("cpu")
        if x.device.type != "cpu" or (w.dtype == torch.float32 and not autocast):     # the common case, first
            return super().forward(x)
        out_dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        frozen = not (torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)))
        if w.dtype in (torch.bfloat16, torch.float16) and frozen and x.numel() >= self.MIN_ROWS * x.shape[-1]:
            return WidenedLinear.apply(x, w, b, out_dtype)
        if w.dtype == torch.float32 and out_dtype != torch.float32:
            with torch.autocast("cpu", enabled=False):
                return F.linear(x.float(), w, b).to(out_dtype)
        return super().forward(x)


class MLP(nn.Module):
    """fc1 -> activation -> fc2: the feed-forward of the ViT and of Phi."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, rotary_dim) for integer positions (B, T). Computed in fp32 on the fly: it is
    (B x T x 16) numbers, cheaper than a cached table that has to follow the model across devices and dtypes."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim)
    freqs = positions.float()[..., None] * inv_freq          # (B, T, rotary_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]        # (B, 1, T, rotary_dim): NeoX / rotate_half layout
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of every head of x (B, nh, T, hs); Phi-2 leaves the other 48 of 80 alone."""
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    x_rot = (x_rot.float() * cos + rotate_half(x_rot.float()) * sin).to(x.dtype)
    return torch.cat((x_rot, x_pass), dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Vision encoder
# Reference: https://github.com/salesforce/LAVIS/blob/main/lavis/models/eva_vit.py
#            https://github.com/huggingface/transformers/blob/main/src/transformers/models/blip_2/modeling_blip_2.py

class ViTAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection. EVA has biases on q and v only: its fused bias keeps
    the k third at zero (as HF's BLIP-2 does), so the same class serves CLIP and SigLIP, which have all three."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.width, 3 * cfg.width)
        self.proj = Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)                                                   # (B, nh, N, hs)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = ViTAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patchify, add learned absolute positions (and a CLS token), run the blocks, then ln_vision."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        # learned embeddings start as N(0, 0.02), as in EVA / BLIP-2 (zeros would make every position the same)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, cfg.width)) if cfg.cls_token else None
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, cfg.num_positions, cfg.width))
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_vision = nn.LayerNorm(cfg.width, eps=cfg.ln_vision_eps) if cfg.ln_vision else nn.Identity()

    def position_embeddings(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The learned positions for a grid_h x grid_w patch grid. A different image size than the one trained on
        (448 px in TinyGPT-V's stage 4) resamples the square grid bicubically; the CLS position is kept as is."""
        n_cls = int(self.cls_token is not None)
        cls_pos, grid_pos = self.pos_embed[:, :n_cls], self.pos_embed[:, n_cls:]
        side = math.isqrt(grid_pos.shape[1])
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        grid = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)                       # (1, C, side, side)
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(self.pos_embed.dtype)
        return torch.cat((cls_pos, grid), dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))          # (B, C, H/p, W/p)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                # (B, N, C)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, C)
        x = self.pre_norm(x + self.position_embeddings(grid_h, grid_w))
        for block in self.blocks:
            x = block(x)
        return self.ln_vision(x)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, ln_vision: str | os.PathLike | None = None,
                        dtype: torch.dtype | None = None, **overrides) -> "ViT":
        """A BLIP-2 / CLIP / SigLIP Hugging Face folder, or LAVIS's eva_vit_g.pth (whose ln_vision lives in the
        BLIP-2 pickle: pass that file as ln_vision=). `overrides` replace config fields (e.g. num_layers)."""
        return load_vit(path, ln_vision=ln_vision, dtype=dtype, **overrides)


# ----------------------------------------------------------------------------------------------------------------------
# Q-Former
# Reference: https://github.com/salesforce/LAVIS/blob/main/lavis/models/blip2_models/Qformer.py
#            https://github.com/huggingface/transformers/blob/main/src/transformers/models/blip_2/modeling_blip_2.py

class BertAttention(nn.Module):
    """BERT attention with its post-LN output: LN(x + dense(attn(q(x), k(ctx), v(ctx)))). ctx is x itself for
    self-attention, and the image features (1408 wide) for cross-attention."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.query = Linear(dim, dim)
        self.key = Linear(context_dim, dim)
        self.value = Linear(context_dim, dim)
        self.dense = Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, *, hs)
        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(context)), heads(self.value(context)))
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.norm(x + self.dense(y))


class BertFFN(nn.Module):
    """BERT feed-forward with its post-LN output: LN(x + fc2(gelu(fc1(x))))."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, cross_attention: bool):
        super().__init__()
        self.self_attn = BertAttention(cfg.hidden, cfg.num_heads, cfg.hidden, cfg.eps)
        self.cross_attn = BertAttention(cfg.hidden, cfg.num_heads, cfg.vision_width, cfg.eps) if cross_attention else None
        self.ffn = BertFFN(cfg.hidden, cfg.mlp_dim, cfg.eps)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        queries = self.self_attn(queries, queries)          # the queries talk to each other
        if self.cross_attn is not None:
            queries = self.cross_attn(queries, image)       # ... and, every 2nd layer, read the image
        return self.ffn(queries)


class QFormer(nn.Module):
    """32 learned queries that read a variable number of image features into a fixed 32 x 768 summary."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        # N(0, 0.02) as BLIP-2: identical (e.g. zero) queries would stay identical, and LayerNorm of a zero vector
        # with eps 1e-12 has enormous gradients
        self.query_tokens = nn.Parameter(0.02 * torch.randn(1, cfg.num_queries, cfg.hidden))
        self.layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)   # BERT's embeddings LayerNorm, on the queries
        self.layers = nn.ModuleList(QFormerLayer(cfg, cross_attention=(i % cfg.cross_attention_every == 0))
                                    for i in range(cfg.num_layers))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: ViT features (B, N, vision_width) -> (B, num_queries, hidden)."""
        queries = self.layernorm(self.query_tokens.expand(image.shape[0], -1, -1))
        image = image.to(queries.dtype)
        for layer in self.layers:
            queries = layer(queries, image)
        return queries

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> "QFormer":
        """The qformer.* and query_tokens of a BLIP-2 folder, or LAVIS's blip2_pretrained_*.pth."""
        return load_qformer(path, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Phi-2 with TinyGPT-V's norms
# Reference: https://github.com/huggingface/transformers/blob/main/src/transformers/models/phi/modeling_phi.py
#            https://github.com/DLYuanGod/TinyGPT-V/blob/main/minigpt4/models/modeling_phi.py

class KVCache:
    """Preallocated keys and values of every layer, (num_layers, B, nh, max_len, hs); `length` positions are filled."""

    def __init__(self, cfg: PhiConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.num_layers, batch, cfg.num_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions, {end} needed")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class PhiAttention(nn.Module):
    def __init__(self, cfg: PhiConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        # One fused projection, rows in q | k | v blocks. Hugging Face stores q_proj / k_proj / v_proj (the loader
        # concatenates them); TinyGPT-V's own code stores them interleaved per head (the loader reorders them).
        self.qkv = Linear(cfg.hidden, 3 * cfg.hidden)
        if cfg.qk_norm:
            # TinyGPT-V's QK-norm: one LayerNorm(head_dim) shared by all heads, on q and k before RoPE. It bounds the
            # attention logits; without it the paper saw gradients vanish at once.
            self.q_layernorm = LayerNorm(cfg.head_dim, eps=cfg.eps)
            self.k_layernorm = LayerNorm(cfg.head_dim, eps=cfg.eps)
        self.dense = Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.cfg.num_heads, self.cfg.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        if self.cfg.qk_norm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)                    # (B, nh, start + T, hs)
        # SDPA scales by 1/sqrt(hs) and accumulates the softmax in fp32 for half-precision inputs.
        is_causal = mask is None and T > 1    # Phi.forward builds an explicit mask whenever anything is cached
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, nh, T, hs)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class PhiBlock(nn.Module):
    """Phi-2's parallel block: one input norm feeds attention and MLP side by side.

        Phi-2:      x = x +     attn(LN(x))  + mlp(LN(x))
        TinyGPT-V:  x = x + RMS(attn(LN(x))) + mlp(LN(x))     (post_attn_norm: the attention branch only)
    """

    def __init__(self, cfg: PhiConfig, layer: int):
        super().__init__()
        self.input_layernorm = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.self_attn = PhiAttention(cfg, layer)
        # TinyGPT-V's checkpoints call this "post_layernorm"; it is an RMSNorm on the attention output only.
        self.post_attn_norm = RMSNorm(cfg.hidden, cfg.post_attn_norm_eps) if cfg.post_attn_norm else nn.Identity()
        self.mlp = MLP(cfg.hidden, cfg.mlp_dim, "gelu_tanh")
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        h = self.input_layernorm(x)
        attn = self.post_attn_norm(self.self_attn(h, cos, sin, mask, cache, start))
        return x + self.resid_dropout(attn) + self.resid_dropout(self.mlp(h))


class Phi(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)       # GPT-2 / Phi's init, for training from scratch
        self.layers = nn.ModuleList(PhiBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.lm_head = Linear(cfg.hidden, cfg.vocab_size)    # with a bias, not tied to the embeddings

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab). attention_mask (B, cached + T): 1 for real tokens, 0 for padding. position_ids
        (B, T) default to cached .. cached + T - 1. With a cache, the new keys and values are appended to it.
        last_only: the last position's logits only (B, 1, vocab), all that generating needs; the output layer over
        a whole prompt is T x 51200 x 2560 multiply-adds, and their memory, for nothing."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # (B, T, C)
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rope_theta)
        mask = attention_bias(attention_mask, start, T, x.device) if (attention_mask is not None or start > 0) else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, start)
        if cache is not None:
            cache.length = start + T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.final_layernorm(x))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, **overrides) -> "Phi":
        """A Hugging Face Phi folder: the current format (q_proj / k_proj / v_proj / dense), the older phi-msft one
        (transformer.h.N.mixer.Wqkv), or TinyGPT-V's fused query_key_value; with or without q/k_layernorm.
        overrides: config fields, e.g. qk_norm=True, post_attn_norm=True to add TinyGPT-V's norms to phi-2."""
        return load_phi(path, dtype=dtype, **overrides)


def attention_bias(padding_mask: torch.Tensor | None, start: int, T: int, device) -> torch.Tensor:
    """Boolean (B or 1, 1, T, start + T) mask for T new queries after `start` cached positions: causal, and no key
    that is padding. A padding query may still see itself, so that no softmax row is empty (its output is unused)."""
    q_pos = torch.arange(start, start + T, device=device)[:, None]       # (T, 1)
    k_pos = torch.arange(start + T, device=device)[None, :]              # (1, S)
    causal = k_pos <= q_pos                                              # (T, S)
    if padding_mask is None:
        return causal[None, None]
    if padding_mask.shape[-1] != start + T:
        raise ValueError(f"attention_mask covers {padding_mask.shape[-1]} positions, expected {start + T}")
    return (causal & padding_mask.bool()[:, None, None, :]) | (k_pos == q_pos)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA
# Reference: https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/layer.py

class LoRALinear(Linear):
    """y = x W^T + b + dropout(x) A^T B^T * (alpha / rank), with W frozen and only A (rank x in), B (out x rank)
    trained. B starts at zero, so the adapted model starts exactly where the base model is. merge() folds the
    update into W for inference at no extra cost; unmerge() takes it out again."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: LoRAConfig, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.scaling = cfg.alpha / cfg.rank
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, cfg.rank, device=device))
        self.lora_dropout = nn.Dropout(cfg.dropout)
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # PEFT's init for A

    @classmethod
    def wrap(cls, linear: nn.Linear, cfg: LoRAConfig) -> "LoRALinear":
        """A LoRALinear that shares linear's weight and bias tensors (no copy); the adapters are fp32."""
        lora = cls(linear.in_features, linear.out_features, linear.bias is not None, cfg, device="meta")
        lora.weight, lora.bias = linear.weight, linear.bias
        device = linear.weight.device
        lora.lora_A = nn.Parameter(torch.empty(cfg.rank, linear.in_features, device=device))
        lora.lora_B = nn.Parameter(torch.zeros(linear.out_features, cfg.rank, device=device))
        if device.type != "meta":
            nn.init.kaiming_uniform_(lora.lora_A, a=math.sqrt(5))
        return lora

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling     # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.merged:
            return y
        # The adapter computes in its own dtype (fp32 when training), outside CPU autocast: its products are small,
        # and a CPU's half-precision ones take a slow path (256 x 7680 @ 7680 x 64: 190 ms in bf16 vs 2 ms in fp32 here).
        with torch.autocast("cpu", enabled=False):
            z = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()
        return y + (z * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Replace every nn.Linear whose name ends with one of cfg.targets by a LoRALinear sharing its weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and name.endswith(cfg.targets):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear.wrap(module, cfg))
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


# ----------------------------------------------------------------------------------------------------------------------
# TinyVLM: the whole model
# Reference: https://github.com/DLYuanGod/TinyGPT-V/blob/main/minigpt4/models/minigpt_base.py

class TinyVLM(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = ViT(cfg.vit)
        if cfg.connector == "qformer":
            self.qformer = QFormer(cfg.qformer)
            # TinyGPT-V keeps MiniGPT-4's 768 -> 4096 projection (trained for Vicuna) and adds a second linear map
            # down to Phi-2's width instead of training a new 768 -> 2560 one: the pair starts from an aligned space.
            self.llama_proj = Linear(cfg.qformer.hidden, cfg.proj_dim)
            self.llama_proj2 = Linear(cfg.proj_dim, cfg.phi.hidden)
        elif cfg.connector == "mlp":
            self.mlp_proj = nn.Sequential(Linear(cfg.vit.width, cfg.phi.hidden), nn.GELU(),
                                          Linear(cfg.phi.hidden, cfg.phi.hidden))
        else:
            raise ValueError(f"unknown connector {cfg.connector!r}: expected 'qformer' or 'mlp'")
        self.phi = Phi(cfg.phi)
        if cfg.lora is not None:
            apply_lora(self.phi, cfg.lora)

    def visual_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen half of the image path: (B, 3, H, W) -> Q-Former queries (B, 32, 768), or the ViT tokens for
        the MLP connector. Frozen in every stage, so a trainer may compute it once per image and reuse it."""
        feats = self.vit(pixels)                                       # (B, 257, 1408)
        return feats if self.cfg.connector == "mlp" else self.qformer(feats)   # (B, 32, 768)

    def connect(self, features: torch.Tensor) -> torch.Tensor:
        """The trained half: visual features -> (B, num_image_tokens, phi.hidden), what the LLM reads as 'the image'."""
        if self.cfg.connector == "mlp":
            return self.mlp_proj(features.to(self.mlp_proj[0].weight.dtype))
        x = self.llama_proj(features.to(self.llama_proj.weight.dtype))  # (B, 32, 4096)
        return self.llama_proj2(x)                                     # (B, 32, 2560)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.connect(self.visual_features(pixels))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, C), with the positions that hold IMAGE_TOKEN replaced, in order, by the image
        embeddings (B, n, C): each row carries one image, as <Img><ImageHere></Img> in its prompt."""
        slots = input_ids == IMAGE_TOKEN
        x = self.phi.embed_tokens(input_ids.masked_fill(slots, 0))
        n_slots = slots.sum(1)
        if image_embeds is None:
            if n_slots.any():
                raise ValueError("input_ids hold image slots but no image was given")
            return x
        if not bool((n_slots == image_embeds.shape[1]).all()) or image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"each of the {input_ids.shape[0]} rows needs {image_embeds.shape[1]} image slots "
                             f"(IMAGE_TOKEN) for {image_embeds.shape[0]} images; found {n_slots.tolist()}")
        return x.masked_scatter(slots[..., None], image_embeds.to(x.dtype))

    def image_embeds(self, pixels: torch.Tensor | None, features: torch.Tensor | None) -> torch.Tensor | None:
        if features is not None:
            return self.connect(features)
        return self.encode_image(pixels) if pixels is not None else None

    def forward(self, pixels: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given labels (B, T) with IGNORE_INDEX outside the answer, the mean
        next-token cross-entropy over the answer tokens. features: precomputed visual_features instead of pixels."""
        x = self.embed(input_ids, self.image_embeds(pixels, features))
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.phi(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        return logits, loss

    @torch.no_grad()
    def generate_stream(self, pixels: torch.Tensor | None, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, features: torch.Tensor | None = None,
                        **sampling) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (tokens (B,), active (B,)) per step; see generate_stream() below for the sampling options."""
        x = self.embed(input_ids, self.image_embeds(pixels, features))
        yield from generate_stream(self.phi, x, attention_mask, **sampling)

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 features: torch.Tensor | None = None, **sampling) -> list[list[int]]:
        return collect(self.generate_stream(pixels, input_ids, attention_mask, features, **sampling), input_ids.shape[0])

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TinyVLM":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(dataclasses.replace(PRESETS[name](), **overrides))

    @classmethod
    def from_pretrained(cls, phi: str | os.PathLike, blip2: str | os.PathLike, vit: str | os.PathLike | None = None,
                        checkpoint: str | os.PathLike | None = None, cfg: TinyVLMConfig | None = None,
                        dtype: torch.dtype | None = None) -> "TinyVLM":
        """The whole model from public weights: phi = a microsoft/phi-2 folder; blip2 = a Salesforce/blip2-* folder
        (ViT, ln_vision, Q-Former) or LAVIS's blip2_pretrained_*.pth (ln_vision, Q-Former), in which case vit =
        LAVIS's eva_vit_g.pth; checkpoint = a TinyGPT-V stage .pth or one of ours (projections, norms, LoRA)."""
        return load_tinyvlm(phi, blip2, vit=vit, checkpoint=checkpoint, cfg=cfg, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Generation, gpt-fast style: prefill the prompt once, then decode one token at a time from the KV cache.

def sample_next(logits: torch.Tensor, history: torch.Tensor | None, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, repetition_penalty: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token (B,) from logits (B, V). temperature 0 is greedy. The repetition penalty (CTRL / HF style)
    divides positive and multiplies negative logits of the tokens in history (B, t)."""
    logits = logits.float()
    if repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits.gather(1, history)
        logits = logits.scatter(1, history, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p         # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move right padding to the left, so that every row's last position is its last real token (B, T, ...)."""
    B, T = mask.shape
    n_right = T - 1 - (mask.long() * torch.arange(T, device=mask.device)).argmax(-1)   # pads after the last real token
    idx = (torch.arange(T, device=mask.device)[None] - n_right[:, None]) % T           # (B, T) roll right by n_right
    gather = lambda t: t.gather(1, idx.view(B, T, *([1] * (t.dim() - 2))).expand_as(t))
    return gather(x), gather(mask)


def prefill(phi: Phi, x: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return phi(inputs_embeds=x, attention_mask=mask, position_ids=positions, cache=cache, last_only=True)[:, -1]  # (B, V)


def decode_one_token(phi: Phi, token: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    position = mask.long().sum(-1, keepdim=True) - 1                                 # (B, 1)
    return phi(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache)[:, -1]


def generate_stream(phi: Phi, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    max_new_tokens: int = 20, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, eos_token_id: int | None = None,
                    stop_strings: tuple[str, ...] = (), decode: Callable[[list[int]], str] | None = None,
                    generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), active (B,)) once per new token; active is False for rows already finished and for the
    eos token itself. A row finishes at eos, or once its decoded text contains a stop string (that token is still
    yielded, so the caller cuts the text at the stop string, as TinyGPT-V does with '###'). Prompts may be padded
    on either side. The repetition penalty looks at the generated tokens only, as HF does when generating from
    embeddings, which is how TinyGPT-V calls it."""
    B, T, _ = inputs_embeds.shape
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function (token ids -> text)")
    mask = torch.ones(B, T, dtype=torch.long, device=inputs_embeds.device) if attention_mask is None else attention_mask.long()
    if T + max_new_tokens > phi.cfg.max_positions:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds {phi.cfg.max_positions} positions")
    x, mask = left_pad(inputs_embeds, mask)
    cache = KVCache(phi.cfg, B, T + max_new_tokens, inputs_embeds.device, inputs_embeds.dtype)
    logits = prefill(phi, x, mask, cache)
    finished = torch.zeros(B, dtype=torch.bool, device=x.device)
    out: list[list[int]] = [[] for _ in range(B)]
    history = None
    for step in range(max_new_tokens):
        token = sample_next(logits, history, temperature, top_k, top_p, repetition_penalty, generator)
        active = ~finished
        if eos_token_id is not None:
            active &= token != eos_token_id
            finished |= token == eos_token_id
        yield token, active
        for b in active.nonzero().flatten().tolist():
            out[b].append(int(token[b]))
            if stop_strings and any(s in decode(out[b]) for s in stop_strings):
                finished[b] = True
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        history = token[:, None] if history is None else torch.cat((history, token[:, None]), 1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), 1)
        logits = decode_one_token(phi, token, mask, cache)


def collect(stream: Iterator[tuple[torch.Tensor, torch.Tensor]], batch: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(batch)]
    for token, active in stream:
        for b in active.nonzero().flatten().tolist():
            out[b].append(int(token[b]))
    return out


def generate(phi: Phi, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **sampling) -> list[list[int]]:
    """Text-only generation from token ids (B, T); returns the new tokens of each row."""
    with torch.no_grad():
        return collect(generate_stream(phi, phi.embed_tokens(input_ids), attention_mask, **sampling), input_ids.shape[0])


# ----------------------------------------------------------------------------------------------------------------------
# Reading weights: safetensors memory-mapped, pickles without running code

class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file, the key and the shapes."""


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file as a view of a private memory map: nothing is read until used, and
    tensors kept in the file's dtype are never copied. Layout: 8-byte little-endian header size, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw bytes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        if not header:
            return {}
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # copy-on-write: writable views, file untouched
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        nbytes = math.prod(info["shape"]) * torch.empty((), dtype=dtype).element_size()
        if end - start != nbytes or 8 + n + end > size:
            raise CheckpointError(f"{path}: tensor '{name}' {info['shape']} {info['dtype']} needs bytes "
                                  f"{8 + n + start}..{8 + n + end} but the file has {size} bytes: truncated?")
        if nbytes:
            t = torch.frombuffer(buf, dtype=dtype, count=math.prod(info["shape"]), offset=8 + n + start).view(info["shape"])
            t._mmapped = True     # lets release_pages() know these pages belong to a file map
        else:
            t = torch.empty(info["shape"], dtype=dtype)
        tensors[name] = t
    return tensors


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
ALIGNMENT = 64    # bytes: torch's CPU allocator aligns every tensor so, and the packed CPU kernels rely on it


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """The inverse of read_safetensors, laid out so that a memory-mapped tensor is as aligned as an allocated one:
    the header is padded with spaces (as the format allows) so that the data starts on a 64-byte boundary, and the
    tensors whose size is a multiple of 64 bytes come first, each of them then starting on a boundary too. A packed
    kernel given a tensor straight from the file (quantize.Int8Linear) can then use it where it lies."""
    order = sorted(tensors, key=lambda k: tensors[k].numel() * tensors[k].element_size() % ALIGNMENT != 0)
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in order:      # tensor by tensor, without a copy of the whole model in memory
            f.write(memoryview(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def release_pages(t: torch.Tensor) -> None:
    """Drop the file pages behind a memory-mapped tensor that has just been copied (dtype change, fused qkv).
    They are clean (we never write to the map), so nothing is lost: touching them again re-reads the file. Without
    this every page read during a load stays resident until the whole file is unmapped, and a 5.5 GB fp16 Phi-2
    loaded as bf16 would peak at 11 GB. Only tensors made by read_safetensors are touched (Linux only)."""
    if _LIBC is None or not getattr(t, "_mmapped", False) or t.numel() == 0:
        return
    start = t.data_ptr() // _PAGE * _PAGE
    end = t.data_ptr() + t.numel() * t.element_size()
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def read_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict (LAVIS, TinyGPT-V). weights_only=True: loading never runs code from the file.
    TinyGPT-V and LAVIS wrap the weights as {"model": state_dict, "optimizer": ...}; we take "model"."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):    # legacy (non-zip) pickles cannot be memory-mapped: read them whole
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return obj


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder (model.safetensors, or shards through model.safetensors.index.json),
    a single .safetensors file, or a torch pickle (.pth / .pt / .bin)."""
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                part = read_safetensors(path / shard)
                for key, file in weight_map.items():
                    if file == shard:
                        if key not in part:
                            raise CheckpointError(f"{path / shard}: key '{key}' is listed in the index but missing")
                        tensors[key] = part[key]
            return tensors
        if (path / "model.safetensors").exists():
            return read_safetensors(path / "model.safetensors")
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json in this folder")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        return read_pickle(path)
    raise CheckpointError(f"{path}: unknown format (expected a folder, .safetensors, or a .pth/.pt/.bin pickle)")


def read_config(path: str | os.PathLike) -> dict:
    config = Path(path) / "config.json"
    if not config.exists():
        raise CheckpointError(f"{path}: no config.json")
    return json.loads(config.read_text())


# ----------------------------------------------------------------------------------------------------------------------
# Key maps: our parameter name -> the name in the public file. A tuple is concatenated along dim 0 (fused qkv);
# None in a tuple stands for zeros (EVA's missing k bias). Each map is a literal per-layer template, expanded by
# layer number, so that every public name appears once, here, in plain sight.

KeyMap = dict[str, "str | tuple[str | None, ...]"]


def _expand(template: KeyMap, ours: str, theirs: str, layers: range | list[int]) -> KeyMap:
    out: KeyMap = {}
    for i in layers:
        for k, v in template.items():
            src = tuple(None if s is None else theirs.format(i=i) + s for s in v) if isinstance(v, tuple) \
                else theirs.format(i=i) + v
            out[ours.format(i=i) + k] = src
    return out


# microsoft/phi-2, current Hugging Face format: model.layers.{i}.*
PHI_HF_LAYER: KeyMap = {
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attn.q_layernorm.weight": "self_attn.q_layernorm.weight",
    "self_attn.q_layernorm.bias": "self_attn.q_layernorm.bias",
    "self_attn.k_layernorm.weight": "self_attn.k_layernorm.weight",
    "self_attn.k_layernorm.bias": "self_attn.k_layernorm.bias",
    "post_attn_norm.weight": "post_layernorm.weight",          # TinyGPT-V's name for its RMSNorm
    "self_attn.dense.weight": "self_attn.dense.weight",
    "self_attn.dense.bias": "self_attn.dense.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
PHI_HF_TOP: KeyMap = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "final_layernorm.weight": "model.final_layernorm.weight",
    "final_layernorm.bias": "model.final_layernorm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}
# TinyGPT-V's own modeling_phi.py: the same names, but q, k, v fused as query_key_value, interleaved per head.
PHI_TINYGPTV_LAYER: KeyMap = {**{k: v for k, v in PHI_HF_LAYER.items() if not k.startswith("self_attn.qkv")},
                              "self_attn.qkv.weight": "self_attn.query_key_value.weight",
                              "self_attn.qkv.bias": "self_attn.query_key_value.bias"}
# The older phi-msft format: transformer.h.{i}.*, Wqkv with rows already in q | k | v blocks.
PHI_MSFT_LAYER: KeyMap = {
    "input_layernorm.weight": "ln.weight",
    "input_layernorm.bias": "ln.bias",
    "self_attn.qkv.weight": "mixer.Wqkv.weight",
    "self_attn.qkv.bias": "mixer.Wqkv.bias",
    "self_attn.dense.weight": "mixer.out_proj.weight",
    "self_attn.dense.bias": "mixer.out_proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
PHI_MSFT_TOP: KeyMap = {
    "embed_tokens.weight": "transformer.embd.wte.weight",
    "final_layernorm.weight": "lm_head.ln.weight",
    "final_layernorm.bias": "lm_head.ln.bias",
    "lm_head.weight": "lm_head.linear.weight",
    "lm_head.bias": "lm_head.linear.bias",
}

# EVA ViT-g in a BLIP-2 folder: vision_model.*
VIT_BLIP2_LAYER: KeyMap = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.qkv.bias": "self_attn.qkv.bias",         # = cat(q_bias, zeros, v_bias)
    "attn.proj.weight": "self_attn.projection.weight",
    "attn.proj.bias": "self_attn.projection.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
VIT_BLIP2_TOP: KeyMap = {
    "patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
    "patch_embed.bias": "vision_model.embeddings.patch_embedding.bias",
    "cls_token": "vision_model.embeddings.class_embedding",
    "pos_embed": "vision_model.embeddings.position_embedding",
    "ln_vision.weight": "vision_model.post_layernorm.weight",
    "ln_vision.bias": "vision_model.post_layernorm.bias",
}
# LAVIS eva_vit_g.pth: blocks.{i}.*, no prefix (ln_vision comes from the BLIP-2 pickle).
VIT_LAVIS_LAYER: KeyMap = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": ("attn.q_bias", None, "attn.v_bias"),    # EVA has no k bias
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
VIT_LAVIS_TOP: KeyMap = {
    "patch_embed.weight": "patch_embed.proj.weight",
    "patch_embed.bias": "patch_embed.proj.bias",
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
}
# CLIP (openai/clip-vit-*) and SigLIP (google/siglip-*): vision_model.*, separate q/k/v/out projections.
VIT_CLIP_LAYER: KeyMap = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
VIT_CLIP_TOP: KeyMap = {
    "patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
    "patch_embed.bias": "vision_model.embeddings.patch_embedding.bias",      # SigLIP only
    "cls_token": "vision_model.embeddings.class_embedding",                 # CLIP only; stored as (C,)
    "pos_embed": "vision_model.embeddings.position_embedding.weight",       # stored as (N, C)
    "pre_norm.weight": "vision_model.pre_layrnorm.weight",                  # CLIP only (sic)
    "pre_norm.bias": "vision_model.pre_layrnorm.bias",
    "ln_vision.weight": "vision_model.post_layernorm.weight",               # used only if cfg.ln_vision
    "ln_vision.bias": "vision_model.post_layernorm.bias",
}

# Q-Former in a BLIP-2 folder: qformer.encoder.layer.{i}.* (cross-attention keys only on even layers)
QFORMER_HF_LAYER: KeyMap = {
    "self_attn.query.weight": "attention.attention.query.weight",
    "self_attn.query.bias": "attention.attention.query.bias",
    "self_attn.key.weight": "attention.attention.key.weight",
    "self_attn.key.bias": "attention.attention.key.bias",
    "self_attn.value.weight": "attention.attention.value.weight",
    "self_attn.value.bias": "attention.attention.value.bias",
    "self_attn.dense.weight": "attention.output.dense.weight",
    "self_attn.dense.bias": "attention.output.dense.bias",
    "self_attn.norm.weight": "attention.output.LayerNorm.weight",
    "self_attn.norm.bias": "attention.output.LayerNorm.bias",
    "ffn.fc1.weight": "intermediate_query.dense.weight",
    "ffn.fc1.bias": "intermediate_query.dense.bias",
    "ffn.fc2.weight": "output_query.dense.weight",
    "ffn.fc2.bias": "output_query.dense.bias",
    "ffn.norm.weight": "output_query.LayerNorm.weight",
    "ffn.norm.bias": "output_query.LayerNorm.bias",
}
QFORMER_HF_CROSS: KeyMap = {
    "cross_attn.query.weight": "crossattention.attention.query.weight",
    "cross_attn.query.bias": "crossattention.attention.query.bias",
    "cross_attn.key.weight": "crossattention.attention.key.weight",
    "cross_attn.key.bias": "crossattention.attention.key.bias",
    "cross_attn.value.weight": "crossattention.attention.value.weight",
    "cross_attn.value.bias": "crossattention.attention.value.bias",
    "cross_attn.dense.weight": "crossattention.output.dense.weight",
    "cross_attn.dense.bias": "crossattention.output.dense.bias",
    "cross_attn.norm.weight": "crossattention.output.LayerNorm.weight",
    "cross_attn.norm.bias": "crossattention.output.LayerNorm.bias",
}
QFORMER_HF_TOP: KeyMap = {
    "query_tokens": "query_tokens",
    "layernorm.weight": "qformer.layernorm.weight",
    "layernorm.bias": "qformer.layernorm.bias",
}
# LAVIS blip2_pretrained_*.pth: Qformer.bert.encoder.layer.{i}.*, "attention.self" where HF says "attention.attention"
QFORMER_LAVIS_LAYER: KeyMap = {k: v.replace("attention.attention.", "attention.self.") for k, v in QFORMER_HF_LAYER.items()}
QFORMER_LAVIS_CROSS: KeyMap = {k: v.replace("crossattention.attention.", "crossattention.self.")
                               for k, v in QFORMER_HF_CROSS.items()}
QFORMER_LAVIS_TOP: KeyMap = {
    "query_tokens": "query_tokens",
    "layernorm.weight": "Qformer.bert.embeddings.LayerNorm.weight",
    "layernorm.bias": "Qformer.bert.embeddings.LayerNorm.bias",
}

# What the public files hold that we deliberately do not use.
BLIP2_IGNORED = ("language_model.", "language_projection.",    # BLIP-2's own LLM (OPT / Flan-T5) and its projection
                 "qformer.encoder.layer.{i}.intermediate.", "qformer.encoder.layer.{i}.output.",  # text FFN (instruct)
                 "qformer.embeddings.")                        # text embeddings (use_qformer_text_input)
LAVIS_BLIP2_IGNORED = ("Qformer.cls.", "Qformer.bert.embeddings.word_embeddings.",
                       "Qformer.bert.embeddings.position_embeddings.", "Qformer.bert.embeddings.position_ids",
                       "Qformer.bert.encoder.layer.{i}.intermediate.", "Qformer.bert.encoder.layer.{i}.output.",
                       "vision_proj.", "text_proj.", "itm_head.", "temp", "t5_proj.", "opt_proj.", "llm_proj.",
                       "visual_encoder.", "ln_vision.")   # ln_vision is read by the ViT loader
CLIP_IGNORED = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias",
                "vision_model.head.", "vision_model.embeddings.position_ids")


def _ignored(key: str, patterns: tuple[str, ...]) -> bool:
    """Does key start with one of the patterns? "{i}" in a pattern stands for any layer number."""
    return any(re.match(re.escape(p).replace(r"\{i\}", r"\d+"), key) for p in patterns)


def load_mapped(module: nn.Module, tensors: dict[str, torch.Tensor], key_map: KeyMap, source: str, *,
                ignore: tuple[str, ...] = (), optional: tuple[str, ...] = (), dtype: torch.dtype | None = None,
                transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> nn.Module:
    """Fill `module` (built on the meta device, or anywhere) from `tensors` through `key_map`, strictly:
    - every parameter of the module must be in key_map and in the file, unless its name ends with one of
      `optional` (those keep their initial values: e.g. TinyGPT-V's norms, which microsoft/phi-2 does not have);
    - every tensor of the file must be used, or match a pattern in `ignore`;
    - shapes must agree (a leading batch dim of 1 may be absent in the file, as CLIP stores its embeddings).
    Tensors already in the wanted dtype are assigned without a copy (memory-mapped files stay mapped)."""
    expected = dict(module.named_parameters())
    transforms = transforms or {}
    unmapped = sorted(set(expected) - set(key_map))
    if unmapped:
        raise CheckpointError(f"{source}: no key map entry for the model's parameter '{unmapped[0]}'")
    state, used = {}, set()
    for ours, theirs in key_map.items():
        if ours not in expected:
            continue       # e.g. q_layernorm in the map while the model has no QK-norm: its keys stay unused
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        missing = [n for n in names if n is not None and n not in tensors]
        if missing:
            if ours.endswith(optional):
                continue
            raise CheckpointError(f"{source}: missing key '{missing[0]}' (for {ours}, shape {tuple(expected[ours].shape)})")
        like = tensors[next(n for n in names if n is not None)]
        parts = [tensors[n] if n is not None else torch.zeros_like(like) for n in names]
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        used.update(n for n in names if n is not None)
        if ours in transforms:
            t = transforms[ours](t)
        want = expected[ours].shape
        if t.shape != want:
            if t.numel() == math.prod(want) and tuple(t.shape) == tuple(want)[len(want) - t.dim():] \
                    and all(s == 1 for s in want[:len(want) - t.dim()]):
                t = t.view(want)
            else:
                raise CheckpointError(f"{source}: key '{names[0] if len(names) == 1 else names}' has shape "
                                      f"{tuple(t.shape)} but {ours} expects {tuple(want)}")
        state[ours] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        if state[ours].data_ptr() != parts[0].data_ptr():      # a copy was made: the file pages are done with
            for part in parts:
                release_pages(part)
    unexpected = sorted(k for k in tensors if k not in used and not _ignored(k, ignore))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected key '{unexpected[0]}' {tuple(tensors[unexpected[0]].shape)}{more}: "
                              f"not part of this model; is it the right file and config?")
    module.load_state_dict(state, strict=False, assign=True)
    return materialize(module, dtype)


def materialize(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Give every parameter still on the meta device its initial value (norms 1 / 0, LoRA A random / B zero)."""
    for sub in module.modules():
        params = list(sub.named_parameters(recurse=False))
        if not any(p.is_meta for _, p in params):
            continue
        device = next((p.device for p in module.parameters() if not p.is_meta), torch.device("cpu"))
        for name, p in params:
            if p.is_meta:
                new = torch.empty(p.shape, device=device, dtype=torch.float32 if name.startswith("lora_") else dtype or p.dtype)
                if name.startswith("lora_A"):
                    nn.init.kaiming_uniform_(new, a=math.sqrt(5))
                elif name == "weight" and isinstance(sub, (nn.LayerNorm, RMSNorm)):
                    new.fill_(1.0)
                elif name == "bias" and isinstance(sub, nn.LayerNorm) or name.startswith("lora_B"):
                    new.zero_()
                else:
                    raise CheckpointError(f"parameter {name} of {type(sub).__name__} was not loaded and has no "
                                          f"defined initial value")
                setattr(sub, name, nn.Parameter(new, requires_grad=p.requires_grad))
    return module


# ----------------------------------------------------------------------------------------------------------------------
# Loaders

def _dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> torch.dtype:
    """The wanted dtype, or the file's own (that of its first floating tensor)."""
    if dtype is not None:
        return dtype
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


def phi_config_from_hf(config: dict, **overrides) -> PhiConfig:
    """A PhiConfig from a Hugging Face config.json: current ("phi") or older ("phi-msft") names."""
    if config.get("model_type") == "phi-msft":
        hidden = config["n_embd"]
        cfg = PhiConfig(vocab_size=config["vocab_size"], hidden=hidden, num_layers=config["n_layer"],
                        num_heads=config["n_head"], mlp_dim=config.get("n_inner") or 4 * hidden,
                        rotary_dim=config["rotary_dim"], eps=config.get("layer_norm_epsilon", 1e-5),
                        max_positions=config.get("n_positions", 2048), resid_dropout=config.get("resid_pdrop", 0.0))
    elif config.get("model_type") == "phi":
        if config.get("num_key_value_heads", config["num_attention_heads"]) != config["num_attention_heads"]:
            raise CheckpointError("grouped-query attention (num_key_value_heads != num_attention_heads) is not Phi-2")
        if config.get("hidden_act", "gelu_new") != "gelu_new":
            raise CheckpointError(f"hidden_act {config['hidden_act']!r}: Phi-2 uses gelu_new")
        rope = config.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        cfg = PhiConfig(vocab_size=config["vocab_size"], hidden=hidden, num_layers=config["num_hidden_layers"],
                        num_heads=heads, mlp_dim=config["intermediate_size"],
                        rotary_dim=int(hidden // heads * factor),
                        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                        eps=config.get("layer_norm_eps", 1e-5),
                        max_positions=config.get("max_position_embeddings", 2048),
                        resid_dropout=config.get("resid_pdrop", 0.0), qk_norm=config.get("qk_layernorm", False))
    else:
        raise CheckpointError(f"model_type {config.get('model_type')!r} is not Phi ('phi' or 'phi-msft')")
    return dataclasses.replace(cfg, **overrides)


def phi_key_map(cfg: PhiConfig, tensors: dict[str, torch.Tensor]) -> tuple[KeyMap, str]:
    """The key map for whichever of the three Phi layouts the file uses, and its name."""
    layers = range(cfg.num_layers)
    if "transformer.embd.wte.weight" in tensors:
        return {**PHI_MSFT_TOP, **_expand(PHI_MSFT_LAYER, "layers.{i}.", "transformer.h.{i}.", layers)}, "phi-msft"
    if "model.layers.0.self_attn.query_key_value.weight" in tensors:
        return {**PHI_HF_TOP, **_expand(PHI_TINYGPTV_LAYER, "layers.{i}.", "model.layers.{i}.", layers)}, "tinygptv"
    return {**PHI_HF_TOP, **_expand(PHI_HF_LAYER, "layers.{i}.", "model.layers.{i}.", layers)}, "hf"


def qkv_from_per_head(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """TinyGPT-V's query_key_value rows are ordered (head, q/k/v, dim); ours are (q/k/v, head, dim)."""
    return w.reshape(num_heads, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def qkv_to_per_head(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    return w.reshape(3, num_heads, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def load_phi(path, dtype=None, **overrides) -> Phi:
    tensors = read_weights(path)
    cfg = phi_config_from_hf(read_config(path), **overrides)
    if "model.layers.0.self_attn.q_layernorm.weight" in tensors and not cfg.qk_norm:
        raise CheckpointError(f"{path}: the file has q/k_layernorm weights but the config has qk_norm off")
    key_map, layout = phi_key_map(cfg, tensors)
    transforms = {}
    if layout == "tinygptv":
        transforms = {f"layers.{i}.self_attn.qkv.{p}": lambda t: qkv_from_per_head(t, cfg.num_heads)
                      for i in range(cfg.num_layers) for p in ("weight", "bias")}
    with torch.device("meta"):
        model = Phi(cfg)
    return load_mapped(model, tensors, key_map, str(path), dtype=_dtype(tensors, dtype), transforms=transforms,
                       optional=("q_layernorm.weight", "q_layernorm.bias", "k_layernorm.weight", "k_layernorm.bias",
                                 "post_attn_norm.weight"))


def vit_config_from_hf(config: dict, **overrides) -> tuple[ViTConfig, str]:
    """A ViTConfig and the key layout name ("blip2" or "clip") from a BLIP-2, CLIP or SigLIP config.json."""
    kind = config.get("model_type")
    vc = config.get("vision_config", config)
    common = dict(image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 14), width=vc["hidden_size"],
                  num_layers=vc["num_hidden_layers"], num_heads=vc["num_attention_heads"], mlp_dim=vc["intermediate_size"])
    if kind == "blip-2":
        cfg = ViTConfig(**common, act=vc.get("hidden_act", "gelu"), eps=vc.get("layer_norm_eps", 1e-6),
                        ln_vision_eps=vc.get("layer_norm_eps", 1e-6)), "blip2"
    elif kind in ("clip", "clip_vision_model"):
        # LLaVA-style systems take the features of a chosen block without the final norm: build num_layers
        # blocks (e.g. 23 of 24 for LLaVA's "penultimate layer") by passing num_layers as an override.
        cfg = ViTConfig(**common, act=vc.get("hidden_act", "quick_gelu"), eps=vc.get("layer_norm_eps", 1e-5),
                        patch_bias=False, pre_norm=True, ln_vision=False), "clip"
    elif kind in ("siglip", "siglip_vision_model"):
        act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(vc.get("hidden_act"), vc.get("hidden_act"))
        cfg = ViTConfig(**common, act=act, eps=vc.get("layer_norm_eps", 1e-6), cls_token=False,
                        ln_vision=True, ln_vision_eps=vc.get("layer_norm_eps", 1e-6)), "clip"
    else:
        raise CheckpointError(f"model_type {kind!r}: expected a BLIP-2, CLIP or SigLIP folder")
    return dataclasses.replace(cfg[0], **overrides), cfg[1]


def load_vit(path, ln_vision=None, dtype=None, **overrides) -> ViT:
    path = Path(path)
    tensors = read_weights(path)
    if path.is_dir():
        cfg, layout = vit_config_from_hf(read_config(path), **overrides)
        if layout == "blip2":
            key_map = {**VIT_BLIP2_TOP, **_expand(VIT_BLIP2_LAYER, "blocks.{i}.", "vision_model.encoder.layers.{i}.",
                                                  range(cfg.num_layers))}
            # BLIP-2 drops nothing in its HF folder; blocks past num_layers are only present if the config says so.
            ignore = BLIP2_IGNORED + ("qformer.", "query_tokens")
        else:
            key_map = {**VIT_CLIP_TOP, **_expand(VIT_CLIP_LAYER, "blocks.{i}.", "vision_model.encoder.layers.{i}.",
                                                 range(cfg.num_layers))}
            if "vision_model.embeddings.patch_embedding.weight" not in tensors:
                # a vision tower saved on its own (CLIPVisionModel / SiglipVisionModel) lacks the public files'
                # "vision_model." prefix: read it under the prefixed names
                tensors = {"vision_model." + k: t for k, t in tensors.items()}
            # Blocks past num_layers (LLaVA's unused last block) and CLIP's post_layernorm (it normalises the pooled
            # CLS token only, which LLaVA-style systems do not use) are deliberately left out.
            ignore = CLIP_IGNORED + tuple(f"vision_model.encoder.layers.{i}." for i in range(cfg.num_layers, 1000)) \
                + (() if cfg.ln_vision else ("vision_model.post_layernorm.",))
    else:
        # LAVIS's eva_vit_g.pth holds 40 blocks; BLIP-2 uses the first 39 (block 39 is deliberately ignored).
        cfg = dataclasses.replace(ViTConfig(), **overrides)
        key_map = {**VIT_LAVIS_TOP, **_expand(VIT_LAVIS_LAYER, "blocks.{i}.", "blocks.{i}.", range(cfg.num_layers))}
        ignore = tuple(f"blocks.{i}." for i in range(cfg.num_layers, 1000)) + ("norm.", "fc_norm.", "head.")
        if cfg.ln_vision:
            if ln_vision is None:
                raise CheckpointError(f"{path}: LAVIS keeps ln_vision in the BLIP-2 pickle, not in the ViT's; "
                                      f"pass ln_vision=blip2_pretrained_*.pth (or ln_vision=False in the config)")
            lavis = read_weights(ln_vision)
            for p in ("weight", "bias"):
                if f"ln_vision.{p}" not in lavis:
                    raise CheckpointError(f"{ln_vision}: missing key 'ln_vision.{p}'")
                tensors = {**tensors, f"ln_vision.{p}": lavis[f"ln_vision.{p}"]}
                key_map[f"ln_vision.{p}"] = f"ln_vision.{p}"
    with torch.device("meta"):
        model = ViT(cfg)
    return load_mapped(model, tensors, key_map, str(path), ignore=ignore, dtype=_dtype(tensors, dtype))


def qformer_config_from_hf(config: dict) -> QFormerConfig:
    if config.get("model_type") != "blip-2":
        raise CheckpointError(f"model_type {config.get('model_type')!r}: expected a BLIP-2 folder")
    qc = config["qformer_config"]
    if qc.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"Q-Former hidden_act {qc['hidden_act']!r}: expected 'gelu'")
    return QFormerConfig(num_queries=config.get("num_query_tokens", 32), hidden=qc["hidden_size"],
                         num_layers=qc["num_hidden_layers"], num_heads=qc["num_attention_heads"],
                         mlp_dim=qc["intermediate_size"], vision_width=qc.get("encoder_hidden_size", 1408),
                         cross_attention_every=qc.get("cross_attention_frequency", 2),
                         eps=qc.get("layer_norm_eps", 1e-12))


def qformer_key_map(cfg: QFormerConfig, lavis: bool) -> KeyMap:
    layer, cross, top = (QFORMER_LAVIS_LAYER, QFORMER_LAVIS_CROSS, QFORMER_LAVIS_TOP) if lavis else \
        (QFORMER_HF_LAYER, QFORMER_HF_CROSS, QFORMER_HF_TOP)
    theirs = "Qformer.bert.encoder.layer.{i}." if lavis else "qformer.encoder.layer.{i}."
    layers = range(cfg.num_layers)
    cross_layers = [i for i in layers if i % cfg.cross_attention_every == 0]
    return {**top, **_expand(layer, "layers.{i}.", theirs, layers), **_expand(cross, "layers.{i}.", theirs, cross_layers)}


def load_qformer(path, dtype=None, cfg: QFormerConfig | None = None) -> QFormer:
    path = Path(path)
    tensors = read_weights(path)
    if path.is_dir():
        cfg = qformer_config_from_hf(read_config(path))
        key_map, ignore = qformer_key_map(cfg, lavis=False), BLIP2_IGNORED + ("vision_model.",)
    else:
        cfg = cfg or QFormerConfig()
        key_map, ignore = qformer_key_map(cfg, lavis=True), LAVIS_BLIP2_IGNORED
    with torch.device("meta"):
        model = QFormer(cfg)
    return load_mapped(model, tensors, key_map, str(path), ignore=ignore, dtype=_dtype(tensors, dtype))


# ----------------------------------------------------------------------------------------------------------------------
# TinyGPT-V stage checkpoints and our own

def tinygptv_checkpoint_map(cfg: TinyVLMConfig, peft: bool) -> KeyMap:
    """Our name -> TinyGPT-V's name in TinyGPT-V_for_Stage{1..4}.pth (trainable tensors only). Stage 1 has no
    LoRA and no PEFT prefix; stages 2-4 wrap the LLM as llama_model.base_model.model.*."""
    llm = "llama_model.base_model.model.model." if peft else "llama_model.model."
    layer: KeyMap = {
        "input_layernorm.weight": "input_layernorm.weight",
        "self_attn.q_layernorm.weight": "self_attn.q_layernorm.weight",
        "self_attn.k_layernorm.weight": "self_attn.k_layernorm.weight",
        "post_attn_norm.weight": "post_layernorm.weight",
    }
    if peft:
        layer.update({
            "self_attn.qkv.lora_A": "self_attn.query_key_value.lora_A.weight",
            "self_attn.qkv.lora_B": "self_attn.query_key_value.lora_B.weight",   # rows interleaved per head
            "self_attn.dense.lora_A": "self_attn.dense.lora_A.weight",
            "self_attn.dense.lora_B": "self_attn.dense.lora_B.weight",
        })
    return {
        "llama_proj.weight": "llama_proj.weight", "llama_proj.bias": "llama_proj.bias",
        "llama_proj2.weight": "llama_proj2.weight", "llama_proj2.bias": "llama_proj2.bias",
        "phi.final_layernorm.weight": llm + "final_layernorm.weight",
        **_expand(layer, "phi.layers.{i}.", llm + "layers.{i}.", range(cfg.phi.num_layers)),
    }


def load_checkpoint(model: TinyVLM, path: str | os.PathLike, ignore: tuple[str, ...] = ()) -> TinyVLM:
    """Load a partial checkpoint (projections, norms, LoRA) on top of the base weights: a TinyGPT-V stage .pth, or
    one of ours (.safetensors, our names). Every tensor of the file must land on a parameter of the right shape,
    except those whose name contains one of `ignore` (e.g. the norms an ablation removed)."""
    path = Path(path)
    tensors = {k: t for k, t in read_weights(path).items() if not any(p in k for p in ignore)}
    params = dict(model.named_parameters())
    if path.suffix == ".safetensors":
        key_map = {k: k for k in tensors}
        transforms = {}
    else:
        peft = any(k.startswith("llama_model.base_model.") for k in tensors)
        key_map = {ours: theirs for ours, theirs in tinygptv_checkpoint_map(model.cfg, peft).items() if theirs in tensors}
        nh = model.cfg.phi.num_heads
        transforms = {k: (lambda t: qkv_from_per_head(t, nh)) for k in key_map if k.endswith("qkv.lora_B")}
    used = set(key_map.values())
    unexpected = sorted(k for k in tensors if k not in used)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected key '{unexpected[0]}' {tuple(tensors[unexpected[0]].shape)}: "
                              f"not a tensor of this model (LoRA in the file but not in the config?)")
    with torch.no_grad():
        for ours, theirs in key_map.items():
            if ours not in params:
                raise CheckpointError(f"{path}: key '{theirs}' maps to '{ours}', which this model does not have "
                                      f"(check the config: LoRA, qk_norm, post_attn_norm)")
            t = transforms[ours](tensors[theirs]) if ours in transforms else tensors[theirs]
            if t.shape != params[ours].shape:
                raise CheckpointError(f"{path}: key '{theirs}' has shape {tuple(t.shape)} but {ours} expects "
                                      f"{tuple(params[ours].shape)}")
            params[ours].copy_(t)
    return model


def save_checkpoint(model: TinyVLM, path: str | os.PathLike, only_trainable: bool = True,
                    metadata: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the (trainable) tensors as safetensors, with the config as metadata; atomically: a temp file in the
    same folder, fsync'd, then renamed over the target, so a crash leaves the previous file whole."""
    path = Path(path)
    state = {k: p.detach().to(dtype or p.dtype) for k, p in model.named_parameters()
             if p.requires_grad or not only_trainable}
    meta = {"format": "tinyvlm", "config": json.dumps(model.cfg.to_dict()), **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    atomic_write(path, lambda tmp: write_safetensors(state, tmp, meta))
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp) into a temp file beside path, fsync it, then rename it over path: a crash at any point leaves
    either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp makes 0600 files; a checkpoint is an ordinary file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint_config(path: str | os.PathLike) -> TinyVLMConfig:
    """The TinyVLMConfig stored in one of our safetensors checkpoints."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "tinyvlm":
        raise CheckpointError(f"{path}: not a tinyvlm checkpoint (no config in its metadata)")
    return TinyVLMConfig.from_dict(json.loads(meta["config"]))


def load_tinyvlm(phi, blip2, vit=None, checkpoint=None, cfg: TinyVLMConfig | None = None, dtype=None) -> TinyVLM:
    cfg = cfg or PRESETS["tinygptv"]()
    phi_model = load_phi(phi, dtype=dtype, qk_norm=cfg.phi.qk_norm, post_attn_norm=cfg.phi.post_attn_norm)
    if Path(blip2).is_dir():
        vit_model = load_vit(blip2, dtype=dtype, ln_vision_eps=cfg.vit.ln_vision_eps)
    else:
        if vit is None:
            raise CheckpointError(f"{blip2}: a LAVIS BLIP-2 pickle holds no ViT; pass vit=eva_vit_g.pth")
        vit_model = load_vit(vit, ln_vision=blip2, dtype=dtype)
    qformer_model = load_qformer(blip2, dtype=dtype, cfg=cfg.qformer)
    cfg = dataclasses.replace(cfg, phi=phi_model.cfg, vit=vit_model.cfg, qformer=qformer_model.cfg)
    with torch.device("meta"):
        model = TinyVLM(dataclasses.replace(cfg, lora=None))
    model.vit, model.qformer, model.phi = vit_model, qformer_model, phi_model
    # The projections are TinyGPT-V's own: they come from a stage checkpoint (or start fresh for stage 1).
    for proj in (model.llama_proj, model.llama_proj2):
        proj.to_empty(device="cpu")
        proj.reset_parameters()
    model.cfg = cfg
    if cfg.lora is not None:
        apply_lora(model.phi, cfg.lora)
        materialize(model.phi)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Looking inside: where the Q-Former's queries look

@torch.no_grad()
def qformer_attention(model: TinyVLM, pixels: torch.Tensor) -> torch.Tensor:
    """Cross-attention probabilities of every query over the image tokens, averaged over heads and over the
    cross-attention layers: (B, num_queries, num_image_tokens). SDPA does not return its weights, so the inputs of
    each cross-attention are captured and softmax(q k^T / sqrt(hs)) is computed again, plainly."""
    captured = []
    hooks = [layer.cross_attn.register_forward_hook(lambda m, args, out: captured.append((m, *args)))
             for layer in model.qformer.layers if layer.cross_attn is not None]
    try:
        model.visual_features(pixels)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for attn, x, context in captured:
        B, T, C = x.shape
        hs = C // attn.num_heads
        q = attn.query(x).view(B, T, attn.num_heads, hs).transpose(1, 2)                   # (B, nh, T, hs)
        k = attn.key(context).view(B, context.shape[1], attn.num_heads, hs).transpose(1, 2)  # (B, nh, N, hs)
        maps.append((q @ k.transpose(-1, -2) / math.sqrt(hs)).softmax(-1).mean(1))          # (B, T, N)
    return torch.stack(maps).mean(0)


# ----------------------------------------------------------------------------------------------------------------------
# Command line: ask the model about an image

def main(argv: list[str] | None = None) -> None:
    import argparse
    import data
    import train
    p = argparse.ArgumentParser(description="Ask tinyvlm about an image (streams the answer).")
    p.add_argument("question", nargs="?", default="", help="the question (or instruction); empty with --chat")
    p.add_argument("--image", required=True)
    p.add_argument("--task", default="", help="stage-4 task identifier, e.g. [vqa] [caption] [refer] [identify]")
    p.add_argument("--chat", action="store_true", help="multi-turn: read questions from the terminal")
    p.add_argument("--checkpoint", default="", help="a train.py checkpoint (default: the newest out/stageN)")
    p.add_argument("--quantized", default="", help="a quantize.py output to run instead")
    p.add_argument("--quantize", choices=("int8", "int4", "fp16"), help="quantize the language model on the fly")
    p.add_argument("--phi", default=""), p.add_argument("--blip2", default=""), p.add_argument("--tokenizer", default="")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (TinyGPT-V's demo: 1.0 with --top-p 0.9)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draw", default="", help="draw the boxes of the answer onto the image, save here")
    p.add_argument("--attention", default="", help="save a picture of where the Q-Former's queries look")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    checkpoint = args.checkpoint or next((str(c) for c in sorted(Path("out").glob("stage[1-4]/model.safetensors"),
                                                                   reverse=True)), "")
    if not (checkpoint or args.quantized):
        raise SystemExit("no trained model found: run `python train.py --stage 1` (and on to 4), or pass --checkpoint")
    stage = 4
    if checkpoint:
        from safetensors import safe_open
        with safe_open(checkpoint, framework="pt") as f:
            stage = int(json.loads((f.metadata() or {}).get("stage", "4")))
        cfg = train.resolve(train.TrainConfig(stage=stage, init=checkpoint, phi=args.phi, blip2=args.blip2,
                                              tokenizer=args.tokenizer))
        model, _ = train.build_model(cfg, torch.device(args.device))
        tok = train.build_tokenizer(cfg)
        image_size = cfg.image_size
    if args.quantized or args.quantize:
        import quantize
        model = quantize.load_quantized(args.quantized) if args.quantized else \
            quantize.quantize_model(model, args.quantize, ("phi",), group=64 if model.cfg.phi.hidden % 128 else 128)
        if args.quantized:
            stage, image_size = model.trained_for["stage"], model.trained_for["image_size"]
            tok = data.Tokenizer.from_file(args.tokenizer) if args.tokenizer else data.shapes_tokenizer()
    model.eval()
    try:
        image = data.open_image(args.image)
    except data.ImageError as e:
        raise SystemExit(f"error: {e}") from None
    pixels = data.preprocess(image, image_size)[None].to(args.device)
    task = args.task or ("[vqa]" if stage == 4 else None)
    if task is not None and task not in data.TASKS:
        raise SystemExit(f"error: unknown task identifier {task!r}; expected one of {', '.join(data.TASKS)}")
    features = model.visual_features(pixels)
    turns: list[tuple[str, str]] = []
    question = args.question
    generator = torch.Generator().manual_seed(args.seed)
    while True:
        if args.chat:
            try:
                question = input("you> ").strip()
            except EOFError:
                break
            if not question:
                break
        sample = data.Sample(None, turns + [(question, "")], task if stage == 4 else None)
        ids, _ = data.encode(sample, tok, stage, model.cfg.num_image_tokens, max_len=10 ** 9)
        ids = ids[:-len(tok.encode(data.END[stage]))]             # everything up to where the answer starts
        if len(ids) + args.max_new_tokens > model.cfg.phi.max_positions:
            raise SystemExit(f"error: the conversation ({len(ids)} tokens) is too long for the model")
        answer_ids, shown = [], ""
        print("tinyvlm> " if args.chat else "", end="", flush=True)
        stream = model.generate_stream(None, torch.tensor([ids], device=args.device), features=features,
                                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                       eos_token_id=tok.eos_id, stop_strings=(data.END[stage],), decode=tok.decode,
                                       generator=generator)
        for token, active in stream:
            if active[0]:
                answer_ids.append(int(token[0]))
                text = tok.decode(answer_ids, skip_special_tokens=True).split(data.END[stage])[0]
                print(text[len(shown):], end="", flush=True)
                shown = text
        print()
        turns.append((question, shown.strip()))
        if not args.chat:
            break
    if args.draw:
        from PIL import ImageDraw
        canvas = image.copy()
        draw = ImageDraw.Draw(canvas)
        for box in data.parse_boxes(" ".join(a for _, a in turns)):
            draw.rectangle([v / 100 * s for v, s in zip(box, canvas.size * 2)], outline=(255, 0, 0), width=3)
        canvas.save(args.draw)
        print(f"wrote {args.draw}", file=sys.stderr)
    if args.attention:
        save_attention_picture(model, pixels, image, args.attention)
        print(f"wrote {args.attention}", file=sys.stderr)


def save_attention_picture(model: TinyVLM, pixels: torch.Tensor, image, path: str) -> None:
    """One tile per query: the image, tinted by how much that query's cross-attention looks at each patch."""
    from PIL import Image
    attn = qformer_attention(model, pixels)[0].float()                     # (Q, N)
    n_cls = int(model.vit.cls_token is not None)
    side = math.isqrt(attn.shape[1] - n_cls)
    grid = attn[:, n_cls:].reshape(-1, side, side)
    grid = grid / grid.amax(dim=(1, 2), keepdim=True)
    tile = 96
    base = image.convert("RGB").resize((tile, tile))
    cols = math.ceil(math.sqrt(grid.shape[0]))
    sheet = Image.new("RGB", (cols * (tile + 4), math.ceil(grid.shape[0] / cols) * (tile + 4)), (255, 255, 255))
    for j, g in enumerate(grid):
        heat = Image.fromarray((g.numpy() * 255).astype("uint8")).resize((tile, tile), Image.BICUBIC)
        red = Image.merge("RGB", (heat, Image.new("L", heat.size), Image.new("L", heat.size)))
        sheet.paste(Image.blend(base, red, 0.55), ((j % cols) * (tile + 4), (j // cols) * (tile + 4)))
    sheet.save(path)


if __name__ == "__main__":
    main()
