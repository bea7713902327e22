"""
weights.py: the public checkpoints and our own, read and written with explicit key maps and loud failures.

    reading     safetensors memory-mapped (nothing copied while the dtype is kept), pickles with weights_only=True
    key maps    our parameter name -> the public name, one literal per-layer template per format: microsoft/phi-2
                (current and phi-msft layouts, TinyGPT-V's fused qkv), BLIP-2 (Hugging Face and LAVIS), CLIP, SigLIP
    loading     load_phi, load_vit, load_qformer, load_tinyvlm: every key used or deliberately ignored; a missing
                or unexpected key or a shape mismatch raises CheckpointError naming the file, the key and the shapes
    ours        TinyGPT-V's stage checkpoints and our own safetensors (trainable tensors + the config), written
                atomically and 64-byte aligned
    CPU policy  half-precision weights on a CPU multiplied in fp32 (CPUHalfLinear), swapped in by load_tinyvlm

The key names and shapes of each public file are listed in docs/tinygptv.md.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import mmap
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import tinyvlm as tv
from cli import UserError

# ----------------------------------------------------------------------------------------------------------------------
# Reading weights: safetensors memory-mapped, pickles without running code

class CheckpointError(UserError):
    """A checkpoint that cannot be loaded: the message names the file, the key and the shapes."""


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a .safetensors file and its length. Layout: 8-byte little-endian header size, the JSON
    header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the raw bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            if head.startswith(ZIP_MAGIC):
                refuse_training_state(path)
                raise CheckpointError(f"{path}: a torch pickle (torch.save), not a safetensors file")
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, n


def holds_safetensors(path: str | os.PathLike) -> bool:
    try:
        read_safetensors_header(path)
        return True
    except CheckpointError:
        return False


SAFETENSORS_FILE = ("safetensors file", holds_safetensors)      # what an output path may replace (cli.writable_file)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The __metadata__ of a .safetensors file (our checkpoints keep their config and stage there)."""
    return read_safetensors_header(path)[0].get("__metadata__") or {}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file as a view of a private memory map: nothing is read until used, and
    tensors kept in the file's dtype are never copied."""
    path = Path(path)
    header, n = read_safetensors_header(path)
    header.pop("__metadata__", None)
    if not header:
        return {}
    size = path.stat().st_size
    with open(path, "rb") as f:
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # mallopt's parameters (glibc's malloc.h)


