"""
quantize.py: weight-only int8 and int4 (and fp16, bf16) for tinyvlm, written directly in PyTorch (no bitsandbytes).

    int8  symmetric, one scale per output channel:        w ~= q * s[n]                      q in -127..127
    int4  asymmetric, groups of 128 along the input:      w ~= q * s[n, g] + m[n, g]          q in 0..15
    fp16  the weight rounded to fp16 (exact for Phi-2, whose public weights are fp16), for its CPU kernel
    bf16  the weight rounded to bf16, for the kernel of CPUs with bf16 instructions

Decoding one token reads every weight once, so it is bound by memory bandwidth: a quarter of the bytes (int8 vs
fp32) is up to four times the tokens per second. Each layer has a readable reference forward (dequantize, then
matmul: obviously right) and, where this torch has them, fast private kernels:
    int8 decode   one row on a CPU (one sequence): FBGEMM's int8 product, torch.ops.quantized.linear_dynamic, the
                  activations quantized per token (as llama.cpp's Q8_0 does; Int8Linear.forward_w8a8 says why);
                  2 to 63 rows, or with DECODE_ACTIVATIONS = "bf16": torch.ops.aten._weight_int8pack_mm (bf16
                  activations, the weights alone quantized). FBGEMM packs each weight into its own layout once, as
                  the int4 and fp16 kernels do; pack_weights does it for a whole model before it answers (chat.py)
    int8 prefill  CPU: the reference's product, the weight widened to fp32 (bf16 on CPUs with bf16 instructions) a
                  block at a time (weights.WidenedLinear), faster there than any int8 kernel;
                  GPU: torch._int_mm on per-token-quantized activations, with LLM.int8's outlier split: activation
                  columns above a threshold (6.0) stay in floating point
    int4          torch.ops.aten._weight_int4pack_mm_for_cpu (bf16 activations), on CPU
    fp16          torch.ops.quantized.linear_dynamic_fp16 (FBGEMM: fp16 weights packed for the CPU, fp32 activations
                  and sums), on CPU, any number of rows. On a 2-core AVX2 EPYC it streams weights at 25 GB/s
                  where torch's bf16 and fp16 matrix-vector products reach 19-20 (four Phi-2 layers, one row),
                  and beats the widened fp32 product at 256 rows too (90 vs 163 ms, 10240 x 2560): on a CPU
                  without bf16 instructions it is the fast half-precision model.
    bf16          one row: whichever of torch.mv, F.linear and oneDNN's packed kernel streams the weight fastest
                  on this CPU, timed once per process (weights.bf16_row_kernel); many rows: F.linear in bf16 on a
                  CPU with avx512_bf16 or AMX (or the packed kernel, once packed), else widened to fp32 a block at
                  a time (Bf16Linear says why and by how much). A model loaded in bf16 for chat.py is packed the
                  same way where that is faster, its plain weights let go (pack_bf16_layers)
Private ops change between torch versions: each is detected once, and the reference path serves when one is missing.
Every operand handed to one of them goes through aligned(): their AVX2 / AVX-512 code uses aligned vector loads.

    python quantize.py --mode int8 --out out/int8.safetensors     # the trained tiny model of train.py, stage 4
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import data
import evaluation
import tinyvlm as tv
import train
import weights


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


FAST_INT8 = _has("_weight_int8pack_mm")
FAST_INT4 = _has("_convert_weight_to_int4pack_for_cpu") and _has("_weight_int4pack_mm_for_cpu")
FAST_INT_MM = hasattr(torch, "_int_mm")
FAST_FP16 = hasattr(torch.ops.quantized, "linear_prepack_fp16") and hasattr(torch.ops.quantized, "linear_dynamic_fp16")
# FBGEMM's int8 product takes its weight as a quantized tensor, which torch has deprecated; once they are gone,
# the weight-only kernel serves one-row products too
FAST_INT8_DYNAMIC = (hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch, "_make_per_channel_quantized_tensor")
                     and torch.backends.quantized.engine in ("x86", "fbgemm"))


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself if it is contiguous and starts on a 64-byte boundary, else a copy that does (torch's CPU allocator
    aligns every tensor it makes to 64 bytes). The packed kernels' vector code uses aligned loads and dies with
    SIGSEGV on anything else: _weight_int8pack_mm wants its int8 weight 16-byte aligned on AVX-512 (from 4 rows) and
    its bf16 activations 16-byte (AVX2) or 32-byte (AVX-512) aligned, at any row count. A tensor memory-mapped from
    a safetensors file is only 8-byte aligned in general, and a slice of a tensor need not be aligned at all.
    (Measured with torch 2.13 at every ATEN_CPU_CAPABILITY level; no kernel read past the end of an operand.)"""
    if t.is_contiguous() and t.data_ptr() % weights.ALIGNMENT == 0:
        return t
    out = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
    weights.release_pages(t)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The number formats

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K) and fp32 scales (N,): symmetric, per output channel."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> uint8 codes 0..15 (N, K), scales and minima (N, K / group): asymmetric per group."""
    N, K = w.shape
    if K % group:
        raise ValueError(f"int4 needs in_features ({K}) divisible by the group size ({group})")
    wg = w.float().view(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
    return q, scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group: int) -> torch.Tensor:
    N, K = q.shape
    return (q.view(N, K // group, group).float() * scale[..., None] + lo[..., None]).view(N, K)


# ----------------------------------------------------------------------------------------------------------------------
# Layers

class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output row. path: "auto" (fast kernels where present),
    or "reference" (dequantize then matmul)."""

    CPU_KERNEL_ROWS = 64     # below: the packed kernel (AVX2, 32 rows: 28 ms vs 56 ms widened); from here: widened
    DECODE_ACTIVATIONS = "int8"   # one row on a CPU: "int8" (FBGEMM, forward_w8a8) or "bf16" (forward_decode)

    def __init__(self, in_features: int, out_features: int, bias: bool, outlier_threshold: float = 6.0, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.outlier_threshold = outlier_threshold
        self.path = "auto"
        self._w8a8 = None        # FBGEMM's packed copy of the weight, made at the first one-row product

    @classmethod
    def from_linear(cls, linear: nn.Linear, outlier_threshold: float = 6.0) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, outlier_threshold,
                    device=linear.weight.device)
        layer.weight, layer.scales = quantize_int8(linear.weight.detach())
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """x (q s)^T = (x q^T) s: the int8 weight widened to fp32, the scales applied to the output columns (one
        multiply per output instead of per weight)."""
        y = F.linear(x.float(), self.weight.float()) * self.scales
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)

    def forward_widened(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows on a CPU (prefill, images): the reference's product, widening a block of rows at a time
        (weights.WidenedLinear). 256 x 2560 @ (10240 x 2560)^T on an AVX2 CPU: 114 ms, against 186 ms widened whole,
        205 ms in the packed kernel and 2.2 s in _int_mm, which has no fast path on CPUs without VNNI. On a CPU
        with bf16 instructions the codes are widened to bf16 instead, which holds every int8 value exactly, with the
        activations rounded to bf16 (2^-9 relative; decoding's one-row product quantizes them to 7 bits): 3.7x the
        fp32 product's speed there."""
        compute = torch.bfloat16 if weights.NATIVE_BF16 else torch.float32
        return weights.WidenedLinear.apply(x2, self.weight, None, torch.float32, compute) * self.scales

    def forward_decode(self, x2: torch.Tensor) -> torch.Tensor:
        """A few rows on a CPU: the packed kernel reads int8 weights and wants bf16 activations (fp32 ones are
        ~15x slower). The weight was aligned once, when loaded; aligned() returns it as it is."""
        return torch.ops.aten._weight_int8pack_mm(aligned(x2.to(torch.bfloat16)), aligned(self.weight),
                                                  aligned(self.scales.to(torch.bfloat16)))

    def forward_w8a8(self, x2: torch.Tensor) -> torch.Tensor:
        """One row on a CPU, the memory-bound case of decoding one sequence: FBGEMM's int8 x int8 product (AVX2's
        vpmaddubsw, AVX-512's VNNI), the row quantized as it comes (forward_w8a8_reference spells it out). On the
        2-core AVX2 EPYC it reads 17.9 GB/s of weights where _weight_int8pack_mm, which widens every weight to fp32
        first, reads 10.4 (10240 x 2560, eight matrices in turn so that none is cached: 1.5 vs 2.5 ms). What it
        costs in accuracy, on the tiny stage-4 model (Phi in int8, 100 held-out per task, teacher-forced): top-1
        agreement with fp32 0.996 (weights alone in int8: 0.998), the same task scores but [caption] 0.866 -> 0.863
        and [detection] 0.693 -> 0.703. The packed copy is made at the first call, with the bias, which FBGEMM adds
        as it writes the output (one op fewer a layer); the file's pages of the plain weight are then handed back
        after every use, so the two copies are not both resident."""
        return torch.ops.quantized.linear_dynamic(aligned(x2.float()), self.packed_w8a8(), True)

    def packed_w8a8(self):
        """FBGEMM's packed copy of the weight, made once (at the first one-row product, or by pack_weights);
        the file's pages of the plain weight are then handed back."""
        if self._w8a8 is None:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():              # quantized tensors are deprecated (FAST_INT8_DYNAMIC)
                warnings.simplefilter("ignore", UserWarning)
                weight = torch._make_per_channel_quantized_tensor(aligned(self.weight), self.scales.double(), zero, 0)
            self._w8a8 = torch.ops.quantized.linear_prepack(weight, None if self.bias is None else self.bias.float())
            weights.release_pages(self.weight)
        return self._w8a8

    def forward_w8a8_reference(self, x2: torch.Tensor) -> torch.Tensor:
        """What forward_w8a8 computes, in plain PyTorch: each row is quantized to 7 bits (0..127), asymmetric, over
        its own range widened to hold 0 (FBGEMM's reduce_range: on AVX2 a pair of 8-bit products summed in 16 bits
        could overflow), multiplied in integers with the int8 weight, scaled back, and the bias added."""
        x = x2.float()
        lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
        step = ((hi - lo) / 127).clamp(min=1e-8)                                    # (M, 1)
        zero_point = torch.round(-lo / step).clamp(0, 127)
        xq = (torch.round(x / step) + zero_point).clamp(0, 127)
        y = ((xq - zero_point) @ self.weight.float().T) * step * self.scales      # integer sums, in fp32
        return y if self.bias is None else y + self.bias.float()

    def forward_prefill(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows on a GPU (int8 tensor cores): int8 x int8 -> int32 with per-token activation scales. LLM.int8's
        decomposition: activation columns holding any value above the threshold are taken out and multiplied in
        floating point."""
        x2 = x2.float()
        outliers = (x2.abs() > self.outlier_threshold).any(0)                      # (K,) feature columns
        y = torch.zeros(x2.shape[0], self.out_features, dtype=torch.float32, device=x2.device)
        if outliers.any():
            y += x2[:, outliers] @ (self.weight[:, outliers].float() * self.scales[:, None]).T
            x2 = x2.masked_fill(outliers, 0.0)
        sx = x2.abs().amax(1).clamp(min=1e-8) / 127                                 # (M,) per token
        xq = torch.round(x2 / sx[:, None]).clamp(-127, 127).to(torch.int8)
        return y + torch._int_mm(aligned(xq), aligned(self.weight).t()).float() * sx[:, None] * self.scales[None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "reference":
            return self.forward_reference(x)
        x2 = x.reshape(-1, self.in_features)
        rows, device = x2.shape[0], x2.device.type
        if device == "cpu" and rows == 1 and self.DECODE_ACTIVATIONS == "int8" and FAST_INT8_DYNAMIC:
            return self.forward_w8a8(x2).to(x.dtype).reshape(*x.shape[:-1], self.out_features)   # with its bias
        if device == "cpu" and rows < self.CPU_KERNEL_ROWS and FAST_INT8:
            y = self.forward_decode(x2)
            if self._w8a8 is not None:       # decoding reads the packed copy: the plain one need not stay resident
                weights.release_pages(self.weight)
        elif device == "cpu":
            # A memory-mapped weight's pages are handed back after a product over many rows (a prompt, an image):
            # re-reading them from the page cache next time costs little beside the product, and the model's
            # resident memory is then what decoding holds, not every weight the prompt touched.
            y = self.forward_widened(x2)
            weights.release_pages(self.weight)
        elif device == "cuda" and rows >= 32 and FAST_INT_MM:
            y = self.forward_prefill(x2)
        else:
            return self.forward_reference(x)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def pack_weights(model: nn.Module, threads: int | None = None) -> int:
    """Make now the packed copies that the quantized layers' CPU kernels would make at their first use (FBGEMM's
    int8 layout for decoding, Int8Linear.packed_w8a8; the int4 and fp16 kernels' own, PackedLinear.pack), as many
    layers at a time as torch has threads: each is packed on one thread. On a 2-core AVX2 EPYC, at full size, the
    first int8 decode step took 15.7 s (FBGEMM packs a 10240 x 2560 matrix in 125-138 ms) and packing beforehand in
    two threads 10.8 s; an fp16 matrix takes 0.38 s alone, 0.24 s a matrix two at a time. chat.py calls it once a
    model is loaded, so that an answer does not stall after its first token. Returns how many layers it packed."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = [m.pack for m in model.modules() if isinstance(m, PackedLinear) and m.packs_on_cpu()]
    if FAST_INT8_DYNAMIC and Int8Linear.DECODE_ACTIVATIONS == "int8":
        jobs += [m.packed_w8a8 for m in model.modules() if isinstance(m, Int8Linear) and m.path == "auto"
                 and m.weight.device.type == "cpu" and m._w8a8 is None]
    if not jobs:
        return 0
    # each int8 layer's catch_warnings runs inside this one, which restores the process's filters when all are done
    with warnings.catch_warnings(), ThreadPoolExecutor(threads or torch.get_num_threads()) as pool:
        list(pool.map(lambda pack: pack(), jobs))
    return len(jobs)


class PackedLinear(nn.Module):
    """What Int4Linear, Fp16Linear and Bf16Linear share: the weight is stored portable, and a CPU kernel's own
    layout of it is made at first use (forward_fast, on the rows flattened), or beforehand by pack_weights
    (Bf16Linear's kernels take it as it lies); the readable forward_reference serves elsewhere, when this torch
    lacks the kernel (FAST), or on request (path = "reference")."""

    FAST = False

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.path = "auto"
        self._packed = None

    def kernel_fits(self) -> bool:
        return True

    def packs_on_cpu(self) -> bool:
        """Whether a product on the CPU would make this layer's packed copy (pack), and it is not made yet."""
        return (type(self).pack is not PackedLinear.pack and self._packed is None and self.path == "auto"
                and self.FAST and self.weight.device.type == "cpu" and self.kernel_fits())

    def pack(self) -> None:
        """Make the CPU kernel's own layout of the weight (Int4Linear, Fp16Linear); Bf16Linear decides at its
        first one-row product, having timed its kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "reference" or not self.FAST or x.device.type != "cpu" or not self.kernel_fits():
            return self.forward_reference(x)
        y = self.forward_fast(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int4Linear(PackedLinear):
    """A Linear whose weight is 4-bit codes in groups of `group` inputs, each group with its scale and minimum."""

    FAST = FAST_INT4

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int = 128, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.group = group
        # two codes per byte, low nibble first
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, in_features // group, device=device))
        self.register_buffer("minima", torch.zeros(out_features, in_features // group, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = 128) -> "Int4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group, device=linear.weight.device)
        q, layer.scales, layer.minima = quantize_int4(linear.weight.detach(), group)
        layer.weight = q[:, 0::2] | (q[:, 1::2] << 4)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def kernel_fits(self) -> bool:
        return self.out_features % 16 == 0        # the packed int4 kernel works on tiles of 16 output rows

    def codes(self) -> torch.Tensor:
        return torch.stack((self.weight & 15, self.weight >> 4), dim=-1).view(self.out_features, self.in_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_int4(self.codes(), self.scales, self.minima, self.group)
        return F.linear(x.float(), w, None if self.bias is None else self.bias.float()).to(x.dtype)

    def pack(self) -> None:
        # the kernel computes w = (q - 8) * scale + zero: our minimum m is zero - 8 * scale
        self._packed = aligned(torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            aligned(self.codes().to(torch.int32)), 1))
        zero = self.minima + 8 * self.scales
        self._scales_zeros = aligned(torch.stack((self.scales, zero), -1).transpose(0, 1).to(torch.bfloat16))
        weights.release_pages(self.weight)    # memory-mapped codes, now packed: their pages need not stay resident

    def forward_fast(self, x2: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self.pack()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(aligned(x2.to(torch.bfloat16)), self._packed, self.group,
                                                          self._scales_zeros).float()


class HalfLinear(PackedLinear):
    """What Fp16Linear and Bf16Linear share: the weight stored in DTYPE, the bias in fp32, and a reference forward
    that widens both to fp32."""

    DTYPE = torch.float16

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=self.DTYPE, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "HalfLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        layer.weight = linear.weight.detach().to(cls.DTYPE)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("this layer holds its weight only in oneDNN's packed layout (pack_bf16_layers), "
                               "which serves the CPU's fast path alone: load the model again for another device "
                               "or path")
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float()).to(x.dtype)


class Fp16Linear(HalfLinear):
    """A Linear whose weight is fp16, for FBGEMM's packed fp16 kernel on a CPU."""

    FAST = FAST_FP16
    DTYPE = torch.float16

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp16Linear":
        layer = super().from_linear(linear)
        if not torch.isfinite(layer.weight).all():       # bf16 has fp32's range; fp16 stops at 65504
            raise ValueError(f"fp16: a weight of {tuple(linear.weight.shape)} exceeds fp16's range (65504); use int8")
        return layer

    def pack(self) -> None:        # FBGEMM's own layout (same bytes), made at first use; the bias is added after
        self._packed = torch.ops.quantized.linear_prepack_fp16(aligned(self.weight), None)
        weights.release_pages(self.weight)    # memory-mapped weight, now packed: its pages need not stay resident

    def forward_fast(self, x2: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self.pack()
        return torch.ops.quantized.linear_dynamic_fp16(aligned(x2.float()), self._packed)


class Bf16Linear(HalfLinear):
    """A Linear whose weight is bf16, taken as it lies in the file (memory-mapped), or packed alone from a loaded
    layer (packed_from). One row (decoding) goes through the kernel that streams a bf16 weight fastest on this CPU
    (weights.bf16_row_kernel, timed once per process): torch.mv on the plain weight on a 2-core Intel Xeon (32
    GB/s), oneDNN on the weight packed once into its blocked layout on a 2-core AMD EPYC (Zen 4: 21-25 GB/s, where
    torch.mv streams 8-18); packed, the weight serves every row count (its file pages handed back: one copy still).
    Many rows otherwise: F.linear in bf16 on a CPU with bf16 instructions (avx512_bf16, AMX), widened to fp32 a
    block at a time elsewhere."""

    FAST = True
    DTYPE = torch.bfloat16

    def forward_fast(self, x2: torch.Tensor) -> torch.Tensor:
        one_row = x2.shape[0] == 1
        kernel = weights.bf16_row_kernel() if one_row else None      # timed at the first one-row product
        if self._packed is None and one_row and kernel == "packed":
            self._packed = weights.pack_bf16(aligned(self.weight))
            weights.release_pages(self.weight)    # memory-mapped weight, now packed: its pages need not stay resident
        if self._packed is not None:
            return weights.packed_bf16_product(aligned(x2.to(torch.bfloat16)), self._packed)
        if one_row and kernel == "mv":
            return weights.bf16_matrix_vector(x2.to(torch.bfloat16), self.weight)
        if one_row or weights.NATIVE_BF16:
            return F.linear(x2.to(torch.bfloat16), self.weight)
        return weights.WidenedLinear.apply(x2, self.weight, None, torch.float32)

    @classmethod
    def packed_from(cls, linear: nn.Linear) -> "Bf16Linear":
        """linear (a bf16 weight) as a Bf16Linear that holds its weight packed and nothing else: the plain weight
        is not kept (pack_bf16_layers)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        layer._packed = weights.pack_bf16(aligned(linear.weight.detach()))
        layer.weight = None
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        return layer


class Int4Embedding(nn.Module):
    """Token embeddings as 4-bit codes in groups along the width (the rows an int4 lm_head would hold): a lookup
    dequantizes only the rows it reads. Imp quantizes its embeddings so for phones; Phi-2's are 0.26 GB in fp16."""

    def __init__(self, num_embeddings: int, dim: int, group: int = 32, device=None):
        super().__init__()
        self.num_embeddings, self.dim, self.group = num_embeddings, dim, group
        self.register_buffer("weight", torch.zeros(num_embeddings, dim // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, dim // group, device=device))
        self.register_buffer("minima", torch.zeros(num_embeddings, dim // group, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group: int = 32) -> "Int4Embedding":
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, group, device=embedding.weight.device)
        q, layer.scales, layer.minima = quantize_int4(embedding.weight.detach(), group)
        layer.weight = q[:, 0::2] | (q[:, 1::2] << 4)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids]                                                   # (..., dim / 2)
        codes = torch.stack((rows & 15, rows >> 4), dim=-1).view(*ids.shape, self.dim)
        return dequantize_int4(codes.reshape(-1, self.dim), self.scales[ids].reshape(-1, self.dim // self.group),
                               self.minima[ids].reshape(-1, self.dim // self.group), self.group).view(*ids.shape, self.dim)


# ----------------------------------------------------------------------------------------------------------------------
# Whole models

PARTS = ("phi", "vit", "qformer", "projections")     # the model's Linear layers, by part
ALL_PARTS = PARTS + ("embeddings",)                   # and Phi's token embeddings (int4 only: Imp's recipe)
PROJECTIONS = ("llama_proj", "llama_proj2", "mlp_proj")


def _replace_linears(model: tv.TinyVLM, parts, make) -> None:
    """Replace every nn.Linear of the chosen parts by make(linear), in place."""
    for part in parts:
        if part not in ALL_PARTS:
            raise ValueError(f"unknown part {part!r}; choose from {ALL_PARTS}")
        if part == "embeddings" or (part == "qformer" and not hasattr(model, "qformer")):
            continue                                     # not Linear layers (quantize_embeddings); no Q-Former
        roots = [n for n in PROJECTIONS if hasattr(model, n)] if part == "projections" else [part]
        for root in roots:
            # by name, one layer at a time: a list of the layers would keep every replaced weight alive to the end
            names = [name for name, m in model.get_submodule(root).named_modules() if isinstance(m, nn.Linear)]
            for name in names:
                parent, _, child = (f"{root}.{name}" if name else root).rpartition(".")
                parent = model.get_submodule(parent) if parent else model
                setattr(parent, child, make(getattr(parent, child)))


MODES = ("int8", "int4", "fp16", "bf16")


def _layer_for(linear: nn.Linear, recipe: dict, empty: bool) -> nn.Module:
    """The quantized replacement of one Linear: int4 where the input width fits the group, int8 otherwise; fp16, bf16."""
    if recipe["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {recipe['mode']!r}")
    args = (linear.in_features, linear.out_features, linear.bias is not None)
    if recipe["mode"] in ("fp16", "bf16"):
        half = Fp16Linear if recipe["mode"] == "fp16" else Bf16Linear
        return half(*args) if empty else half.from_linear(linear)
    if recipe["mode"] == "int4" and linear.in_features % recipe["group"] == 0:
        return Int4Linear(*args, group=recipe["group"]) if empty else Int4Linear.from_linear(linear, recipe["group"])
    return Int8Linear(*args, recipe["outlier_threshold"]) if empty else \
        Int8Linear.from_linear(linear, recipe["outlier_threshold"])


def quantize_model(model: tv.TinyVLM, mode: str = "int8", parts: tuple[str, ...] = ("phi",), group: int = 128,
                   outlier_threshold: float = 6.0) -> tv.TinyVLM:
    """Replace the Linear layers of the chosen parts by int8 / int4 / fp16 / bf16 ones, in place. LoRA is merged first (a
    quantized model is for inference). Layers whose input width is not a multiple of the int4 group stay int8."""
    recipe = {"mode": mode, "parts": list(parts), "group": group, "outlier_threshold": outlier_threshold}
    if "embeddings" in parts and mode != "int4":
        raise ValueError(f"the embeddings part is quantized to int4 only (Imp's recipe), not {mode}")
    for layer in tv.lora_layers(model):
        layer.merge()
    _replace_linears(model, parts, lambda linear: _layer_for(linear, recipe, empty=False))
    if "embeddings" in parts:
        model.phi.embed_tokens = Int4Embedding.from_embedding(model.phi.embed_tokens, group)
    model.quantization = recipe
    return model


def pack_bf16_layers(model: tv.TinyVLM) -> int:
    """A loaded model that will only answer (chat.py), the bf16 Linear layers of its frozen towers on the CPU (the
    public weights loaded in bf16: the language model, the ViT, the Q-Former; not the trained connector) made
    Bf16Linears that hold their weights in oneDNN's packed layout alone, where that layout streams one bf16 row
    fastest on this CPU (weights.bf16_row_kernel: on a Zen 4 EPYC, not on a Xeon, where torch.mv on the plain
    weight is faster). LoRA is merged into its layer first, as quantize_model does. Each plain weight is let go as
    soon as its packed copy is made, so one copy is held throughout, as in the bf16 file. A packed layer serves any
    number of rows, on the CPU only: the model can no longer be trained, saved or moved. Returns how many layers
    were packed: 0 where another kernel is faster, or where there is none to pack (the model unchanged)."""
    towers = ("phi", "vit", "qformer")
    packable = lambda m: m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
    count = sum(isinstance(m, nn.Linear) and packable(m)
                for part in towers if hasattr(model, part) for m in model.get_submodule(part).modules())
    if not (count and weights.PACKED_BF16 and weights.bf16_row_kernel() == "packed"):
        return 0
    for layer in tv.lora_layers(model):
        layer.merge()
    _replace_linears(model, towers, lambda linear: Bf16Linear.packed_from(linear) if packable(linear) else linear)
    return count


def _strip_lora(cfg: tv.TinyVLMConfig) -> tv.TinyVLMConfig:
    return dataclasses.replace(cfg, lora=None)


def save_quantized(model: tv.TinyVLM, path: str | Path, stage: int = 4, image_size: int | None = None,
                   train_config: dict | None = None, tokenizer: str | None = None) -> Path:
    """Every tensor (int codes, scales, the unquantized parts) as safetensors; the config, the quantization recipe,
    the stage and image size it was trained for (its prompt template and input) and its tokenizer (a
    tokenizer.json's text) in its metadata: the file is the whole model. LoRA is already merged, so the saved
    config has none."""
    state = {k: v.detach() for k, v in model.state_dict().items() if ".lora_" not in k}
    meta = {"format": "tinyvlm-quantized", "config": json.dumps(_strip_lora(model.cfg).to_dict()),
            "quantization": json.dumps(model.quantization), "stage": json.dumps(stage),
            "image_size": json.dumps(image_size or model.cfg.vit.image_size), "train_config": json.dumps(train_config)}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer
    weights.atomic_write(path, lambda tmp: weights.write_safetensors(state, tmp, meta))
    return Path(path)


def load_quantized(path: str | Path) -> tv.TinyVLM:
    """Build the model on the meta device, swap in the quantized layers, then take the file's tensors as they are
    (memory-mapped): the full-precision model is never built, so peak memory stays near the quantized size."""
    weights.reuse_freed_memory()
    meta = weights.read_metadata(path)
    if meta.get("format") != "tinyvlm-quantized":
        raise weights.CheckpointError(f"{path}: not a quantized tinyvlm checkpoint (write one with quantize.py --out)")
    cfg = tv.TinyVLMConfig.from_dict(json.loads(meta["config"]))
    recipe = json.loads(meta["quantization"])
    with torch.device("meta"):
        model = tv.TinyVLM(cfg)
        _replace_linears(model, recipe["parts"], lambda linear: _layer_for(linear, recipe, empty=True))
        if "embeddings" in recipe["parts"]:
            model.phi.embed_tokens = Int4Embedding(cfg.phi.vocab_size, cfg.phi.hidden, recipe["group"])
    tensors = weights.read_weights(path)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise weights.CheckpointError(f"{path}: missing {missing[:3]} unexpected {unexpected[:3]} for its own recipe")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise weights.CheckpointError(f"{path}: key '{k}' has shape {tuple(t.shape)} but the model expects "
                                          f"{tuple(expected[k].shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise weights.CheckpointError(f"{path}: key '{k}' holds NaN or infinite values")
        weights.release_pages(t)   # the check read every page: resident, they would stay beside the packed copies
    model.load_state_dict(tensors, assign=True)
    # The int8 kernel takes its weight as it lies: one that the file left unaligned is copied once, here. Files
    # written by save_quantized are laid out aligned (weights.write_safetensors), so theirs stay memory-mapped.
    for layer in model.modules():
        if isinstance(layer, Int8Linear):
            layer.weight = aligned(layer.weight)
    model.quantization = recipe
    model.trained_for = {"stage": json.loads(meta.get("stage", "4")),
                         "image_size": json.loads(meta.get("image_size", str(cfg.vit.image_size))),
                         "train_config": json.loads(meta.get("train_config", "null")),
                         "tokenizer": meta.get("tokenizer")}
    return model


def part_bytes(model: tv.TinyVLM) -> dict[str, int]:
    """Bytes of every tensor (parameters and buffers) per part of the model."""
    out: dict[str, int] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        part = name.split(".")[0]
        part = "projections" if part in PROJECTIONS else part
        out[part] = out.get(part, 0) + t.numel() * t.element_size()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Command line: quantize a trained model and say what it costs

@torch.no_grad()
def logit_agreement(reference: tv.TinyVLM, quantized: tv.TinyVLM, batches) -> dict[str, float]:
    """Teacher-forced logits of both models on the same held-out batches, at the answer positions."""
    max_err, sum_err, n, agree = 0.0, 0.0, 0, 0
    for batch in batches:
        kw = {"features": batch.get("features"), "attention_mask": batch["attention_mask"]}
        a, _ = reference(batch.get("pixels"), batch["input_ids"], **kw)
        b, _ = quantized(batch.get("pixels"), batch["input_ids"], **kw)
        at = batch["labels"][:, 1:] != tv.IGNORE_INDEX
        a, b = a[:, :-1][at].float(), b[:, :-1][at].float()
        max_err = max(max_err, float((a - b).abs().max()))
        sum_err += float((a - b).abs().mean(-1).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return {"max |logit error|": max_err, "mean |logit error|": sum_err / n, "top-1 agreement": agree / n}


TRAINED_STAGE4 = Path("out/stage4/model.safetensors")


@dataclass
class QuantizeConfig:
    checkpoint: str = ""            # a model.safetensors written by train.py (default: out/stage4's, else the shipped)
    mode: str = "int8"              # int8 (per-channel), int4 (grouped), fp16 (FBGEMM) or bf16 (oneDNN; avx512_bf16 CPUs)
    parts: str = "phi"              # which parts, comma-separated: phi, vit, qformer, projections, embeddings (int4); all
    group: int = 128                # int4: inputs per group (the tiny model's 192-wide layers need 64)
    outlier_threshold: float = 6.0  # int8 on a GPU: activation columns above this stay in floating point
    eval_samples: int = 100         # held-out samples per task for the comparison
    out: str = ""                   # write the quantized model to this .safetensors file

    CHOICES: ClassVar[dict[str, tuple]] = {"mode": MODES, "group": (32, 64, 128, 256)}
    LIMITS: ClassVar[dict[str, tuple]] = {"outlier_threshold": (0.0, None), "eval_samples": (1, None)}


def refuse_to_replace_a_model(out: Path, checkpoint: Path, mode: str) -> None:
    """--out must not write over the model being quantized, nor over any other model train.py wrote: a quantized
    file is for asking, and the trained weights under it would be lost (an earlier quantized file may be replaced)."""
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise cli.UserError(f"--out {out} is the model being quantized (--checkpoint): the quantized file would replace "
                            f"it; give another path, e.g. --out {out.with_suffix('')}.{mode}.safetensors")
    try:
        trained = out.exists() and weights.read_metadata(out).get("format") == "tinyvlm"
    except weights.CheckpointError:       # not a safetensors file: nothing of train.py's
        trained = False
    if trained:
        raise cli.UserError(f"--out {out} holds a model train.py wrote: the quantized file would replace it; give "
                            f"another path")


def main(argv: list[str] | None = None) -> None:
    import copy
    args = cli.config_from_args(QuantizeConfig, cli.parser_for(QuantizeConfig, __doc__).parse_args(argv))
    parts = (ALL_PARTS if args.mode == "int4" else PARTS) if args.parts == "all" else \
        tuple(p for p in args.parts.split(",") if p)
    if not parts or set(parts) - set(ALL_PARTS):
        raise cli.UserError(f"--parts {args.parts!r}: expected 'all' or a comma-separated list from {', '.join(ALL_PARTS)}")
    if "embeddings" in parts and args.mode != "int4":
        raise cli.UserError(f"--parts embeddings: the token embeddings are quantized to int4 only, not {args.mode}")
    if args.out:
        cli.writable_file(args.out, "--out", weights.SAFETENSORS_FILE)
    if not args.checkpoint:
        args.checkpoint = str(TRAINED_STAGE4)
        if not TRAINED_STAGE4.exists():        # before stage 4 has run here: the shipped one, as tinyvlm.py asks it
            print(f"note: no {TRAINED_STAGE4}: quantizing the shipped stage-4 model ({train.SHIPPED_STAGE4})")
            args.checkpoint = str(train.SHIPPED_STAGE4)
    if not Path(args.checkpoint).exists():
        raise cli.UserError(f"--checkpoint {args.checkpoint}: not found")
    if args.out:
        refuse_to_replace_a_model(Path(args.out), Path(args.checkpoint), args.mode)
    cfg = train.config_of_checkpoint(args.checkpoint, eval_samples=args.eval_samples, device="cpu")
    reference, _ = train.build_model(cfg, torch.device("cpu"))
    reference.eval()
    if args.mode == "bf16" and not weights.NATIVE_BF16:
        print("note: this CPU has no bf16 instructions (avx512_bf16, AMX): a bf16 file widens a prompt's weights to "
              "fp32 here (decoding stays bf16); --mode fp16 prefills faster on it")
    if args.mode == "int4" and any(m.in_features % args.group for m in reference.modules() if isinstance(m, nn.Linear)):
        print(f"note: layers whose input width is not a multiple of --group {args.group} stay int8")
    quantized = quantize_model(copy.deepcopy(reference), args.mode, parts, args.group, args.outlier_threshold).eval()
    before, after = part_bytes(reference), part_bytes(quantized)
    print(f"{args.mode} ({args.parts}) of {args.checkpoint} (stage {cfg.stage})\n\n| part | before | after | ratio |\n"
          f"|---|---|---|---|")
    for part in before:
        print(f"| {part} | {before[part] / 1e6:.2f} MB | {after[part] / 1e6:.2f} MB | {before[part] / after[part]:.2f}x |")
    print(f"| all | {sum(before.values()) / 1e6:.2f} MB | {sum(after.values()) / 1e6:.2f} MB | "
          f"{sum(before.values()) / sum(after.values()):.2f}x |")
    tok = train.build_tokenizer(cfg)
    val = {k: ds for k, (ds, _) in train.make_datasets(cfg, reference, tok, "val", args.eval_samples, "cpu").items()}
    batches = [b for ds in val.values() for j in range(0, len(ds), 32)
               if (b := data.collate([ds[i] for i in range(j, min(j + 32, len(ds)))], tok.eos_id)) is not None]
    print("\nquality against the unquantized model (held-out, teacher-forced, answer positions):")
    for k, v in logit_agreement(reference, quantized, batches).items():
        print(f"  {k}: {v:.4f}")
    print("\nheld-out task metrics, unquantized -> quantized:")
    ref_metrics = evaluation.evaluate(reference, tok, val, cfg.stage, "cpu")["metrics"]
    q_metrics = evaluation.evaluate(quantized, tok, val, cfg.stage, "cpu")["metrics"]
    for task, row in ref_metrics.items():
        print(f"  {task:<12} " + "  ".join(f"{k} {v:.3f} -> {q_metrics[task][k]:.3f}" for k, v in row.items()
                                            if k not in ("n", "skipped")))
    if args.out:
        path = save_quantized(quantized, args.out, cfg.stage, cfg.image_size, dataclasses.asdict(cfg), tok.to_str())
        print(f"\nwrote {path}; ask it with: python tinyvlm.py --quantized {path} --image scene.png \"...\"")


if __name__ == "__main__":
    cli.run(main)
