"""quantize.py: error bounds per kernel against fp32, agreement of the fast and reference paths, save / load
without building the full-precision model, and quality of a quantized tiny model on held-out answers."""

from pathlib import Path

import pytest
import torch

import data
import quantize as q
import tinyvlm as tv
import weights
import train


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(512, 384)


def test_int8_error_and_paths_agree(linear, monkeypatch):
    monkeypatch.setattr(weights.WidenedLinear, "BLOCK_NUMEL", 512 * 100)     # 4 blocks of output rows
    layer = q.Int8Linear.from_linear(linear)
    x1, x64 = torch.randn(1, 512), torch.randn(64, 512)
    ref1, ref64 = linear(x1).detach(), linear(x64).detach()
    layer.path = "reference"
    assert rel_err(layer(x1), ref1) < 1e-2 and rel_err(layer(x64), ref64) < 1e-2
    reference1, reference64 = layer(x1), layer(x64)
    layer.path = "auto"
    w8a8 = layer.forward_w8a8_reference(x1)
    assert rel_err(w8a8, reference1) < 2e-2               # one row: the activations quantized too, 7 bits
    if q.FAST_INT8_DYNAMIC:
        assert rel_err(layer(x1), w8a8) < 1e-5            # FBGEMM computes exactly what the reference spells out
    monkeypatch.setattr(q.Int8Linear, "DECODE_ACTIVATIONS", "bf16")
    assert rel_err(layer(x1), reference1) < 1e-2          # the weight-only kernel (bf16 activations)
    assert rel_err(layer(x64[:5]), reference64[:5]) < 1e-2    # and below 64 rows in any case
    monkeypatch.setattr(weights, "NATIVE_BF16", False)
    assert rel_err(layer(x64), reference64) < 1e-6        # many rows on a CPU: the reference, block by block
    monkeypatch.setattr(weights, "NATIVE_BF16", True)     # with bf16 instructions: codes in bf16 (exact), x rounded
    assert 0 < rel_err(layer(x64), reference64) < 5e-3
    assert rel_err(layer.forward_prefill(x64) + layer.bias, reference64) < 2e-2   # int8 x int8 (activations too)
    print(f"int8: reference {rel_err(reference1, ref1):.1e}, decode kernels {q.FAST_INT8_DYNAMIC} {q.FAST_INT8}, "
          f"int_mm {q.FAST_INT_MM}")


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


@pytest.mark.parametrize("fastest", ["mv", "linear", "packed"])
def test_bf16_matches_its_reference(linear, monkeypatch, fastest):
    """bf16 products summed in fp32, the output rounded to bf16 once. One row through the kernel this CPU streams
    fastest (each simulated: torch.mv, F.linear, oneDNN's packed layout, which then serves every row count); many
    rows otherwise through F.linear in bf16 on a CPU with bf16 instructions, widened to fp32 elsewhere (both kinds
    of CPU simulated too); each path is counted, as the numbers alone cannot tell them apart."""
    if fastest == "packed" and not weights.PACKED_BF16:
        pytest.skip("oneDNN's packed bf16 kernel needs bf16 instructions (avx512_bf16, AMX) and torch's mkldnn ops")
    monkeypatch.setattr(weights, "BF16_ROW_SECONDS", {name: 1.0 + (name != fastest) for name in ("mv", "linear",
                                                                                                   "packed")})
    x1, x40 = torch.randn(1, 512).bfloat16(), torch.randn(40, 512).bfloat16()
    reference = q.Bf16Linear.from_linear(linear)
    reference.path = "reference"
    reference1, reference40 = reference(x1.float()), reference(x40.float())   # fp32 sums of the same bf16 operands
    assert rel_err(reference40, linear(x40.float()).detach()) < 1e-2     # bf16 weights: ~3e-3 relative
    calls = []
    count = lambda name, fn: lambda *a: calls.append(name) or fn(*a)
    monkeypatch.setattr(weights, "bf16_matrix_vector", count("matrix_vector", weights.bf16_matrix_vector))
    monkeypatch.setattr(weights, "packed_bf16_product", count("packed", weights.packed_bf16_product))
    monkeypatch.setattr(weights.WidenedLinear, "apply", count("widened", weights.WidenedLinear.apply))
    for native in (True, False) if fastest != "packed" else (True,):
        monkeypatch.setattr(weights, "NATIVE_BF16", native)
        layer = q.Bf16Linear.from_linear(linear)
        one_row = {"mv": ["matrix_vector"], "linear": [], "packed": ["packed"]}[fastest]   # F.linear: not counted
        many_rows = ["packed"] if fastest == "packed" else [] if native else ["widened"]
        for x, reference, path in ((x1, reference1, one_row), (x40, reference40, many_rows)):
            calls.clear()
            y = layer(x)
            assert calls == path
            assert y.dtype == torch.bfloat16 and layer(x.float()).dtype == torch.float32
            torch.testing.assert_close(y.float(), reference, rtol=2 ** -7, atol=1e-3)      # one bf16 rounding


