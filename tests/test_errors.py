"""A user's mistakes, through the real command lines, each in a process of its own (tests/cli_processes.py): each
ends in exit code 2 and one line on stderr that names the flag or file, with no traceback, and leaves the files of
an earlier run untouched."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import quantize
import train
import weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A working folder holding out/stage1 (a short trained run: the files that must survive), a stage-3 model,
    and every kind of bad file a user might hand over."""
    d = tmp_path_factory.mktemp("mistakes")
    short = dict(max_iters=2, train_scenes=16, eval_samples=2, batch_size=4, log_interval=1)
    train.train(train.TrainConfig(stage=1, out_dir=str(d / "out"), **short))
    stage1 = d / "out" / "stage1" / "model.safetensors"
    train.train(train.TrainConfig(stage=3, out_dir=str(d / "s3"), init=str(stage1), **short))
    train.train(train.TrainConfig(stage=1, out_dir=str(d / "noqk"), qk_norm=False, **short))
    train.train(train.TrainConfig(stage=2, out_dir=str(d / "r8"), init=str(stage1), lora_rank=8, **short))
    data.write_scene(d / "scene.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (d / "zero.safetensors").write_bytes(b"")
    (d / "truncated.safetensors").write_bytes(stage1.read_bytes()[:300])
    tensors, meta = weights.read_weights(stage1), weights.read_metadata(stage1)
    weights.write_safetensors({k: v for k, v in tensors.items() if k != "llama_proj.weight"}, d / "missing.safetensors",
                              meta)
    weights.write_safetensors({**tensors, "llama_proj.bias": tensors["llama_proj.bias"] * float("nan")},
                              d / "nan.safetensors", meta)
    weights.write_safetensors(dict(tensors), d / "nometa.safetensors", {})
    (d / "empty.json").write_text("")
    (d / "emptylist.json").write_text("[]")
    (d / "malformed.json").write_text('[{"image": "a.png", "caption": "x"')
    (d / "nofield.json").write_text('[{"image": "scene.png"}]')
    (d / "ok.json").write_text(json.dumps([{"image": "scene.png", "caption": "a shape"}] * 4))
    (d / "empty_dir").mkdir()
    (d / "mine").mkdir()
    (d / "mine" / "test.json").write_text('{"my": "own test settings"}')
    quantize.main(["--checkpoint", str(stage1), "--out", str(d / "int8.safetensors"), "--eval-samples", "2"])
    return d


# (script, arguments, what the one line must say); {d} is the working folder
QUANTIZED_FOR_ASKING = "{d}/int8.safetensors: a quantized model (quantize.py --out), for asking only"
STATE_NOT_A_MODEL = ("{d}/out/stage1/state.pt: the training state that train.py --resume reads (what the stage "
                     "trained, the optimizer, the data's position), not a model; the model it goes with is "
                     "{d}/out/stage1/model.safetensors")
CASES = [
    ("train.py", ["--max-iter", "5"], "unrecognized arguments: --max-iter"),
    ("train.py", ["--stage", "5"], "argument --stage: 5 is not one of 0, 1, 2, 3, 4"),
    ("train.py", ["--batch-size", "-1"], "argument --batch-size: -1 is below 0"),
    ("train.py", ["--grad-accum", "0"], "argument --grad-accum: 0 is below 1"),
    ("train.py", ["--stage", "2", "--lora-rank", "100000"], "--lora-rank 100000: an adapter's rank is at most the "
     "width of the layers it adapts (192 here"),
    ("train.py", ["--max-iters", "-1"], "argument --max-iters: -1 is below 0"),
    ("train.py", ["--log-interval", "0"], "argument --log-interval: 0 is below 1"),
    ("train.py", ["--min-lr", "nan"], "argument --min-lr: nan is not a finite number"),
    ("train.py", ["--lr", "fast"], "argument --lr: 'fast' is not a number"),
    ("train.py", ["--preset", "huge"], "argument --preset: 'huge' is not one of tinygptv, tiny"),
    ("train.py", ["--dtype", "fp8"], "argument --dtype: 'fp8' is not one of auto"),
    ("train.py", ["--data", "captions:{d}/nothing.json"], "nothing.json: no such data file"),
    ("train.py", ["--data", "captions:{d}/empty.json"], "empty.json: the file is empty"),
    ("train.py", ["--data", "captions:{d}/emptylist.json"], "emptylist.json: holds no records"),
    ("train.py", ["--data", "captions:{d}/malformed.json"], "malformed.json: neither JSON nor JSONL"),
    ("train.py", ["--benchmark", "gqa"], "--benchmark gqa needs the benchmark's question file: --data FILE"),
    ("train.py", ["--recipe", "imp", "--stage", "4", "--out-dir", "{d}/nothing"], "run --recipe imp --stage 1 first"),
    ("train.py", ["--benchmark", "vizwiz", "--data", "{d}/ok.json", "--image-root", "{d}"],
     "ok.json: record 0 has no 'answers' field"),
    ("train.py", ["--data", "captions:{d}/nofield.json"], "nofield.json: record 0 has no 'caption' field"),
    ("train.py", ["--data", "captions:{d}/ok.json:abc"], "the ratio 'abc' is not a number"),
    ("train.py", ["--data", "captions:{d}/ok.json:-1"], "the ratio must be a finite number >= 0"),
    ("train.py", ["--data", "captions:{d}/ok.json:0"], "every ratio is 0"),
    ("train.py", ["--data", "pictures:{d}/ok.json"], "expected FORMAT:PATH[:RATIO]"),
    ("train.py", ["--data", "captions:{d}/ok.json", "--image-root", "{d}/nowhere"], "--image-root {d}/nowhere: no such"),
    ("train.py", ["--val-data", "captions:{d}/ok.json"], "--val-data without --data"),
    ("train.py", ["--resume", "--out-dir", "{d}/empty_dir"], "nothing to resume"),
    ("train.py", ["--out-dir", "/dev/null/out"], "--out-dir /dev/null/out: cannot create this folder"),
    ("train.py", ["--stage", "2", "--init", "{d}/truncated.safetensors"], "not a safetensors file, or truncated"),
    ("train.py", ["--stage", "2", "--init", "{d}/missing.safetensors"], "'llama_proj.weight' is listed in its metadata"),
    ("train.py", ["--stage", "2", "--init", "{d}/nan.safetensors"], "'llama_proj.bias' holds NaN or infinite values"),
    ("train.py", ["--stage", "2", "--init", "{d}/nometa.safetensors"], "not a model.safetensors written by train.py"),
    ("train.py", ["--stage", "2", "--init", "{d}/noqk/stage1/model.safetensors"], "pass --no-qk-norm"),
    ("train.py", ["--stage", "3", "--init", "{d}/r8/stage2/model.safetensors"], "rank 8, but this model has rank 32: "
     "pass --lora-rank 8"),
    ("train.py", ["--stage", "3", "--no-lora", "--init", "{d}/r8/stage2/model.safetensors"], "drop --no-lora"),
    ("train.py", ["--eval-only", "--init", "{d}/nothing.safetensors"], "nothing.safetensors not found"),
    ("train.py", ["--eval-only", "--out-dir", "{d}/empty_dir"], "stage1/model.safetensors not found (pass --init)"),
    ("train.py", ["--stage", "0", "--attention-logits"], "--attention-logits reads a stage's model"),
    ("train.py", ["--stage", "2", "--checkpoint", "{d}/ok.json"], "--checkpoint belongs to a run on the public weights"),
    ("train.py", ["--stage", "0", "--phi", "{d}"], "--stage 0 pretrains the tiny backbones"),
    ("train.py", ["--stage", "1", "--text", "txt:{d}/ok.json"], "--text belongs to --stage 0"),
    ("train.py", ["--stage", "0", "--text", "txt:{d}/nothing.txt"], "nothing.txt: no such file"),
    ("train.py", ["--stage", "0", "--text", "txt:{d}/broken.jpg"], "broken.jpg: not UTF-8 text"),
    ("train.py", ["--stage", "0", "--text", "captions:{d}/emptylist.json"], "emptylist.json: holds no records"),
    ("train.py", ["--stage", "0", "--stage0-phases", "language,drill"],
     "give some of vit,qformer,lookup,language,questions,same_kind"),
    ("train.py", ["--stage", "1", "--stage0-phases", "questions"], "--stage0-phases belongs to --stage 0"),
    ("train.py", ["--stage", "0", "--stage0-phases", "vit,qformer", "--train-scenes", "16"],
     "stage 0 draws batches of 48 different scenes"),
    ("train.py", ["--stage", "0", "--stage0-phases", "questions", "--init", "{d}/nothing.safetensors"],
     "--init {d}/nothing.safetensors: no such file"),
    ("train.py", ["--stage", "0", "--init", "{d}/ok.json"],
     "with vit,qformer,lookup,language,questions,same_kind run, nothing"),
    ("train.py", ["--stage", "0", "--stage0-phases", "same_kind", "--init", "{d}/s3/stage3/model.safetensors"],
     "--init {d}/s3/stage3/model.safetensors: a trained stage's model; stage 0 goes on from stage-0 backbones"),
    ("train.py", ["--stage", "0", "--text", "captions:{d}/ok.json", "--init", "{d}/s3/stage3/model.safetensors"],
     "(OUT_DIR/stage0/model.safetensors, or the shipped assets/stage0.safetensors)"),
    ("train.py", ["--stage", "0", "--train-scenes", "100"],
     "stage 0 draws batches of 128 different scenes"),
    ("data.py", ["--emoji", "{d}/empty_dir"], "emoji.json: not found; unpack the npm package first"),
    ("train.py", ["--image-size", "100"], "--image-size 100: must be a multiple of the ViT's patch size (8)"),
    ("train.py", ["--tokenizer", "{d}/nothing.json"], "--tokenizer {d}/nothing.json: no such file"),
    ("tinyvlm.py", ["what is it?"], "--image is required"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", "{d}/nothing.safetensors", "q"], "no such file"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", "{d}/zero.safetensors", "q"], "not a safetensors file"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", "{d}/truncated.safetensors", "q"], "truncated"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", "{d}/nometa.safetensors", "q"], "not a model.safetensors"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", "{d}/missing.safetensors", "q"], "listed in its metadata"),
    ("tinyvlm.py", ["--image", "{d}/nothing.png", "q"], "nothing.png: no such image file"),
    ("tinyvlm.py", ["--image", "{d}/broken.jpg", "q"], "broken.jpg: cannot read image"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--temperature", "-1", "q"], "argument --temperature: -1.0 is below 0"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--top-p", "2", "q"], "argument --top-p: 2.0 is above 1.0"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--repetition-penalty", "0", "q"], "--repetition-penalty: 0.0 is below"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--max-new-tokens", "0", "q"], "argument --max-new-tokens: 0 is below 1"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", str(ROOT / "assets" / "stage4.safetensors"),
                    "--max-new-tokens", "100000", "q"],
     "do not fit in the model's 512 positions: give --max-new-tokens 477 or less or ask a shorter question"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", str(ROOT / "assets" / "stage4.safetensors"),
                    "--chat", "--max-new-tokens", "100000"],
     "(34 tokens) and --max-new-tokens 100000 do not fit in the model's 512 positions: give --max-new-tokens 478"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--task", "[vqaa]", "q"], "argument --task: '[vqaa]' is not one of [vqa], [caption]"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--draw", "/dev/null/boxes.png", "q"], "--draw /dev/null/boxes.png"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--draw", "{d}/scene.png", "q"], "--draw {d}/scene.png is the picture "
     "asked about (--image): the drawing would replace it"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--attention", "{d}/scene.png", "q"], "--attention {d}/scene.png is the "
     "picture asked about"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "what is <ImageHere>?"], "contains <ImageHere>"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", "{d}/s3/stage3/model.safetensors"], "needs a question"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--out-dir", "{d}/empty_dir", "q"], "no trained model in"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--quantized", "{d}/out/stage1/model.safetensors", "q"],
     "not a quantized tinyvlm checkpoint"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--chat", "q"], "--chat reads the questions from the terminal"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--lm-attention-at", "squre", "what shape is the square?"],
     "--lm-attention-at 'squre': not a word of the question 'what shape is the square?'"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", "{d}/out/stage1/model.safetensors", "--lm-attention-at",
                    "shape", "what shape?"], "--lm-attention-at: a stage-1 model's prompt holds no question"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--lm-attention-at", "shape", "--lm-attention-token", "2",
                    "what shape?"],
     "--lm-attention-at and --lm-attention-token both set"),
    # the stage's training state, beside its model: each command that reads a model says which file to give
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", "{d}/out/stage1/state.pt", "q"], STATE_NOT_A_MODEL),
    ("train.py", ["--stage", "2", "--init", "{d}/out/stage1/state.pt"], STATE_NOT_A_MODEL),
    ("train.py", ["--stage", "1", "--eval-only", "--init", "{d}/out/stage1/state.pt"], STATE_NOT_A_MODEL),
    ("quantize.py", ["--checkpoint", "{d}/out/stage1/state.pt"], STATE_NOT_A_MODEL),
    # quantize.py's output: asked with --quantized; and it never replaces a model train.py wrote
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", "{d}/int8.safetensors", "q"], QUANTIZED_FOR_ASKING),
    ("train.py", ["--stage", "2", "--init", "{d}/int8.safetensors"], QUANTIZED_FOR_ASKING),
    ("quantize.py", ["--checkpoint", "{d}/int8.safetensors"], QUANTIZED_FOR_ASKING),
    ("quantize.py", ["--checkpoint", "{d}/out/stage1/model.safetensors", "--out", "{d}/out/stage1/model.safetensors"],
     "is the model being quantized (--checkpoint): the quantized file would replace it"),
    ("quantize.py", ["--checkpoint", "{d}/s3/stage3/model.safetensors", "--out", "{d}/out/stage1/model.safetensors"],
     "--out {d}/out/stage1/model.safetensors holds a model train.py wrote"),
    ("bench.py", ["--only", "llama.cpp"], "--only llama.cpp needs --llama-cpp PATH"),
    ("bench.py", ["--llama-cpp", "{d}/empty_dir"], "empty_dir/convert_hf_to_gguf.py"),
    ("quantize.py", ["--checkpoint", "{d}/nothing.safetensors"], "nothing.safetensors: not found"),
    ("quantize.py", ["--group", "0"], "argument --group: 0 is not one of 32, 64, 128, 256"),
    ("quantize.py", ["--parts", "brain"], "--parts 'brain'"),
    ("quantize.py", ["--mode", "int3"], "argument --mode: 'int3' is not one of int8, int4, fp16, bf16"),
    ("bench.py", ["--preset", "tiny", "--only", "bandwidth", "--out", "{d}/ok.json"], "--out {d}/ok.json: already "
     "holds something other than a bench report"),
    ("quantize.py", ["--checkpoint", "{d}/out/stage1/model.safetensors", "--out", "{d}/ok.json"],
     "--out {d}/ok.json: already holds something other than a safetensors file"),
    ("train.py", ["--stage", "0", "--backbones", "{d}/ok.json"], "--backbones {d}/ok.json: already holds something"),
    ("tinyvlm.py", ["--image", "{d}/scene.png", "--draw", "{d}/ok.json", "q"], "--draw {d}/ok.json: already holds "
     "something other than a picture"),
    ("data.py", ["--scene", "{d}/malformed.json"], "--scene {d}/malformed.json: already holds something other than a"),
    ("data.py", ["--emoji", "{d}/empty_dir", "--emoji-out", "{d}/mine"], "--emoji-out {d}/mine/test.json: already "
     "holds something other than a captions file"),
    ("data.py", ["--preview", "--out", "{d}/broken.jpg"], "--out {d}/broken.jpg: already holds something other than a"),
    ("quantize.py", ["--checkpoint", "{d}/out/stage1/model.safetensors", "--out", "/dev/null/q.safetensors"],
     "--out /dev/null/q.safetensors"),
    ("data.py", ["--preview", "--stage", "5"], "argument --stage: 5 is not one of 1, 2, 3, 4"),
    ("data.py", [], "nothing to do"),
]
if not torch.cuda.is_available():
    CASES += [("train.py", ["--device", "cuda"], "--device cuda: this torch has no CUDA device here"),
              ("tinyvlm.py", ["--image", "{d}/scene.png", "--device", "cuda", "q"], "no CUDA device")]