def reuse_freed_memory() -> None:
    """Keep freed memory in the process for the next activations. glibc hands the free memory at the top of its heap
    back to the OS once there is more than a threshold of it (128 KB at first, raised only as the process frees
    large blocks), so in a process whose load freed few (ours: each weight is read into its final place) an image
    encode or a prompt faults its activations in afresh every time: 28,700-59,400 page faults in one bf16 encode of
    the full ViT-g, 0.62-0.88 s, against 433 and 0.41 s with the top kept up to 64 MB (transformers' process, whose
    load frees a converted copy of every tensor: 433 and 0.41 s too). Fixing one threshold stops glibc adjusting the
    other, so both are set, where glibc's own adjustment stops: blocks up to 32 MB from the heap, its top kept up to
    64 MB. Linux with glibc only; the full-size loaders call it."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


ZIP_MAGIC = b"PK\x03\x04"             # how a file written by torch.save (a zip archive) begins
TRAINING_STATE_KEYS = {"iter", "trained", "optimizer"}       # train.save_training_state's state.pt holds these


def is_training_state(obj) -> bool:
    return isinstance(obj, dict) and TRAINING_STATE_KEYS <= obj.keys()


def training_state_error(path: str | os.PathLike) -> CheckpointError:
    path = Path(path)
    return CheckpointError(f"{path}: the training state that train.py --resume reads (what the stage trained, the "
                           f"optimizer, the data's position), not a model; the model it goes with is "
                           f"{path.with_name('model.safetensors')}")


def refuse_training_state(path: str | os.PathLike) -> None:
    """A state.pt of train.py's given where a model was asked for (it lies beside model.safetensors, and a .pt
    looks like a model file) is named for what it is. Anything else passes, to be read and judged by its reader."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)    # mapped: its index read, not its data
    except Exception:
        return
    if is_training_state(obj):
        raise training_state_error(path)


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
    if is_training_state(obj):
        raise training_state_error(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return obj


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder (model.safetensors, or shards through model.safetensors.index.json),
    a single .safetensors file, or a torch pickle (.pth / .pt / .bin)."""
    path = Path(path)
    if path.is_dir():      # safetensors first; older Hugging Face folders (e.g. Phi-2's first revisions) hold pickles
        for name, read in (("model.safetensors", read_safetensors), ("pytorch_model.bin", read_pickle)):
            index = path / f"{name}.index.json"
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                tensors = {}
                for shard in sorted(set(weight_map.values())):
                    part = read(path / shard)
                    for key, file in weight_map.items():
                        if file == shard:
                            if key not in part:
                                raise CheckpointError(f"{path / shard}: key '{key}' is listed in the index but missing")
                            tensors[key] = part[key]
                return tensors
            if (path / name).exists():
                return read(path / name)
        raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json in this folder")
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
                elif name == "weight" and isinstance(sub, (nn.LayerNorm, tv.RMSNorm)):
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


def phi_config_from_hf(config: dict, **overrides) -> tv.PhiConfig:
    """A PhiConfig from a Hugging Face config.json: current ("phi") or older ("phi-msft") names."""
    if config.get("model_type") == "phi-msft":
        hidden = config["n_embd"]
        cfg = tv.PhiConfig(vocab_size=config["vocab_size"], hidden=hidden, num_layers=config["n_layer"],
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
        cfg = tv.PhiConfig(vocab_size=config["vocab_size"], hidden=hidden, num_layers=config["num_hidden_layers"],
                        num_heads=heads, mlp_dim=config["intermediate_size"],
                        rotary_dim=int(hidden // heads * factor),
                        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                        eps=config.get("layer_norm_eps", 1e-5),
                        max_positions=config.get("max_position_embeddings", 2048),
                        resid_dropout=config.get("resid_pdrop", 0.0), qk_norm=config.get("qk_layernorm", False))
    else:
        raise CheckpointError(f"model_type {config.get('model_type')!r} is not Phi ('phi' or 'phi-msft')")
    return dataclasses.replace(cfg, **overrides)


def phi_key_map(cfg: tv.PhiConfig, tensors: dict[str, torch.Tensor]) -> tuple[KeyMap, str]:
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


def load_phi(path, dtype=None, **overrides) -> tv.Phi:
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
        model = tv.Phi(cfg)
    return load_mapped(model, tensors, key_map, str(path), dtype=_dtype(tensors, dtype), transforms=transforms,
                       optional=("q_layernorm.weight", "q_layernorm.bias", "k_layernorm.weight", "k_layernorm.bias",
                                 "post_attn_norm.weight"))


def vit_config_from_hf(config: dict, **overrides) -> tuple[tv.ViTConfig, str]:
    """A ViTConfig and the key layout name ("blip2" or "clip") from a BLIP-2, CLIP or SigLIP config.json."""
    kind = config.get("model_type")
    vc = config.get("vision_config", config)
    common = dict(image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 14), width=vc["hidden_size"],
                  num_layers=vc["num_hidden_layers"], num_heads=vc["num_attention_heads"], mlp_dim=vc["intermediate_size"])
    if kind == "blip-2":
        cfg = tv.ViTConfig(**common, act=vc.get("hidden_act", "gelu"), eps=vc.get("layer_norm_eps", 1e-6),
                        ln_vision_eps=vc.get("layer_norm_eps", 1e-6)), "blip2"
    elif kind in ("clip", "clip_vision_model"):
        # LLaVA-style systems take the features of a chosen block without the final norm: build num_layers
        # blocks (e.g. 23 of 24 for LLaVA's "penultimate layer") by passing num_layers as an override.
        cfg = tv.ViTConfig(**common, act=vc.get("hidden_act", "quick_gelu"), eps=vc.get("layer_norm_eps", 1e-5),
                        patch_bias=False, pre_norm=True, ln_vision=False), "clip"
    elif kind in ("siglip", "siglip_vision_model"):
        act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(vc.get("hidden_act"), vc.get("hidden_act"))
        cfg = tv.ViTConfig(**common, act=act, eps=vc.get("layer_norm_eps", 1e-6), cls_token=False,
                        ln_vision=True, ln_vision_eps=vc.get("layer_norm_eps", 1e-6)), "clip"
    else:
        raise CheckpointError(f"model_type {kind!r}: expected a BLIP-2, CLIP or SigLIP folder")
    return dataclasses.replace(cfg[0], **overrides), cfg[1]


def load_vit(path, ln_vision=None, dtype=None, **overrides) -> tv.ViT:
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
        cfg = dataclasses.replace(tv.ViTConfig(), **overrides)
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
        model = tv.ViT(cfg)
    return load_mapped(model, tensors, key_map, str(path), ignore=ignore, dtype=_dtype(tensors, dtype))


def qformer_config_from_hf(config: dict) -> tv.QFormerConfig:
    if config.get("model_type") != "blip-2":
        raise CheckpointError(f"model_type {config.get('model_type')!r}: expected a BLIP-2 folder")
    qc = config["qformer_config"]
    if qc.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"Q-Former hidden_act {qc['hidden_act']!r}: expected 'gelu'")
    return tv.QFormerConfig(num_queries=config.get("num_query_tokens", 32), hidden=qc["hidden_size"],
                         num_layers=qc["num_hidden_layers"], num_heads=qc["num_attention_heads"],
                         mlp_dim=qc["intermediate_size"], vision_width=qc.get("encoder_hidden_size", 1408),
                         cross_attention_every=qc.get("cross_attention_frequency", 2),
                         eps=qc.get("layer_norm_eps", 1e-12))


def qformer_key_map(cfg: tv.QFormerConfig, lavis: bool) -> KeyMap:
    layer, cross, top = (QFORMER_LAVIS_LAYER, QFORMER_LAVIS_CROSS, QFORMER_LAVIS_TOP) if lavis else \
        (QFORMER_HF_LAYER, QFORMER_HF_CROSS, QFORMER_HF_TOP)
    theirs = "Qformer.bert.encoder.layer.{i}." if lavis else "qformer.encoder.layer.{i}."
    layers = range(cfg.num_layers)
    cross_layers = [i for i in layers if i % cfg.cross_attention_every == 0]
    return {**top, **_expand(layer, "layers.{i}.", theirs, layers), **_expand(cross, "layers.{i}.", theirs, cross_layers)}


def load_qformer(path, dtype=None, cfg: tv.QFormerConfig | None = None) -> tv.QFormer:
    path = Path(path)
    tensors = read_weights(path)
    if path.is_dir():
        cfg = qformer_config_from_hf(read_config(path))
        key_map, ignore = qformer_key_map(cfg, lavis=False), BLIP2_IGNORED + ("vision_model.",)
    else:
        cfg = cfg or tv.QFormerConfig()
        key_map, ignore = qformer_key_map(cfg, lavis=True), LAVIS_BLIP2_IGNORED
    with torch.device("meta"):
        model = tv.QFormer(cfg)
    return load_mapped(model, tensors, key_map, str(path), ignore=ignore, dtype=_dtype(tensors, dtype))


# ----------------------------------------------------------------------------------------------------------------------
# TinyGPT-V stage checkpoints and our own

def tinygptv_checkpoint_map(cfg: tv.TinyVLMConfig, peft: bool) -> KeyMap:
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


# TinyGPT-V's runner saves the model's state dict less its frozen parameters, so its buffers come along: the
# Q-Former's position ids (0..511, which our Q-Former computes). Nothing else in a stage file is a buffer.
TINYGPTV_BUFFERS = ("Qformer.bert.embeddings.position_ids",)


def tinygptv_checkpoint_config(path: str | os.PathLike, cfg: tv.TinyVLMConfig) -> tuple[tv.TinyVLMConfig, int | None]:
    """cfg with the sizes a TinyGPT-V stage .pth was trained with, read off its tensors: the projections' width and
    the LoRA rank (none in a stage-1 file); and the stage its name says (TinyGPT-V_for_Stage3.pth: 3), if it says."""
    tensors = read_weights(path)
    if "llama_proj.weight" not in tensors:
        raise CheckpointError(f"{path}: not a TinyGPT-V stage checkpoint (no llama_proj.weight among its "
                              f"{len(tensors)} tensors)")
    lora_a = next((t for k, t in tensors.items() if k.endswith("lora_A.weight")), None)
    lora = None if lora_a is None else dataclasses.replace(cfg.lora or tv.LoRAConfig(), rank=lora_a.shape[0])
    named = re.search(r"stage[_ -]?([1-4])", Path(path).name, re.IGNORECASE)
    return (dataclasses.replace(cfg, proj_dim=tensors["llama_proj.weight"].shape[0], lora=lora),
            int(named.group(1)) if named else None)


def load_checkpoint(model: tv.TinyVLM, path: str | os.PathLike, ignore: tuple[str, ...] = ()) -> tv.TinyVLM:
    """Load a partial checkpoint (projections, norms, LoRA) on top of the base weights: a TinyGPT-V stage .pth, or
    one of ours (.safetensors, our names). Every tensor of the file must land on a parameter of the right shape,
    except those whose name contains one of `ignore` (e.g. the norms an ablation removed); every tensor must be
    finite. Ours must also hold every tensor its metadata lists, and match the model's architecture."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_own_checkpoint(path, model.cfg, ignore)
    else:
        ignore = ignore + TINYGPTV_BUFFERS
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
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: key '{theirs}' holds NaN or infinite values: the run that wrote it "
                                      f"diverged; use an earlier checkpoint")
            params[ours].copy_(t)
    return model