@pytest.mark.parametrize("fastest", ["packed", "linear"])
def test_a_loaded_bf16_model_is_packed_where_that_is_faster(monkeypatch, fastest):
    """pack_bf16_layers, as chat.py loads public weights in bf16: where oneDNN's packed layout is this CPU's fastest
    one-row kernel (each case simulated), every bf16 Linear of the towers, LoRA merged into it, holds its weight
    packed alone (the plain weight let go: no copy is left), the trained fp32 connector stays as it was, and the
    model encodes an image, prefills and decodes as close to fp32 sums of the same bf16 weights (LoRA unmerged) as
    before; elsewhere nothing changes."""
    import copy
    import gc
    import weakref
    if fastest == "packed" and not weights.PACKED_BF16:
        pytest.skip("oneDNN's packed bf16 kernel needs bf16 instructions (avx512_bf16, AMX) and torch's mkldnn ops")
    monkeypatch.setattr(weights, "BF16_ROW_SECONDS", {name: 1.0 + (name != fastest) for name in ("mv", "linear",
                                                                                                   "packed")})
    torch.manual_seed(0)
    model = tv.TinyVLM(tv.PRESETS["tiny"]())             # as weights.load_tinyvlm(dtype=bf16) leaves a model:
    for tower in (model.vit, model.qformer, model.phi):  # the towers bf16, LoRA's adapters and the connector fp32
        tower.bfloat16()
    for lora in tv.lora_layers(model):
        lora.lora_A.data, lora.lora_B.data = lora.lora_A.float(), torch.randn_like(lora.lora_B.float()) * 0.02
    del lora                                             # (no name here may hold a layer: its weight must go)
    fp32 = copy.deepcopy(model).float().eval()           # the same bf16-rounded weights, every sum in fp32
    weights.multiply_in_fp32_on_cpu(model).eval()
    plain = [m for name, m in model.named_modules() if isinstance(m, weights.CPUHalfLinear) and name.split(".")[0]
             in ("vit", "qformer", "phi")]
    assert len(plain) > 40 and len(tv.lora_layers(model)) == 8             # LoRA on Phi's 4 qkv and dense
    pixels, ids = torch.randn(1, 3, 64, 64), torch.randint(0, 600, (1, 12))

    def answer(model, dtype):                            # image features, then the logits of a prefill and a decode
        with torch.inference_mode():
            image = model.encode_image(pixels.to(dtype))
            cache = tv.KVCache(model.phi.cfg, 1, 29, "cpu", dtype)          # 16 image tokens, 12 ids, 1 more
            x = torch.cat((image.to(dtype), model.embed(ids, None)), 1)
            first = tv.prefill(model.phi, x, torch.ones(1, 28, dtype=torch.long), cache)
            second = tv.decode_one_token(model.phi, first.argmax(-1), torch.ones(1, 29, dtype=torch.long), cache)
        return image.float(), first.float(), second.float()

    exact, before = answer(fp32, torch.float32), answer(model, torch.bfloat16)
    let_go = [weakref.ref(m.weight) for m in plain]
    del plain
    packed = q.pack_bf16_layers(model)
    gc.collect()
    layers = [m for m in model.modules() if isinstance(m, q.Bf16Linear)]
    if fastest != "packed":
        assert packed == 0 and not layers and all(w() is not None for w in let_go)
        return
    assert packed == len(let_go) == len(layers) and all(w() is None for w in let_go)
    assert all(m.weight is None and m._packed is not None for m in layers) and not tv.lora_layers(model)
    assert type(model.llama_proj) is weights.CPUHalfLinear and model.llama_proj.weight.dtype == torch.float32
    for after, plain_bf16, fp32_sums in zip(answer(model, torch.bfloat16), before, exact):
        print(f"relative error against fp32 sums: packed {rel_err(after, fp32_sums):.2e}, "
              f"plain {rel_err(plain_bf16, fp32_sums):.2e}")
        assert rel_err(after, fp32_sums) < 1.5 * rel_err(plain_bf16, fp32_sums) < 3e-2   # bf16 roundings alike
    with pytest.raises(RuntimeError, match="packed layout"):
        layers[0].forward_reference(torch.randn(1, layers[0].in_features))