def run(place: Path, script: str, args: list[str]) -> subprocess.CompletedProcess:
    argv = [a.replace("{d}", str(place)) for a in args]
    return subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, cwd=place,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def fingerprint(folder: Path) -> dict[str, str]:
    """The content of every file a run leaves (not the lock files)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def test_every_mistake_is_one_line_and_exit_code_2(place, command_lines):
    before = fingerprint(place)
    results = command_lines.run_all([(script, [a.replace("{d}", str(place)) for a in args]) for script, args, _ in CASES],
                                    place)
    problems = []
    for (script, args, expected), proc in zip(CASES, results):
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("note:")]
        expected = expected.replace("{d}", str(place))
        if proc.returncode != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or expected not in lines[0]:
            problems.append(f"{script} {' '.join(args)}: exit {proc.returncode}, stderr: {proc.stderr[-600:]!r}")
    assert not problems, "\n".join(problems)
    assert fingerprint(place) == before              # nothing written, nothing lost


def test_debug_shows_the_traceback(place):
    proc = run(place, "train.py", ["--data", "captions:{d}/empty.json", "--debug"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "the file is empty" in proc.stderr


def test_a_second_run_into_the_same_stage_folder_stops_at_once(place):
    import fcntl
    out = place / "locked"
    out.mkdir()
    with open(out / ".stage1.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242")
        lock.flush()
        proc = run(place, "train.py", ["--out-dir", str(out), "--max-iters", "2"])
    assert proc.returncode == 2 and "is in use by another run (pid 4242)" in proc.stderr
    assert not (out / "stage1").exists()


def test_a_checkpoint_is_built_as_it_was_trained(place):
    """A model trained with --no-qk-norm is asked with QK-norm off: its config comes from its metadata."""
    cfg = train.config_of_checkpoint(place / "noqk" / "stage1" / "model.safetensors")
    model, _ = train.build_model(cfg, torch.device("cpu"))
    assert cfg.qk_norm is False and not hasattr(model.phi.layers[0].self_attn, "q_layernorm")
    proc = run(place, "tinyvlm.py", ["--image", "{d}/scene.png", "--checkpoint", "{d}/noqk/stage1/model.safetensors",
                                     "--max-new-tokens", "4"])
    assert proc.returncode == 0 and "stage 1" in proc.stderr and proc.stdout.strip()


def test_unusable_samples_are_skipped_counted_and_a_hopeless_run_stops(place, capsys):
    """Images that do not exist, text with the image marker and questions longer than the model's 512 positions
    are skipped and counted, in training and in the held-out report; when nothing drawn can be used, the run stops
    with a message instead of drawing forever."""
    good = {"image": "scene.png", "question": "how many shapes are there?", "answer": "4"}
    long = {**good, "question": "tell-me-" * 120}     # 600 tokens in one word (cleaning keeps 50 words): fits 1024, not 512
    records = [good] * 6 + [{**good, "image": "gone.png"}] * 3 + [{**good, "question": "see <ImageHere>"}, long]
    (place / "mixed.json").write_text(json.dumps(records))
    (place / "mixed_val.json").write_text(json.dumps([good, good, long]))
    cfg = train.TrainConfig(stage=4, out_dir=str(place / "mixed"), init=str(place / "s3" / "stage3" / "model.safetensors"),
                            data=f"vqa:{place / 'mixed.json'}", val_data=f"vqa:{place / 'mixed_val.json'}",
                            image_root=str(place), max_iters=4, batch_size=4, eval_samples=2, image_size=64)
    reasons = data.VLMDataset(data.read_vqa(place / "mixed.json", place), data.shapes_tokenizer(), 4, 64, 16,
                              skip_bad=True, max_positions=512)
    for i in (6, 9, 10):
        assert reasons[i] is None
    assert ["no such image file" in reasons.skipped[0], "contains <ImageHere>" in reasons.skipped[1],
            "more than the model's 512 positions" in reasons.skipped[2]] == [True] * 3
    result = train.train(cfg)
    assert result["skipped_images"]["vqa0"] >= 3 and result["metrics"]["[vqa]"] == {**result["metrics"]["[vqa]"],
                                                                                    "n": 2, "skipped": 1}
    out = capsys.readouterr().out
    assert "gone.png: no such image file" in out and "(further ones are counted, not shown)" in out
    (place / "lost.json").write_text(json.dumps([{**good, "image": "gone.png"}] * 8))
    with pytest.raises(data.DataError, match="none of the last .* samples drawn could be used .*--image-root"):
        train.train(dataclasses.replace(cfg, data=f"vqa:{place / 'lost.json'}", out_dir=str(place / "lost")))
