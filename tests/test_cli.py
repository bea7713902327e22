"""`python tinyvlm.py --image ...`: on a real photo, with boxes drawn, the attention picture and int8, and the
clear errors for a corrupt image and an unknown task identifier."""

import pytest
import torch
from PIL import Image

import chat
import cli
import tinyvlm as tv
import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    train.train(train.TrainConfig(stage=1, out_dir=str(out), max_iters=2, train_scenes=32, eval_samples=2, batch_size=4))
    return out / "stage1" / "model.safetensors"


def test_real_photo_with_drawing_attention_and_int8(checkpoint, tmp_path, capsys):
    from skimage import data as photos
    Image.fromarray(photos.chelsea()).save(tmp_path / "cat.jpg")
    chat.main(["--image", str(tmp_path / "cat.jpg"), "--checkpoint", str(checkpoint), "--max-new-tokens", "8",
             "--draw", str(tmp_path / "boxes.png"), "--attention", str(tmp_path / "attention.png"), "--quantize", "int8"])
    out = capsys.readouterr()
    assert out.out.strip() and "wrote" in out.err
    assert Image.open(tmp_path / "boxes.png").size == (451, 300)
    assert Image.open(tmp_path / "attention.png").size[0] > 300


def test_qformer_attention_is_a_distribution():
    model = tv.TinyVLM.from_preset("tiny").eval()
    attn = chat.qformer_attention(model, torch.randn(2, 3, 64, 64))
    num_patches = (64 // model.cfg.vit.patch_size) ** 2
    assert attn.shape == (2, 16, num_patches + 1) and torch.allclose(attn.sum(-1), torch.ones(2, 16), atol=1e-5)


def test_corrupt_image_and_unknown_task_are_clear_errors(checkpoint, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(SystemExit) as e:
        cli.run(chat.main, ["--image", str(tmp_path / "broken.jpg"), "--checkpoint", str(checkpoint), "what is it?"])
    assert e.value.code == 2 and "broken.jpg: cannot read image" in capsys.readouterr().err
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    with pytest.raises(SystemExit) as e:
        cli.run(chat.main, ["--image", str(tmp_path / "ok.png"), "--checkpoint", str(checkpoint), "--task", "[vqaa]", "q"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'[vqaa]'" in err and "[detection]" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("mode", ["int8", "int4", "fp16"])
def test_saved_quantized_model_answers_in_a_fresh_process(checkpoint, tmp_path, mode):
    """As a user runs it: a file saved by quantize.py, then `python tinyvlm.py --quantized FILE --device cpu` in a
    process of its own, so a crash in a kernel is a failed test with its exit code, not a dead test runner."""
    import subprocess
    import sys
    from pathlib import Path
    import quantize
    cfg = train.resolve(train.TrainConfig(stage=1, init=str(checkpoint)))
    model, _ = train.build_model(cfg, torch.device("cpu"))
    path = quantize.save_quantized(quantize.quantize_model(model.eval(), mode, quantize.PARTS, group=64),
                                   tmp_path / f"{mode}.safetensors", stage=1, image_size=cfg.image_size)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "red.png")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "tinyvlm.py"), "--quantized", str(path), "--device", "cpu",
                           "--image", str(tmp_path / "red.png"), "--max-new-tokens", "6"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip()