def test_bf16_row_kernels_are_timed_once_and_the_fastest_taken(monkeypatch):
    """The one-row kernels are timed on this CPU (every one usable here gets a time) and the fastest among the
    candidates a layer can take is chosen; the timing runs once per process."""
    monkeypatch.setattr(weights, "BF16_ROW_SECONDS", None)
    timings = []
    time_them = weights.time_bf16_row_kernels
    monkeypatch.setattr(weights, "time_bf16_row_kernels", lambda: timings.append(1) or time_them(rounds=1))
    kernel = weights.bf16_row_kernel()
    seconds = weights.BF16_ROW_SECONDS
    assert set(seconds) == {"mv", "linear"} | ({"packed"} if weights.PACKED_BF16 else set())
    assert all(0 < t < 10 for t in seconds.values())
    assert kernel == min(seconds, key=seconds.get)
    assert weights.bf16_row_kernel(("mv", "linear")) == min(("mv", "linear"), key=seconds.get)
    assert timings == [1]
    print(f"bf16 one-row kernels on this CPU (ms): { {k: round(1e3 * t, 2) for k, t in seconds.items()} }")


@pytest.fixture(scope="module")
def stage0_model():
    """The shipped tiny backbones (a trained LM), so that quality is measured on a model that knows something."""
    model = tv.TinyVLM(train.model_config(train.TrainConfig()))
    weights.load_checkpoint(model, train.STAGE0)
    return model.eval()


def answer_loss(model, n=16):
    """The held-out answer loss of stage 0's curriculum (scenes written out in text, then the tasks about them):
    what the shipped LM was trained on, and knows (0.67 against a random LM's 6.6; 0.16 after the curriculum, before
    the question drill, which trains on scenes in the image slots only). Its loss on other text is near chance: it
    learnt the answers only, so that text would not show what quantizing costs."""
    items = data.ShapesWorld().curriculum("val", n)
    with torch.no_grad():
        return float(train.curriculum_batch(model, None, items, data.shapes_tokenizer(), "cpu"))


@pytest.fixture(scope="module")
def base_answer_loss(stage0_model):
    return answer_loss(stage0_model)          # 2.5 s: one forward of 16 long lessons


@pytest.mark.parametrize("mode", ["int8", "int4", "fp16"])
def test_pack_weights_makes_the_first_uses_copies_now(stage0_model, mode):
    """quantize.pack_weights packs every quantized layer of the language model for its CPU kernel (FBGEMM's int8
    layout for decoding; the int4 and fp16 kernels' own), several at a time, so that no product pays for it later;
    the products then read those copies, and give what packing at first use gives."""
    import copy
    fast = {"int8": q.FAST_INT8_DYNAMIC, "int4": q.FAST_INT4, "fp16": q.FAST_FP16}[mode]
    if not fast:
        pytest.skip(f"this torch has no {mode} CPU kernel")
    lazy, eager = (q.quantize_model(copy.deepcopy(stage0_model), mode, parts=("phi", "projections"), group=64)
                   for _ in range(2))
    kind = q.Int8Linear if mode == "int8" else q.PackedLinear
    copy_of = (lambda m: m._w8a8) if mode == "int8" else (lambda m: m._packed)
    in_phi = [m for m in eager.phi.modules() if isinstance(m, kind)]
    assert q.pack_weights(eager.phi) == len(in_phi) > 0
    packed = [copy_of(m) for m in in_phi]
    assert all(p is not None for p in packed)
    assert all(copy_of(m) is None for m in eager.modules() if isinstance(m, kind) and m not in in_phi)
    assert q.pack_weights(eager.phi) == 0                                 # once
    ids = torch.randint(0, 600, (1, 12))
    with torch.no_grad():
        tokens = [tv.generate(model.phi, ids, max_new_tokens=4) for model in (lazy, eager)]
    assert tokens[0] == tokens[1] and all(copy_of(m) is p for m, p in zip(in_phi, packed))


