"""quantize.py: error bounds per kernel against fp32, agreement of the fast and reference paths, save / load
without building the full-precision model, and quality of a quantized tiny model on held-out text."""

import pytest
import torch

import data
import quantize as q
import tinyvlm as tv
import train


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(512, 384)


def test_int8_error_and_paths_agree(linear, monkeypatch):
    monkeypatch.setattr(tv.WidenedLinear, "BLOCK_NUMEL", 512 * 100)     # 4 blocks of output rows
    layer = q.Int8Linear.from_linear(linear)
    x1, x64 = torch.randn(1, 512), torch.randn(64, 512)
    ref1, ref64 = linear(x1).detach(), linear(x64).detach()
    layer.path = "reference"
    assert rel_err(layer(x1), ref1) < 1e-2 and rel_err(layer(x64), ref64) < 1e-2
    reference1, reference64 = layer(x1), layer(x64)
    layer.path = "auto"
    assert rel_err(layer(x1), reference1) < 1e-2          # decode kernel (bf16 activations)
    assert rel_err(layer(x64), reference64) < 1e-6        # many rows on a CPU: the reference, block by block
    assert rel_err(layer.forward_prefill(x64) + layer.bias, reference64) < 2e-2   # int8 x int8 (activations too)
    print(f"int8: reference {rel_err(reference1, ref1):.1e}, decode kernel {q.FAST_INT8}, int_mm {q.FAST_INT_MM}")


def test_llm_int8_outlier_columns_stay_accurate(linear):
    layer = q.Int8Linear.from_linear(linear, outlier_threshold=6.0)
    x = torch.randn(64, 512)
    x[:, 7] = 60.0                                       # one outlier feature, as large transformers grow them
    ref = linear(x).detach()
    with_split = rel_err(layer.forward_prefill(x) + layer.bias, ref)     # the int8 x int8 path (GPUs take it)
    layer.outlier_threshold = float("inf")               # no split: the outlier crushes every token's scale
    without = rel_err(layer.forward_prefill(x) + layer.bias, ref)
    assert with_split < 2e-2 and without > 2 * with_split, (with_split, without)


def test_int4_error_and_paths_agree(linear):
    layer = q.Int4Linear.from_linear(linear, group=128)
    x = torch.randn(3, 512)
    ref = linear(x).detach()
    layer.path = "reference"
    reference = layer(x)
    assert rel_err(reference, ref) < 1.5e-1
    layer.path = "auto"
    assert rel_err(layer(x), reference) < 1e-2
    codes = layer.codes()
    assert codes.max() <= 15 and torch.equal(q.quantize_int4(linear.weight.detach(), 128)[0], codes)


def test_fp16_matches_its_reference(linear):
    layer = q.Fp16Linear.from_linear(linear)
    x1, x40 = torch.randn(1, 512), torch.randn(40, 512)
    layer.path = "reference"
    reference1, reference40 = layer(x1), layer(x40)
    assert rel_err(reference40, linear(x40).detach()) < 1e-3          # fp16 weights: ~1e-4 relative
    layer.path = "auto"
    assert layer(x1).dtype == torch.float32 and layer(x40.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(layer(x1), reference1, rtol=1e-5, atol=1e-5)     # the FBGEMM kernel: fp32 sums
    torch.testing.assert_close(layer(x40), reference40, rtol=1e-5, atol=1e-5)
    print(f"fp16: kernel {q.FAST_FP16}")
    too_big = torch.nn.Linear(4, 4)
    with torch.no_grad():
        too_big.weight[0, 0] = 1e5
    with pytest.raises(ValueError, match="fp16's range"):
        q.Fp16Linear.from_linear(too_big)


@pytest.fixture(scope="module")
def stage0_model():
    """The shipped tiny backbones (a trained LM), so that quality is measured on a model that knows something."""
    model = tv.TinyVLM(train.model_config(train.TrainConfig()))
    tv.load_checkpoint(model, train.STAGE0)
    return model.eval()


def text_loss(model, n=64):
    tok = data.shapes_tokenizer()
    lines = data.ShapesWorld().text_corpus("test", n // 4)
    with torch.no_grad():
        return float(train.lm_loss(model.phi, [[tok.bos_id] + tok.encode(l) + [tok.eos_id] for l in lines], tok.eos_id, "cpu"))


@pytest.mark.parametrize("mode", ["int8", "int4", "fp16"])
def test_quantized_model_quality_and_round_trip(stage0_model, tmp_path, mode):
    import copy
    base = text_loss(stage0_model)
    model = q.quantize_model(copy.deepcopy(stage0_model), mode, parts=("phi", "vit", "qformer", "projections"), group=64)
    quant = text_loss(model)
    print(f"{mode}: held-out text loss {base:.4f} -> {quant:.4f}")
    assert abs(quant - base) < {"fp16": 1e-3, "int8": 0.02, "int4": 0.1}[mode]
    before, after = q.part_bytes(stage0_model), q.part_bytes(model)
    assert after["phi"] < before["phi"] / {"fp16": 1.9, "int8": 3, "int4": 4}[mode]
    path = q.save_quantized(model, tmp_path / f"{mode}.safetensors")
    loaded = q.load_quantized(path)
    assert loaded.trained_for == {"stage": 4, "image_size": 64} and loaded.quantization["mode"] == mode
    ids = torch.randint(0, 600, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.phi(ids), loaded.phi(ids))
        px = torch.randn(1, 3, 64, 64)
        assert torch.equal(model.encode_image(px), loaded.encode_image(px))


def test_load_quantized_rejects_other_files(tmp_path):
    model = tv.TinyVLM.from_preset("tiny")
    path = tv.save_checkpoint(model, tmp_path / "plain.safetensors")
    with pytest.raises(tv.CheckpointError, match="not a quantized"):
        q.load_quantized(path)
