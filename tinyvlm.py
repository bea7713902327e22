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

Reading order, the paper's: configs and presets, the building blocks (norms, activations, RoPE), ViT, QFormer,
Phi, LoRA, TinyVLM, generation. This file is the model only: the public checkpoints' key maps and loaders are in
weights.py, the command line (`python tinyvlm.py --image ...`) in chat.py, and the reference facts the code cites
(shapes, key names, recipes, prompts) in docs/tinygptv.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
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
    # "mlp": the first ViT token is not shown to the LLM (LLaVA-1.5 drops CLIP's CLS token; TinyLLaVA Factory
    # drops SigLIP's first patch the same way, a quirk its released weights were trained with)
    drop_first_image_token: bool = False
    # how stage 4's prompt is written for this model (data.LAYOUTS): TinyGPT-V's own bytes for the real weights
    prompt_layout: str = "tinygptv"

    @property
    def num_image_tokens(self) -> int:
        if self.connector == "qformer":
            return self.qformer.num_queries
        return self.vit.num_positions - int(self.drop_first_image_token)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyVLMConfig":
        lora = d.get("lora")
        if lora is not None:
            lora = LoRAConfig(**{**lora, "targets": tuple(lora["targets"])})
        return cls(vit=ViTConfig(**d["vit"]), qformer=QFormerConfig(**d["qformer"]), phi=PhiConfig(**d["phi"]),
                   lora=lora, connector=d.get("connector", "qformer"), proj_dim=d.get("proj_dim", 4096),
                   drop_first_image_token=d.get("drop_first_image_token", False),
                   # a checkpoint from before there were two layouts was trained in the tiny one
                   prompt_layout=d.get("prompt_layout", "tiny"))


PRESETS: dict[str, Callable[[], TinyVLMConfig]] = {
    # The real TinyGPT-V: EVA ViT-g/14, BLIP-2 (flan-t5-xxl) Q-Former, Phi-2 2.7B.
    "tinygptv": lambda: TinyVLMConfig(),
    # The same architecture shrunk to train on a laptop CPU in minutes: the built-in shapes world, 64 px images,
    # and its 613-token tokenizer (data.py).
    "tiny": lambda: TinyVLMConfig(
        # 8 px patches (an 8 x 8 grid at 64 px, 12 x 12 at stage 4's 96 px): a small shape is 13 px wide, so a
        # patch sees part of one shape, not several (README: the measured read-out for 8 and 16 px patches)
        vit=ViTConfig(image_size=64, patch_size=8, width=128, num_layers=4, num_heads=4, mlp_dim=512),
        qformer=QFormerConfig(num_queries=16, hidden=128, num_layers=4, num_heads=4, mlp_dim=512, vision_width=128),
        phi=PhiConfig(vocab_size=640, hidden=192, num_layers=4, num_heads=4, mlp_dim=768, rotary_dim=20,
                      max_positions=512, qk_norm=True, post_attn_norm=True),
        lora=LoRAConfig(rank=32, alpha=8.0, dropout=0.05),  # alpha / rank = 0.25, as in TinyGPT-V
        proj_dim=256, prompt_layout="tiny"),
}


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks. Every layer is a plain nn.Linear; loading half-precision weights for a CPU swaps them for
# weights.CPUHalfLinear (stored in half precision, multiplied in fp32), and quantize.py for int8 / int4 layers.

def normal_init(*shape: int, std: float) -> torch.Tensor:
    """N(0, std) numbers for a learned embedding. On the meta device, where the loaders build a model before they
    fill in a file's tensors, nothing is drawn or scaled: scaling a meta tensor (as nn.init.normal_ does) runs a
    Python decomposition whose first call imports torch._dynamo, 2.5 s of every load."""
    x = torch.randn(shape)
    return x if x.is_meta else x.mul_(std)


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