@pytest.mark.parametrize("mode", ["int8", "int4", "fp16", "bf16"])
def test_quantized_model_quality_and_round_trip(stage0_model, base_answer_loss, tmp_path, mode):
    import copy
    base = base_answer_loss
    model = q.quantize_model(copy.deepcopy(stage0_model), mode, parts=("phi", "vit", "qformer", "projections"), group=64)
    quant = answer_loss(model)
    print(f"{mode}: held-out answer loss {base:.4f} -> {quant:.4f}")
    assert base < 1.0                                          # a model that knows its answers
    assert abs(quant - base) < {"fp16": 1e-4, "bf16": 2e-3, "int8": 0.01, "int4": 0.02}[mode]   # 0, 1e-5, 2e-4, 1.4e-3
    before, after = q.part_bytes(stage0_model), q.part_bytes(model)
    assert after["phi"] < before["phi"] / {"fp16": 1.9, "bf16": 1.9, "int8": 3, "int4": 4}[mode]
    tokenizer = data.shapes_tokenizer().to_str()              # the file carries its tokenizer: it is the whole model
    path = q.save_quantized(model, tmp_path / f"{mode}.safetensors", tokenizer=tokenizer)
    loaded = q.load_quantized(path)
    assert loaded.trained_for == {"stage": 4, "image_size": 64, "train_config": None, "tokenizer": tokenizer}
    assert loaded.quantization["mode"] == mode
    ids = torch.randint(0, 600, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.phi(ids), loaded.phi(ids))
        px = torch.randn(1, 3, 64, 64)
        assert torch.equal(model.encode_image(px), loaded.encode_image(px))


@pytest.mark.parametrize("mode, group, bound", [("int8", 128, 0.02), ("int4", 32, 0.15), ("fp16", 128, 0.01),
                                                ("bf16", 128, 0.01)])
def test_quantized_projections_take_the_image_features_as_they_are(stage0_model, mode, group, bound):
    """The projections alone quantized: what the LM reads as the image stays near the fp32 model's. Their .weight
    then holds integer codes; casting the Q-Former's features to its dtype (as for a bf16 layer) truncated them to
    integers, and the projected image was noise (relative error 1.0 in int8, 61 in int4: [vqa] 0.80 -> 0.25)."""
    import copy
    torch.manual_seed(0)
    features = torch.randn(4, stage0_model.cfg.num_image_tokens, stage0_model.cfg.qformer.hidden)
    model = q.quantize_model(copy.deepcopy(stage0_model), mode, parts=("projections",), group=group)
    assert not isinstance(model.llama_proj, torch.nn.Linear)
    with torch.no_grad():
        error = rel_err(model.connect(features).float(), stage0_model.connect(features))
    print(f"{mode} projections (group {group}): relative error of the image tokens {error:.4f}")
    assert error < bound


def test_imp_style_int4_of_the_whole_model(stage0_model, base_answer_loss, tmp_path):
    """--parts all: every Linear and the token embeddings in int4 groups of 32 (Imp's phone recipe); an embedding
    lookup gives the dequantized rows, the answer loss stays near, and the file round-trips exactly."""
    import copy
    emb = stage0_model.phi.embed_tokens
    packed = q.Int4Embedding.from_embedding(emb, 32)
    ids = torch.randint(0, emb.num_embeddings, (3, 7))
    want = q.dequantize_int4(torch.stack((packed.weight & 15, packed.weight >> 4), -1).view(emb.weight.shape),
                             packed.scales, packed.minima, 32)[ids]
    assert torch.equal(packed(ids), want) and rel_err(packed(ids), emb(ids)) < 0.1
    model = q.quantize_model(copy.deepcopy(stage0_model), "int4", q.ALL_PARTS, group=32)
    assert isinstance(model.phi.embed_tokens, q.Int4Embedding)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())            # every Linear replaced
    base, quant = base_answer_loss, answer_loss(model)
    print(f"int4 whole model (group 32): held-out answer loss {base:.4f} -> {quant:.4f}")
    assert abs(quant - base) < 0.02                            # 5e-4 measured
    path = q.save_quantized(model, tmp_path / "all.safetensors")
    loaded = q.load_quantized(path)
    with torch.no_grad():
        assert torch.equal(model.phi(ids), loaded.phi(ids))
    with pytest.raises(ValueError, match="embeddings part is quantized to int4 only"):
        q.quantize_model(copy.deepcopy(stage0_model), "int8", ("embeddings",))