def own_metadata(path: str | os.PathLike, *required: str) -> dict[str, str]:
    """The metadata of a model.safetensors that train.py wrote (save_checkpoint): its config, and the `required`
    keys besides. Any other file is refused, quantize.py's output (a near miss: "for asking only") by name."""
    meta = read_metadata(path)
    if meta.get("format") == "tinyvlm-quantized":
        raise CheckpointError(f"{path}: a quantized model (quantize.py --out), for asking only: python tinyvlm.py "
                              f"--quantized {path} ...; training, --init and --checkpoint take the model.safetensors "
                              f"it was quantized from")
    keys = ("config", *required)
    if meta.get("format") != "tinyvlm" or not all(k in meta for k in keys):
        raise CheckpointError(f"{path}: not a model.safetensors written by train.py (its metadata holds no tinyvlm "
                              f"{' and '.join(keys)})")
    return meta


def check_own_checkpoint(path: Path, cfg: tv.TinyVLMConfig | None, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """One of our safetensors checkpoints, before it is loaded into a model with config cfg: written by
    save_checkpoint (our metadata), whole (every tensor its metadata lists is there), and (given cfg) of the same
    architecture: the same sizes, and for a trained stage (not the stage-0 backbones, whose norms an ablation may
    leave out through `ignore`) the same TinyGPT-V norms. Returns the metadata."""
    meta = own_metadata(path)
    saved = tv.TinyVLMConfig.from_dict(json.loads(meta["config"]))
    for part in ("vit", "qformer", "phi") if cfg is not None else ():
        a, b = dataclasses.asdict(getattr(saved, part)), dataclasses.asdict(getattr(cfg, part))
        for key in a:
            if key in ("qk_norm", "post_attn_norm", "resid_dropout", "ln_vision_eps"):
                continue
            if a[key] != b.get(key):
                raise CheckpointError(f"{path}: made for a model with {part}.{key} = {a[key]}, this one has "
                                      f"{b.get(key)}: another preset or other weights?")
    if cfg is not None and json.loads(meta.get("stage", "1")) != 0 and saved.connector != cfg.connector:
        raise CheckpointError(f"{path}: made for the {saved.connector} connector, this model has the {cfg.connector} "
                              f"one: a checkpoint of another design (--recipe)?")
    if cfg is not None and (json.loads(meta.get("stage", "1")) != 0 or not ignore):
        for flag in ("qk_norm", "post_attn_norm"):
            if getattr(saved.phi, flag) != getattr(cfg.phi, flag):
                on = "on" if getattr(saved.phi, flag) else "off"
                raise CheckpointError(f"{path}: trained with {flag} {on}, but this model has it "
                                      f"{'off' if on == 'on' else 'on'}: pass --{'' if on == 'on' else 'no-'}"
                                      f"{flag.replace('_', '-')} (the ablation flags carry through the stages)")
    listed = json.loads(meta.get("tensors", "[]"))
    if cfg is not None and saved.lora is not None and any(".lora_" in k for k in listed):   # adapters it trained
        if cfg.lora is None:
            raise CheckpointError(f"{path}: holds the LoRA adapters it was trained with (rank {saved.lora.rank}), "
                                  f"which this model leaves out: drop --no-lora (the adapters carry through the stages)")
        if cfg.lora.rank != saved.lora.rank:
            raise CheckpointError(f"{path}: trained with LoRA rank {saved.lora.rank}, but this model has rank "
                                  f"{cfg.lora.rank}: pass --lora-rank {saved.lora.rank} (the adapters carry through "
                                  f"the stages)")
    present = read_safetensors_header(path)[0]
    missing = [k for k in listed if k not in present]
    if missing:
        raise CheckpointError(f"{path}: tensor '{missing[0]}' is listed in its metadata but missing from the file "
                              f"(and {len(missing) - 1} more): edited or damaged; use another checkpoint")
    return meta


def save_checkpoint(model: tv.TinyVLM, path: str | os.PathLike, only_trainable: bool = True,
                    metadata: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the (trainable) tensors as safetensors, with the config as metadata; atomically: a temp file in the
    same folder, fsync'd, then renamed over the target, so a crash leaves the previous file whole."""
    path = Path(path)
    state = {k: p.detach().to(dtype or p.dtype) for k, p in model.named_parameters()
             if p.requires_grad or not only_trainable}
    meta = {"format": "tinyvlm", "config": json.dumps(model.cfg.to_dict()), "tensors": json.dumps(sorted(state)),
            **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
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
        fault_point(f"writing {path.name}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp makes 0600 files; a checkpoint is an ordinary file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_FAULTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """For the kill test (tests/test_train.py): with TINYVLM_KILL_AT="NAME:N" in the environment, the N-th time the
    program passes the point NAME it kills itself as `kill -9` would (no clean-up runs). Nothing otherwise."""
    spec = os.environ.get("TINYVLM_KILL_AT")
    if not spec or spec.rpartition(":")[0] != name:
        return
    _FAULTS[name] = _FAULTS.get(name, 0) + 1
    if _FAULTS[name] == int(spec.rpartition(":")[2]):
        os.kill(os.getpid(), signal.SIGKILL)


def read_checkpoint_config(path: str | os.PathLike) -> tv.TinyVLMConfig:
    """The TinyVLMConfig stored in one of our safetensors checkpoints."""
    return tv.TinyVLMConfig.from_dict(json.loads(own_metadata(path)["config"]))


def load_tinyvlm(phi, blip2, vit=None, checkpoint=None, cfg: tv.TinyVLMConfig | None = None, dtype=None) -> tv.TinyVLM:
    cfg = cfg or tv.PRESETS["tinygptv"]()
    reuse_freed_memory()
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
        model = tv.TinyVLM(dataclasses.replace(cfg, lora=None))
    model.vit, model.qformer, model.phi = vit_model, qformer_model, phi_model
    # The projections are TinyGPT-V's own: they come from a stage checkpoint (or start fresh for stage 1).
    for proj in (model.llama_proj, model.llama_proj2):
        proj.to_empty(device="cpu")
        proj.reset_parameters()
    model.cfg = cfg
    if cfg.lora is not None:
        tv.apply_lora(model.phi, cfg.lora)
        materialize(model.phi)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    if dtype in (torch.float16, torch.bfloat16):
        multiply_in_fp32_on_cpu(model)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# The sibling models: TinyLLaVA and Imp (SigLIP -> 2-layer MLP -> Phi-2) and llava-hf files, LLaVA-1.5's design
# References: https://github.com/TinyLLaVA/TinyLLaVA_Factory (tinyllava/model), https://github.com/MILVLG/imp,
#             https://github.com/huggingface/transformers/blob/main/src/transformers/models/llava/modeling_llava.py
#
# One model in four on-disk layouts. Each family's prefixes are renamed to one canonical set (SigLIP's
# "vision_model.*", "connector.{0,2}.*", and Phi's own "model.*" / "lm_head.*" or, in older Imp files, phi-msft's
# "transformer.*" / "lm_head.{ln,linear}.*"), which the key maps above then read strictly. The first prefix of the
# list that a key starts with wins; a key that matches none is reported.

FAMILY_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "tinyllava": (                                 # TinyLLaVA Factory (model_type "tinyllava")
        ("vision_tower._vision_tower.vision_model.", "vision_model."), ("connector._connector.", "connector."),
        ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
    "tinyllava-legacy": (                          # bczhou/TinyLLaVA-3.1B (model_type "tiny_llava_phi")
        ("model.vision_tower.vision_tower.vision_model.", "vision_model."), ("model.mm_projector.", "connector."),
        ("model.", "model."), ("lm_head.", "lm_head.")),
    "imp": (                                       # MILVLG/imp-v1-3b: older revisions phi-msft, newer HF Phi
        ("transformer.vision_tower.vision_tower.vision_model.", "vision_model."),
        ("transformer.mm_projector.", "connector."), ("model.vision_tower.vision_tower.vision_model.", "vision_model."),
        ("model.mm_projector.", "connector."), ("transformer.", "transformer."), ("model.", "model."),
        ("lm_head.", "lm_head.")),
    "llava-hf": (                                  # transformers' LlavaForConditionalGeneration, older and newer names
        ("vision_tower.vision_model.", "vision_model."), ("model.vision_tower.vision_model.", "vision_model."),
        ("vision_tower.", "vision_model."), ("model.vision_tower.", "vision_model."),
        ("multi_modal_projector.linear_1.", "connector.0."), ("multi_modal_projector.linear_2.", "connector.2."),
        ("model.multi_modal_projector.linear_1.", "connector.0."),
        ("model.multi_modal_projector.linear_2.", "connector.2."),
        ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."), ("lm_head.", "lm_head.")),
}
FAMILY_OF_MODEL_TYPE = {"tinyllava": "tinyllava", "tiny_llava_phi": "tinyllava-legacy", "imp": "imp",
                        "llava": "llava-hf"}

# Legacy TinyLLaVA and Imp name their vision tower instead of storing its config: the facts of the one they use
# (google/siglip-so400m-patch14-384's config.json).
VISION_TOWERS: dict[str, dict] = {
    "google/siglip-so400m-patch14-384": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
        "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6},
}
CONNECTOR_MAP: KeyMap = {"mlp_proj.0.weight": "connector.0.weight", "mlp_proj.0.bias": "connector.0.bias",
                         "mlp_proj.2.weight": "connector.2.weight", "mlp_proj.2.bias": "connector.2.bias"}


@dataclass
class FamilyFacts:
    """What a LLaVA-style folder says beside its weights: its family, how its pictures are prepared."""
    family: str
    image_size: int
    pad_to_square: bool           # LLaVA's "pad": the picture is padded to a square before the resize


def llava_family(config: dict, family: str | None, source: str) -> str:
    if family is None:
        family = FAMILY_OF_MODEL_TYPE.get(config.get("model_type"))
        if family is None:
            raise CheckpointError(f"{source}: model_type {config.get('model_type')!r} is none of the LLaVA-style "
                                  f"families ({', '.join(f'{k} -> {v}' for k, v in FAMILY_OF_MODEL_TYPE.items())}); "
                                  f"--family to say which")
    if family not in FAMILY_PREFIXES:
        raise CheckpointError(f"{source}: unknown family {family!r}; expected one of {', '.join(FAMILY_PREFIXES)}")
    return family


def canonical_names(tensors: dict[str, torch.Tensor], family: str, source: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        match = next(((old, new) for old, new in FAMILY_PREFIXES[family] if key.startswith(old)), None)
        if match is None:
            raise CheckpointError(f"{source}: unexpected key '{key}' {tuple(t.shape)}: not part of a model of the "
                                  f"{family} family (its prefixes: {', '.join(p for p, _ in FAMILY_PREFIXES[family])})")
        out[match[1] + key[len(match[0]):]] = t
    return out


def llava_family_config(config: dict, family: str, tensors: dict[str, torch.Tensor],
                        source: str) -> tuple[tv.TinyVLMConfig, FamilyFacts]:
    text = config.get("text_config") or config              # legacy TinyLLaVA and Imp keep Phi's config at the top
    if text.get("model_type") == "llama":
        raise CheckpointError(f"{source}: a Llama language model (LLaVA-1.5, TinyLlama): only Phi is implemented here")
    text = {**text, "model_type": "phi-msft" if "n_embd" in text else "phi"}
    embed = tensors.get("model.embed_tokens.weight", tensors.get("transformer.embd.wte.weight"))
    if embed is None:
        raise CheckpointError(f"{source}: no token embeddings (model.embed_tokens.weight / transformer.embd.wte.weight)")
    # the old Phi config pads the vocabulary to a multiple of 64: the weights say how many rows there are
    phi = phi_config_from_hf(text, vocab_size=embed.shape[0], resid_dropout=0.0)
    vision = config.get("vision_config")
    if not vision:
        tower = config.get("mm_vision_tower")
        if tower not in VISION_TOWERS:
            raise CheckpointError(f"{source}: config.json names the vision tower {tower!r} without its config, and "
                                  f"it is not one of the known ones ({', '.join(VISION_TOWERS)})")
        vision = VISION_TOWERS[tower]
    layer = config.get("vision_feature_layer", config.get("mm_vision_select_layer", -2))
    total = vision["num_hidden_layers"]
    kept = total + 1 + layer if layer < 0 else layer     # hidden_states[k] is the output of block k (0: embeddings)
    vit, _ = vit_config_from_hf(vision, num_layers=kept, ln_vision=False)
    # which token is dropped: TinyLLaVA Factory drops the first (its "patch" strategy written for CLIP's CLS);
    # legacy TinyLLaVA and Imp keep all; llava-hf's "default" drops it, "full" keeps it
    drop = family == "tinyllava" or (family == "llava-hf"
                                     and config.get("vision_feature_select_strategy", "default") == "default")
    cfg = tv.TinyVLMConfig(vit=vit, phi=phi, lora=None, connector="mlp", drop_first_image_token=drop)
    facts = FamilyFacts(family, vision.get("image_size", 384), config.get("image_aspect_ratio") == "pad")
    return cfg, facts


def load_llava_family(folder, family: str | None = None, dtype: torch.dtype | None = None
                      ) -> tuple[tv.TinyVLM, FamilyFacts]:
    """A TinyLLaVA (Factory or legacy), Imp or llava-hf folder (safetensors, shards or .bin) as a TinyVLM with the
    MLP connector, its family detected from config.json (or given). Every key is used or deliberately ignored:
    the tower's blocks after the selected layer, its post_layernorm and pooling head (never applied by these
    models), the position-id buffer."""
    reuse_freed_memory()
    source = str(folder)
    config = read_config(folder)
    family = llava_family(config, family, source)
    tensors = canonical_names(read_weights(folder), family, source)
    cfg, facts = llava_family_config(config, family, tensors, source)
    phi_map, layout = phi_key_map(cfg.phi, tensors)
    head_bias = "lm_head.linear.bias" if layout == "phi-msft" else "lm_head.bias"
    if head_bias not in tensors:      # legacy TinyLLaVA's and llava-hf's lm_head have no bias: ours adds zeros
        tensors[head_bias] = torch.zeros(cfg.phi.vocab_size, dtype=tensors[phi_map["embed_tokens.weight"]].dtype)
    vit_map = {**VIT_CLIP_TOP, **_expand(VIT_CLIP_LAYER, "blocks.{i}.", "vision_model.encoder.layers.{i}.",
                                         range(cfg.vit.num_layers))}
    key_map = {**{"vit." + k: v for k, v in vit_map.items()}, **CONNECTOR_MAP,
               **{"phi." + k: v for k, v in phi_map.items()}}
    ignore = ("vision_model.post_layernorm.", "vision_model.head.", "vision_model.embeddings.position_ids") + tuple(
        f"vision_model.encoder.layers.{i}." for i in range(cfg.vit.num_layers, 1000))
    with torch.device("meta"):
        model = tv.TinyVLM(cfg)
    dtype = _dtype(tensors, dtype)
    load_mapped(model, tensors, key_map, source, ignore=ignore, dtype=dtype)
    if dtype in (torch.float16, torch.bfloat16):
        multiply_in_fp32_on_cpu(model)
    return model, facts


# ----------------------------------------------------------------------------------------------------------------------
# Half-precision weights on a CPU: stored in half precision, multiplied in fp32 where the CPU has no bf16 arithmetic
#
# A CPU without bf16 / fp16 instructions (AVX2: most laptops) multiplies half-precision matrices far slower than
# fp32 ones (a 2-core AVX2 EPYC: 256 x 2560 @ (10240 x 2560)^T at 22 GFLOP/s in bf16 against 146 in fp32; the
# backward's grad @ W 38 s against 0.18 s). So load_tinyvlm, given a half-precision dtype, swaps each nn.Linear for
# CPUHalfLinear: the same parameters and state dict, and on such a CPU the products in fp32. A CPU with bf16
# dot-product instructions (avx512_bf16, AMX) is the other way round: the same bf16 product at 393 GFLOP/s against
# 107 in fp32 (a 2-core AVX-512 EPYC), so there bf16 weights are multiplied as they are.

def _cpu_has(feature: str) -> bool:
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)     # private probes: absent in some torch versions
    return bool(probe and probe())


NATIVE_BF16 = _cpu_has("avx512_bf16") or _cpu_has("amx_tile")


class WidenedLinear(torch.autograd.Function):
    """x @ W^T + b computed in fp32 from a frozen half-precision W, widening W a block of rows at a time: an 8 MB
    fp32 block is reused from the allocator and stays in cache, where a whole fp32 copy is fresh pages to fault in
    (3.5x slower to make: 52 ms against 15 ms for 10240 x 2560) and up to 0.5 GB more peak memory (Phi-2's
    51200 x 2560 output layer). W is frozen, so backward needs only grad @ W; it widens W again
    rather than keeping an fp32 copy of every weight alive from forward to backward. compute_dtype bf16 widens to
    bf16 instead, in forward (Int8Linear's codes on a CPU with bf16 instructions: exact there, and 3.7x faster)."""

    BLOCK_NUMEL = 1 << 21

    @staticmethod
    def row_blocks(weight: torch.Tensor) -> list[tuple[int, int]]:
        rows = max(1, WidenedLinear.BLOCK_NUMEL // weight.shape[1])
        return [(i, min(i + rows, weight.shape[0])) for i in range(0, weight.shape[0], rows)]

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                compute_dtype: torch.dtype = torch.float32):
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        xc = x.to(compute_dtype)
        with torch.autocast("cpu", enabled=False):
            y = torch.cat([F.linear(xc, weight[i:j].to(compute_dtype),
                                    None if bias is None else bias[i:j].to(compute_dtype))
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
        return grad_x.view(*grad.shape[:-1], -1).to(ctx.x_dtype), None, None, None, None


def bf16_matrix_vector(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """One row x (..., in) times a bf16 weight w (out, in) on a CPU, plus b, through torch.mv's kernel (fp32 sums).
    The bias is added apart: torch.addmv, which would add it in the same pass, has no fast bf16 kernel on a CPU
    without bf16 instructions (24.8 ms against torch.mv's 2.9 for 10240 x 2560 on a 2-core AVX2 EPYC; a bf16 model
    decoded at 0.13x transformers' speed so). Its result is F.linear's to within two bf16 roundings (the product's,
    then the sum's)."""
    y = torch.mv(w, x.reshape(-1))
    if b is not None:
        y += b
    return y.view(*x.shape[:-1], w.shape[0])


# One bf16 row times a weight is every product of a decode step, and it has three kernels on a CPU. Which of them
# streams the weight fastest depends on the machine, and not on anything a rule could read off its flags (2 threads,
# one row, Phi-2's weight shapes out of cache, GB/s of weights):
#
#                                                  2-core Intel Xeon (AMX)    2-core AMD EPYC Zen 4
#   "mv":     torch.mv, plain layout                     29-32                      7.6-18
#   "linear": F.linear (oneDNN), plain layout             19-25                      13-21
#   "packed": oneDNN, the weight packed once              27                         21-25
#
# (both have avx512_bf16; docs/performance.md has the tables). So the first one-row product of a process times the
# kernels once, on weights of Phi-2's two shapes out of the cache, and every layer takes the fastest it can: a
# loaded model's layers "mv" or "linear" (packing a weight makes a second copy of it), unless chat.py packs them as
# it loads the model (quantize.pack_bf16_layers, letting each plain weight go); quantize.py's bf16 file any of the
# three (it packs in place of its memory-mapped pages). The kernels agree to within a bf16 rounding or two, so
# where two of them time alike, two processes may choose and round differently: set BF16_ROW_SECONDS (kernel ->
# seconds) to fix the choice and skip the timing (the tests do).
BF16_ROW_SECONDS: dict[str, float] | None = None
PACKED_BF16 = (NATIVE_BF16 and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
               and hasattr(torch.ops.mkldnn, "_linear_pointwise"))      # oneDNN's packed bf16 kernel is usable
PLAIN_BF16_ROW_KERNELS = ("mv", "linear")            # on the weight as it lies: a plain layer's choice
BF16_ROW_KERNELS = PLAIN_BF16_ROW_KERNELS + (("packed",) if PACKED_BF16 else ())   # all: Bf16Linear's choice


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """w (out, in) in oneDNN's blocked layout, for one row at a time (the batch-size hint)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


def packed_bf16_product(x2: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x2 (N, in) bf16 times a weight made by pack_bf16: (N, out) bf16, fp32 sums."""
    return torch.ops.mkldnn._linear_pointwise(x2, packed, None, "none", [], "")


def time_bf16_row_kernels(rounds: int = 3) -> dict[str, float]:
    """Seconds each one-row bf16 kernel takes over four weights (2 x 4096 x 2560, 2 x 2560 x 4096, 84 MB: more
    than the caches), the least of `rounds` passes, the kernels taking turns so that a drift in the machine's
    speed hits them alike. 0.3-0.4 s on a 2-core AMD EPYC, once per process."""
    g = torch.Generator().manual_seed(0)
    mats = [torch.rand(shape, generator=g).to(torch.bfloat16) for shape in [(4096, 2560), (2560, 4096)] * 2]
    rows = [torch.rand(1, m.shape[1], generator=g).to(torch.bfloat16) for m in mats]
    kernels = {"mv": lambda i: bf16_matrix_vector(rows[i], mats[i]), "linear": lambda i: F.linear(rows[i], mats[i])}
    if PACKED_BF16:
        packed = [pack_bf16(m) for m in mats]
        kernels["packed"] = lambda i: packed_bf16_product(rows[i], packed[i])
    best = dict.fromkeys(kernels, math.inf)
    with torch.inference_mode():
        for _ in range(rounds):
            for name, kernel in kernels.items():
                start = time.perf_counter()
                for i in range(len(mats)):
                    kernel(i)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def bf16_row_kernel(candidates: tuple[str, ...] = BF16_ROW_KERNELS) -> str:
    """The fastest of candidates for one bf16 row on this CPU (timed once per process: BF16_ROW_SECONDS)."""
    global BF16_ROW_SECONDS
    if BF16_ROW_SECONDS is None:
        BF16_ROW_SECONDS = time_bf16_row_kernels()
    return min((c for c in candidates if c in BF16_ROW_SECONDS), key=BF16_ROW_SECONDS.__getitem__)


class CPUHalfLinear(nn.Linear):
    """nn.Linear, with the CPU policy: a half-precision weight that takes no gradient (inference, or frozen in
    training) times many rows (prefill, image encoding, training) is widened to fp32 a block at a time, unless it
    is bf16 and the CPU multiplies bf16 natively (NATIVE_BF16); a few rows (decoding) stay in half precision, where
    the weight's bytes and not the arithmetic are the cost (one bf16 row: torch.mv or F.linear, whichever is faster
    on this CPU: bf16_row_kernel); an fp32 weight under CPU autocast (a trained projection) is not cast down. The
    output has the dtype the plain layer would give (autocast's, else the input's): the policy changes speed and
    rounding, not the activations' dtype."""

    MIN_ROWS = 16        # the crossover: 16 rows x (10240 x 2560) take 18 ms widened against 42 ms in bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        autocast = torch.is_autocast_enabled("cpu")
        if x.device.type != "cpu" or (w.dtype == torch.float32 and not autocast):
            return super().forward(x)
        out_dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        frozen = not (torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)))
        slow_half = w.dtype == torch.float16 or (w.dtype == torch.bfloat16 and not NATIVE_BF16)
        if slow_half and frozen and x.numel() >= self.MIN_ROWS * x.shape[-1]:
            return WidenedLinear.apply(x, w, b, out_dtype)
        one_bf16_row = w.dtype == x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]
        if (one_bf16_row and frozen and not autocast and (b is None or b.dtype == w.dtype)
                and bf16_row_kernel(PLAIN_BF16_ROW_KERNELS) == "mv"):
            return bf16_matrix_vector(x, w, b)
        if w.dtype == torch.float32 and out_dtype != torch.float32:
            with torch.autocast("cpu", enabled=False):
                return F.linear(x.float(), w, b).to(out_dtype)
        return super().forward(x)


class CPUHalfLoRALinear(tv.LoRALinear, CPUHalfLinear):
    """A LoRALinear whose frozen product follows the CPU policy (LoRALinear.forward's super() is CPUHalfLinear's)."""


def multiply_in_fp32_on_cpu(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear (and LoRALinear) of model for its CPU-policy class, in place: no tensor is copied, the
    state dict is unchanged, and off the CPU the layers behave exactly as before."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = CPUHalfLinear
        elif type(m) is tv.LoRALinear:
            m.__class__ = CPUHalfLoRALinear
    return model