class MLP(nn.Module):
    """fc1 -> activation -> fc2: the feed-forward of the ViT and of Phi."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
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
    """Rotate the first rotary_dim dims of each head in x (..., B, nh, T, hs); Phi-2 leaves the other 48 of 80."""
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d].float(), x[..., d:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot.to(x.dtype), x_pass), dim=-1)


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
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

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
        self.cls_token = nn.Parameter(normal_init(1, 1, cfg.width, std=0.02)) if cfg.cls_token else None
        self.pos_embed = nn.Parameter(normal_init(1, cfg.num_positions, cfg.width, std=0.02))
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
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(context_dim, dim)
        self.value = nn.Linear(context_dim, dim)
        self.dense = nn.Linear(dim, dim)
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
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
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
        self.query_tokens = nn.Parameter(normal_init(1, cfg.num_queries, cfg.hidden, std=0.02))
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


# ----------------------------------------------------------------------------------------------------------------------
# Phi-2 with TinyGPT-V's norms
# Reference: https://github.com/huggingface/transformers/blob/main/src/transformers/models/phi/modeling_phi.py
#            https://github.com/DLYuanGod/TinyGPT-V/blob/main/minigpt4/models/modeling_phi.py

class KVCache:
    """Preallocated keys and values of every layer, (num_layers, B, nh, max_len, hs); `length` positions are filled.
    On a CPU the cache, and so the attention over it, is fp32 whatever the model's dtype: torch's CPU attention is
    far slower in bf16 than in fp32 for the one query of a decode step (850 against 90 us per Phi-2 layer, 290
    cached positions, AVX-512 EPYC: a sixth of an int8 decode step), and an fp32 cache is small (86 MB for 330).
    The prompt itself, with nothing cached before it, attends in the model's dtype over its own keys and values
    (PhiAttention): many queries are fast in bf16 where the CPU has bf16 instructions (a bf16 256-token prefill's
    attention 157 -> 68 ms on an Intel Xeon with AMX), and the pass is then the same as without a cache."""

    def __init__(self, cfg: PhiConfig, batch: int, max_len: int, device, dtype):
        if torch.device(device).type == "cpu":
            dtype = torch.float32
        shape = (cfg.num_layers, batch, cfg.num_heads, max_len, cfg.head_dim)
        # empty, not zeros: update() hands back only positions written (zeroing took 57 ms of a full-size prefill)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
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
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        if cfg.qk_norm:
            # TinyGPT-V's QK-norm: one LayerNorm(head_dim) shared by all heads, on q and k before RoPE. It bounds the
            # attention logits; without it the paper saw gradients vanish at once.
            self.q_layernorm = LayerNorm(cfg.head_dim, eps=cfg.eps)
            self.k_layernorm = LayerNorm(cfg.head_dim, eps=cfg.eps)
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)

    def queries_keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q and k normed (QK-norm) and rotated (RoPE), and v: (B, nh, T, hs) each."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.cfg.num_heads, self.cfg.head_dim).permute(2, 0, 3, 1, 4)
        qk, v = qkv[:2], qkv[2]                                               # (2, B, nh, T, hs), (B, nh, T, hs)
        if self.cfg.qk_norm:
            qk = torch.stack((self.q_layernorm(qk[0]), self.k_layernorm(qk[1])))
        q, k = apply_rope(qk, cos, sin)           # q and k in one pass: half the small ops of a decode step's rotation
        return q, k, v

    def attention_logits(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         query: int | None = None) -> torch.Tensor:
        """q.k / sqrt(hs) of every head, (B, nh, T, T) in fp32, before any mask: what forward's SDPA turns into
        weights without returning them. For reading a layer's attention (train.py --attention-logits, chat.py
        --lm-attention), from the input a forward hook sees; forward itself never builds this T x T matrix.
        query: one position's row only, over the positions it sees, (B, nh, 1, query + 1) (the whole matrix of
        Phi-2's 32 heads over 2,048 positions would be 512 MB a layer)."""
        q, k, _ = self.queries_keys_values(x, cos, sin)
        if query is not None:
            query %= x.shape[1]                                      # -1: the last position
            q, k = q[:, :, query:query + 1], k[:, :, :query + 1]
        return (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.cfg.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x, cos, sin)
        if cache is not None:
            cached_k, cached_v = cache.update(self.layer, start, k, v)     # (B, nh, start + T, hs)
            if start > 0:     # a prompt (nothing cached before it) attends over its own k, v, in the model's dtype
                q, k, v = q.to(cached_k.dtype), cached_k, cached_v          # an fp32 cache on a CPU (KVCache)
        # SDPA scales by 1/sqrt(hs) and accumulates the softmax in fp32 for half-precision inputs.
        is_causal = mask is None and T > 1    # (attention_bias gives a mask for queries after cached ones)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, nh, T, hs)
        return self.dense(y.transpose(1, 2).reshape(B, T, C).to(x.dtype))


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
        # GPT-2 / Phi's init N(0, 0.02), for training from scratch, through normal_init rather than nn.Embedding's
        # own (see there); its N(0, 1) is still drawn first, so that a seed gives the numbers it always gave
        shape = (cfg.vocab_size, cfg.hidden)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.randn(shape))
        self.embed_tokens.weight.data = normal_init(*shape, std=0.02)
        self.layers = nn.ModuleList(PhiBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size)    # with a bias, not tied to the embeddings

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
        mask = attention_bias(attention_mask, start, T, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, start)
        if cache is not None:
            cache.length = start + T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.final_layernorm(x))