def test_before_stage_4_has_run_quantize_takes_the_shipped_model(tmp_path, monkeypatch, capsys):
    """A fresh clone (no out/stage4): `python quantize.py --mode int8 --out F` quantizes the shipped stage-4 model,
    as tinyvlm.py asks it, and says so."""
    monkeypatch.chdir(tmp_path)
    q.main(["--mode", "int8", "--eval-samples", "2", "--out", "int8.safetensors"])
    out = capsys.readouterr().out
    assert "quantizing the shipped stage-4 model" in out and "(stage 4)" in out
    assert q.load_quantized(tmp_path / "int8.safetensors").phi.layers[0].mlp.fc1.weight.dtype == torch.int8


def test_load_quantized_rejects_other_files(tmp_path):
    model = tv.TinyVLM.from_preset("tiny")
    path = weights.save_checkpoint(model, tmp_path / "plain.safetensors")
    with pytest.raises(weights.CheckpointError, match="not a quantized"):
        q.load_quantized(path)


# ------------------------------------------------------------------------------------------- packed CPU kernels
# _weight_int8pack_mm's AVX2 / AVX-512 code uses aligned vector loads: it died with SIGSEGV on int8 weights
# memory-mapped from a safetensors file (8-byte aligned) and on misaligned bf16 activations. The probe below hands
# every packed path tensors that start off a 64-byte boundary and end against a page that may not be read, through
# load_quantized itself, in a child process: a crash is then a failed test, not a dead test runner. On a CPU whose
# kernels never fault, the property test after it still checks what the layers hold.

def guarded(t: torch.Tensor, misalign: int) -> torch.Tensor:
    """A copy of t in an anonymous map, starting `misalign` bytes past a 64-byte boundary, its end as close as that
    allows (under 64 bytes) to a PROT_NONE page: a kernel that reads before alignment or past the end faults."""
    import ctypes
    import mmap
    n = t.numel() * t.element_size()
    pages = (n + 128) // mmap.PAGESIZE + 1
    buf = mmap.mmap(-1, (pages + 1) * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(base + pages * mmap.PAGESIZE), mmap.PAGESIZE, 0) == 0   # PROT_NONE
    end = pages * mmap.PAGESIZE
    start = (end - n) // 64 * 64 + misalign
    if start + n > end:
        start -= 64
    out = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=start).view(t.dtype).view(t.shape)
    out.copy_(t)
    guarded.keep.append(buf)            # the map must outlive the tensor
    return out


guarded.keep = []


def probe(mode: str, path: str) -> None:
    """Load `path` with every tensor misaligned against a guard page, then run each quantized layer with 1..16
    rows of misaligned activations, and the whole language model. Prints each case before running it."""
    import itertools
    real = weights.read_weights
    weights.read_weights = lambda p: {k: guarded(t, 8 + 16 * (i % 3)) for i, (k, t) in enumerate(real(p).items())}
    model = q.load_quantized(path).eval()
    layers = [m for m in model.modules() if isinstance(m, (q.Int8Linear, q.PackedLinear))]   # int4, fp16, bf16 too
    kinds = {type(m).__name__: m for m in layers}
    with torch.no_grad():
        for (name, layer), rows, misalign in itertools.product(kinds.items(), range(1, 17), (8, 24, 40)):
            print(f"{mode} {name} rows={rows} misalign={misalign}", flush=True)
            for dtype in (torch.float32, torch.bfloat16):
                layer(guarded(torch.randn(rows, layer.in_features).to(dtype), misalign))
        print(f"{mode} whole language model", flush=True)
        model.phi(torch.randint(0, model.cfg.phi.vocab_size, (2, 9)))
    print("PROBE-OK", flush=True)


@pytest.fixture(scope="module")
def quantized_files(stage0_model, tmp_path_factory):
    import copy
    d = tmp_path_factory.mktemp("quantized")
    return {mode: q.save_quantized(q.quantize_model(copy.deepcopy(stage0_model), mode, parts=q.PARTS, group=64),
                                   d / f"{mode}.safetensors") for mode in q.MODES}


@pytest.fixture(scope="module")
def probes(quantized_files, command_lines):
    """{mode: its probe's run}: each in a process of its own, so that a crash in a kernel is that mode's failed test
    with its exit code, not a dead test runner."""
    root = Path(__file__).resolve().parents[1]
    modes = list(quantized_files)
    runs = command_lines.run_all([("tests/test_quantize.py", [mode, str(quantized_files[mode])]) for mode in modes],
                                 root)
    return dict(zip(modes, runs))


@pytest.mark.parametrize("mode", q.MODES)
def test_packed_kernels_survive_misaligned_tensors_at_a_guard_page(probes, mode):
    proc = probes[mode]
    last = (proc.stdout.strip().splitlines() or ["(nothing)"])[-1]
    assert proc.returncode == 0 and last == "PROBE-OK", \
        f"exit {proc.returncode} at: {last}\n{proc.stderr[-2000:]}"


def test_layers_hold_aligned_weights_after_loading(quantized_files, tmp_path, monkeypatch):
    """What the int8 kernel is handed: aligned, whatever the file's layout. Our own files are laid out so that the
    weights stay memory-mapped (no copy, no extra memory); a file written by safetensors' own writer is not, and
    its weights are copied once, at load."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    read = weights.read_weights
    mapped = {}

    def spy(path):                          # remember where the reader mapped each tensor
        tensors = read(path)
        mapped[Path(path).name] = {k: t.data_ptr() for k, t in tensors.items()}
        return tensors

    monkeypatch.setattr(weights, "read_weights", spy)
    ours = q.load_quantized(quantized_files["int8"])
    int8 = {n: m for n, m in ours.named_modules() if isinstance(m, q.Int8Linear)}
    assert int8 and all(m.weight.data_ptr() % weights.ALIGNMENT == 0 and m.weight.is_contiguous() for m in int8.values())
    assert all(m.weight.data_ptr() == mapped["int8.safetensors"][n + ".weight"] for n, m in int8.items())  # no copy
    # safetensors' own layout leaves tensors 8-byte aligned: load_quantized copies those into aligned memory
    with safe_open(str(quantized_files["int8"]), "pt") as f:
        meta = f.metadata()
    other = tmp_path / "their-layout.safetensors"
    for pad in range(64):        # the library aligns its data to 8 bytes only: lengthen the header until it shows
        save_file({k: v.contiguous() for k, v in read(quantized_files["int8"]).items()}, other,
                  metadata={**meta, "pad": "x" * pad})
        if any(t.data_ptr() % weights.ALIGNMENT for t in read(other).values() if t.dtype == torch.int8):
            break
    else:
        raise AssertionError("no header length left an int8 weight unaligned")
    theirs = q.load_quantized(other)
    assert all(m.weight.data_ptr() % weights.ALIGNMENT == 0 for m in theirs.modules() if isinstance(m, q.Int8Linear))
    ids = torch.randint(0, 600, (1, 7))
    with torch.no_grad():
        assert torch.equal(ours.phi(ids), theirs.phi(ids))


def test_aligned_returns_aligned_tensors_and_copies_only_when_needed():
    t = torch.randn(100)
    assert q.aligned(t) is t
    off = torch.randn(101)[1:]                       # 4 bytes past an aligned start
    a = q.aligned(off)
    assert a.data_ptr() % weights.ALIGNMENT == 0 and torch.equal(a, off) and a.data_ptr() != off.data_ptr()
    strided = torch.randn(8, 8).t()
    assert q.aligned(strided).is_contiguous() and torch.equal(q.aligned(strided), strided)


if __name__ == "__main__":          # the child process of the guard-page test
    import sys
    probe(sys.argv[1], sys.argv[2])