def attention_bias(padding_mask: torch.Tensor | None, start: int, T: int, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, start + T) mask for T new queries after `start` cached positions: causal, and no key
    that is padding. A padding query may still see itself, so that no softmax row is empty (its output is unused).
    None where no padding leaves nothing to mask but causality from position 0 (SDPA's is_causal) or nothing at all
    (one query after the cache sees every key): SDPA's CPU kernel turns a boolean mask into an additive one in every
    layer, ops that were a few percent of a decode step."""
    if padding_mask is not None and padding_mask.shape[-1] != start + T:
        raise ValueError(f"attention_mask covers {padding_mask.shape[-1]} positions, expected {start + T}")
    if padding_mask is not None and bool(padding_mask.all()):
        padding_mask = None
    if padding_mask is None and (start == 0 or T == 1):
        return None
    q_pos = torch.arange(start, start + T, device=device)[:, None]       # (T, 1)
    k_pos = torch.arange(start + T, device=device)[None, :]              # (1, S)
    causal = k_pos <= q_pos                                              # (T, S)
    if padding_mask is None:
        return causal[None, None]
    return (causal & padding_mask.bool()[:, None, None, :]) | (k_pos == q_pos)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA
# Reference: https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/layer.py

class LoRALinear(nn.Linear):
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
        # and a CPU without bf16 instructions multiplies them about 100x slower in half precision.
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
            self.llama_proj = nn.Linear(cfg.qformer.hidden, cfg.proj_dim)
            self.llama_proj2 = nn.Linear(cfg.proj_dim, cfg.phi.hidden)
        elif cfg.connector == "mlp":
            self.mlp_proj = nn.Sequential(nn.Linear(cfg.vit.width, cfg.phi.hidden), nn.GELU(),
                                          nn.Linear(cfg.phi.hidden, cfg.phi.hidden))
        else:
            raise ValueError(f"unknown connector {cfg.connector!r}: expected 'qformer' or 'mlp'")
        self.phi = Phi(cfg.phi)
        if cfg.lora is not None:
            apply_lora(self.phi, cfg.lora)

    def visual_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen half of the image path: (B, 3, H, W) -> Q-Former queries (B, 32, 768), or the ViT tokens for
        the MLP connector. Frozen in every stage, so a trainer may compute it once per image and reuse it."""
        feats = self.vit(pixels)                                       # (B, 257, 1408)
        if self.cfg.connector == "mlp":
            return feats[:, int(self.cfg.drop_first_image_token):]      # (B, N, C): every (kept) token
        return self.qformer(feats)                                      # (B, 32, 768)

    def connect(self, features: torch.Tensor) -> torch.Tensor:
        """The trained half: visual features -> (B, num_image_tokens, phi.hidden), what the LLM reads as 'the image'."""
        first = self.mlp_proj[0] if self.cfg.connector == "mlp" else self.llama_proj
        if first.weight.is_floating_point():    # a half-precision layer takes its own dtype; a quantized one holds
            features = features.to(first.weight.dtype)   # integer codes in .weight and widens its input itself
        if self.cfg.connector == "mlp":
            return self.mlp_proj(features)
        x = self.llama_proj(features)                                  # (B, 32, 4096)
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


if __name__ == "__main__":      # `python tinyvlm.py --image ...`: the command line lives in chat.py
    import chat
    import cli
    cli.run(chat.main)
