"""
data.py: everything that turns files into batches for tinyvlm, and a built-in "shapes world" that needs no download.

    images      open_image (pillow, EXIF orientation, RGB) -> preprocess (square bicubic resize, CLIP mean / std)
    text        Tokenizer (Phi-2's tokenizer.json through the tokenizers library, HF's decode clean-up)
    prompts     TinyGPT-V's layouts per stage, the six task identifiers, boxes as {<x1><y1><x2><y2>} on 0..100
    encode      a sample -> input_ids (IMAGE_TOKEN where the image goes) and labels (-100 outside the answers)
    formats     webdataset caption shards, JSON / JSONL captions, cc_sbu_align, LLaVA conversations, VQA, RefCOCO
    mixing      one dataset per iteration, chosen by sample ratio, as the original does
    world       ShapesWorld: procedurally drawn shapes with captions, descriptions, and all six tasks + free VQA

Run `python data.py --preview` to see the built-in data (writes out/shapes_stage4.png), and
`python data.py --scene scene.png` for one picture to ask the model about.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import random
import re
import tarfile
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from cli import UserError
from tinyvlm import IGNORE_INDEX, IMAGE_TOKEN

ASSETS = Path(__file__).resolve().parent / "assets"

# ----------------------------------------------------------------------------------------------------------------------
# Images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)    # BLIP-2 and TinyGPT-V normalise with CLIP's statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(UserError):
    """An image that cannot be used: missing, corrupt or truncated. The message names the file."""


class DataError(UserError):
    """A data file that cannot be used: missing, empty, malformed. The message names the file (and the record)."""


TRANSPARENT_SHOWN_ON = (255, 255, 255)      # the background the transparent parts of a picture are composited on


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with the transparent parts of a picture (an alpha channel, or a transparent palette or colour entry)
    composited onto white, TRANSPARENT_SHOWN_ON: what a viewer shows, not whatever colour the file keeps under
    them (often black); a 16-bit grey picture scaled to 8 bits."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow opens 16-bit grey PNG and TIFF files so, and its convert() clips each value at 255, which turns
        # all but the darkest 1/256 of the range white (BLIP-2's and LAVIS's pipelines do that too)
        grey = np.asarray(img, dtype=np.float64) / 257                    # 0..65535 -> 0..255
        return Image.fromarray(grey.clip(0, 255).round().astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")                # from a palette, also the way that keeps partial transparency
        canvas = Image.new("RGBA", rgba.size, TRANSPARENT_SHOWN_ON + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def decode_image(source, name: str, notices: list[str] | None = None) -> Image.Image:
    """An RGB pillow image from a path or a file object, its EXIF orientation applied (phone photos are often
    stored sideways), decoded at once (a truncated file fails here, not later). The library's warnings about a
    picture (odd EXIF data, a very large picture) become notices naming the file, added to `notices`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(source) as img:
                img.load()
                out = to_rgb(ImageOps.exif_transpose(img))
        except FileNotFoundError:
            raise ImageError(f"{name}: no such image file") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"{name}: cannot read image ({e})") from None
    if notices is not None:
        notices += [f"{name}: {w.message}" for w in caught]
    return out


def open_image(path: str | Path, notices: list[str] | None = None) -> Image.Image:
    return decode_image(path, str(path), notices)


def holds_picture(path: Path) -> bool:
    try:
        decode_image(path, str(path))
        return True
    except ImageError:
        return False


PICTURE = ("picture", holds_picture)        # what an output path may replace (cli.writable_file)


SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)          # SigLIP (TinyLLaVA, Imp): pixels to [-1, 1]


def preprocess(img: Image.Image, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
               pad: tuple[int, int, int] | None = None) -> torch.Tensor:
    """(3, size, size) float tensor: square bicubic resize (no crop, no augmentation), scale to [0, 1], then
    normalise per channel. The same numbers as BLIP-2's image processor (and, with SigLIP's mean and std,
    SigLIP's). pad: first pad the picture to a square of this colour, centred (LLaVA's "pad" aspect ratio, which
    legacy TinyLLaVA uses with the mean colour (127, 127, 127))."""
    img = img.convert("RGB")
    if pad is not None and img.width != img.height:
        side = max(img.size)
        square = Image.new("RGB", (side, side), pad)
        square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = square
    img = img.resize((size, size), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0                        # (H, W, 3)
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def unnormalize(pixels: torch.Tensor) -> Image.Image:
    """The inverse of preprocess, for pictures of what the model saw."""
    x = pixels.detach().float().cpu().numpy().transpose(1, 2, 0) * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    return Image.fromarray((x.clip(0, 1) * 255).round().astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------------
# Text

EOS = "<|endoftext|>"     # Phi-2: bos = eos = unk = <|endoftext|>, no pad (we pad with it)


class Tokenizer:
    """Phi-2's byte-level BPE through the tokenizers library: encode adds no special tokens, decode applies HF's
    clean-up of spaces before punctuation (Phi-2's tokenizer_config sets clean_up_tokenization_spaces)."""

    def __init__(self, tok, clean_up_spaces: bool = True):
        self.tok = tok
        self.clean_up_spaces = clean_up_spaces
        self.eos_id = tok.token_to_id(EOS)
        if self.eos_id is None:
            raise ValueError(f"the tokenizer has no {EOS} token")
        self.bos_id = self.eos_id

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """A tokenizer.json, or a folder holding one (a Hugging Face model folder such as microsoft/phi-2)."""
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        return cls(HFTokenizer.from_file(str(path)))

    @classmethod
    def from_str(cls, text: str) -> "Tokenizer":
        """A tokenizer.json's content (a checkpoint keeps the tokenizer it was trained with this way)."""
        from tokenizers import Tokenizer as HFTokenizer
        return cls(HFTokenizer.from_str(text))

    def to_str(self) -> str:
        return self.tok.to_str()

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_spaces(text) if self.clean_up_spaces else text


def clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization: undo the spaces a word-level tokenizer would put before punctuation."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def phi2_whitespace_tokens() -> list[str]:
    """The 38 tokens Phi-2 adds to GPT-2's 50257 (ids 50257..50294): runs of 31 down to 2 spaces, 9 down to 2 tabs."""
    return [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]


def build_phi2_tokenizer(encoder_json: str | Path, vocab_bpe: str | Path):
    """Phi-2's tokenizer (a tokenizers.Tokenizer, 50295 tokens) from GPT-2's encoder.json and vocab.bpe."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tok = HFTokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                          fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOS, special=True)])
    tok.add_tokens([AddedToken(t, normalized=True, special=False) for t in phi2_whitespace_tokens()])
    return tok


# ----------------------------------------------------------------------------------------------------------------------
# Prompts (TinyGPT-V / MiniGPT-v2 layouts)

IMAGE_MARKER = "<ImageHere>"
IMAGE_PROMPT = "<Img><ImageHere></Img>"
TASKS = ("[vqa]", "[caption]", "[refer]", "[identify]", "[grounding]", "[detection]")
MAX_TEXT_LEN = {1: 32, 2: 32, 3: 160, 4: 1024}      # text tokens per sample (image slots not counted)
END = {1: "\n", 2: "\n", 3: "###", 4: "###"}       # what closes an answer


class PromptError(UserError):
    """A prompt that cannot be built: unknown task identifier, the image marker in the text, too long for the stage."""


def clean_caption(caption: str, max_words: int = 50) -> str:
    """MiniGPT-4's caption cleaning for stages 1-2 (BLIP's pre_caption, which TinyGPT-V's stage 4 also applies to
    questions, answers and phrases): lowercase, .!"()*#:;~ become spaces, runs of spaces collapse, at most
    max_words words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def clean_text(text: str) -> str:
    """clean_caption for a stage-4 question, answer or phrase (cut at 50 words, as BLIP's processor cuts them);
    text holding the image marker is left as it is, so that encoding refuses it (lowercased, the marker would pass
    as plain words)."""
    return text if IMAGE_MARKER in text else clean_caption(text)


def check_text(text: str) -> str:
    """Text from a user or a data file, refused if it holds the image marker: the template alone says where the
    image goes (a stray marker would ask for a second image)."""
    if IMAGE_MARKER in text:
        raise PromptError(f"the text {text[:60]!r} contains {IMAGE_MARKER}, which marks where the image goes in the "
                          f"prompt template; remove it from the question or the data")
    return text


def with_task(task: str | None, instruction: str) -> str:
    if task is None:
        return instruction
    if task not in TASKS:
        raise PromptError(f"unknown task identifier {task!r}; expected one of {', '.join(TASKS)}")
    return f"{task} {instruction}"


# Two layouts of stage 4's prompt (stages 1-3 have one). "tinygptv" is byte for byte what TinyGPT-V's code trains
# Phi-2 on (its conversation datasets: "<Img><ImageHere></Img> {} " wrapped in "[INST] {} [/INST]", the answer
# right after "]", and each later turn's question after a BOS of its own): real weights are asked in it, since a
# model answers best in the tokens it was trained on. "tiny" is ours, for the tiny model trained here from stage 0
# on: one space after [/INST] instead of the repo's two before it, so that (Phi-2's tokenizer adding no prefix
# space) an answer's first word is the same token as anywhere else in running text, as it is after stage 3's
# "###Assistant: ". The shipped tiny checkpoints were trained in it. A model's config names its layout.
LAYOUTS = ("tinygptv", "tiny")


def turn_prompt(stage: int, instruction: str, first: bool, layout: str = "tiny", image: bool = True) -> str:
    """The text before one answer. The image marker goes into the first turn only (none without an image: stage
    4's text-only instructions).

    stage 1-2: nothing: [BOS][image][caption + "\\n"]
    stage 3:   ###Human: <Img><ImageHere></Img> {instruction} ###Assistant:
    stage 4:   [INST] <Img><ImageHere></Img> {[task] instruction}  [/INST]      (tinygptv)
               [INST] <Img><ImageHere></Img> {[task] instruction} [/INST]       (tiny)
    TinyGPT-V's two spaces are the trailing space its data sets put after every question but a text-only one's
    ("[INST] {instruction} [/INST]")."""
    if layout not in LAYOUTS:
        raise ValueError(f"prompt layout must be one of {LAYOUTS}, got {layout!r}")
    shown = IMAGE_PROMPT + " " if first and image else ""
    if stage in (1, 2):
        return IMAGE_MARKER if first else ""
    if stage == 3:
        return f"###Human: {shown}{instruction} ###Assistant: "
    if stage == 4 and layout == "tiny":
        return f"[INST] {shown}{instruction} [/INST] "
    if stage == 4:
        return f"[INST] {shown}{instruction} [/INST]" if first and not image else f"[INST] {shown}{instruction}  [/INST]"
    raise ValueError(f"stage must be 1-4, got {stage}")


class TextOnly:
    """The image of a sample that has none: stage 4's text-only instructions (Unnatural Instructions)."""

    def __repr__(self) -> str:
        return "TEXT_ONLY"


TEXT_ONLY = TextOnly()


@dataclass
class Sample:
    """One training or evaluation example: an image (a path, a pillow image, or a Scene of the shapes world;
    TEXT_ONLY for a text-only instruction) and one or more (instruction, answer) turns. meta carries what
    evaluation needs (all VQA answers, the true box)."""
    image: object
    turns: list[tuple[str, str]]
    task: str | None = None
    meta: dict = field(default_factory=dict)


def encode(sample: Sample, tokenizer: Tokenizer, stage: int, num_image_tokens: int,
           max_len: int | None = None, image_text: str | None = None,
           layout: str = "tiny") -> tuple[list[int], list[int]]:
    """input_ids and labels of one sample. The image marker becomes num_image_tokens IMAGE_TOKEN slots (or, given
    image_text, that text: stage 0 shows the language model scenes written out in words); labels are
    IGNORE_INDEX everywhere but the answers and their end symbols. Text longer than max_len (the stage's, by
    default) is cut from the right of the last answer; the prompt and the image slots are never cut, and a prompt
    that alone leaves no room for an answer is an error."""
    max_len = MAX_TEXT_LEN[stage] if max_len is None else max_len
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for i, (instruction, answer) in enumerate(sample.turns):
        check_text(instruction), check_text(answer)
        instruction = with_task(sample.task, instruction) if i == 0 and stage == 4 else instruction
        prompt = turn_prompt(stage, instruction, first=(i == 0), layout=layout, image=sample.image is not TEXT_ONLY)
        if i and stage == 4 and layout == "tinygptv":          # TinyGPT-V starts each later question with a BOS
            ids.append(tokenizer.bos_id)
            labels.append(IGNORE_INDEX)
        prompt_ids = with_image_slots(prompt, tokenizer, num_image_tokens, image_text)
        ids += prompt_ids
        labels += [IGNORE_INDEX] * len(prompt_ids)
        answer_ids = tokenizer.encode(answer + END[stage])
        ids += answer_ids
        labels += answer_ids
    n_text = sum(1 for t in ids if t != IMAGE_TOKEN)
    if n_text > max_len:
        n_answer = len(tokenizer.encode(sample.turns[-1][1] + END[stage]))
        cut = n_text - max_len
        if cut >= n_answer:
            raise PromptError(f"prompt of {n_text - n_answer} text tokens leaves no room for an answer within the "
                              f"stage-{stage} limit of {max_len} tokens")
        ids, labels = ids[:-cut], labels[:-cut]
    return ids, labels


def encode_prompt(instruction: str, tokenizer: Tokenizer, stage: int, num_image_tokens: int,
                  task: str | None = None, image_text: str | None = None, layout: str = "tiny",
                  image: bool = True) -> list[int]:
    """The ids to generate from: everything of a sample up to where the answer starts (image=False: a text-only
    instruction's)."""
    check_text(instruction)
    prompt = turn_prompt(stage, with_task(task, instruction) if stage == 4 else instruction, first=True,
                         layout=layout, image=image)
    return [tokenizer.bos_id] + with_image_slots(prompt, tokenizer, num_image_tokens, image_text)


def with_image_slots(prompt: str, tokenizer: Tokenizer, num_image_tokens: int, image_text: str | None = None) -> list[int]:
    """The ids of a prompt text, its image marker replaced by num_image_tokens IMAGE_TOKEN slots (or image_text's
    ids). The text on either side of the marker is tokenized apart, as TinyGPT-V does: a BPE merge never crosses
    the image."""
    ids = []
    for j, piece in enumerate(prompt.split(IMAGE_MARKER)):
        if j:
            ids += [IMAGE_TOKEN] * num_image_tokens if image_text is None else tokenizer.encode(image_text)
        ids += tokenizer.encode(piece) if piece else []
    return ids


# The sibling models' prompts (LLaVA-1.5 style, one question): "USER: <image>\n{question} ASSISTANT:", TinyLLaVA's
# and Imp's after Vicuna's system message; no BOS (Phi-2's tokenizer adds none). An answer ends at <|endoftext|>,
# Imp's also at its added "</s>".
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the user's questions.")
LLAVA_TURN = "USER: <image>\n{} ASSISTANT:"
FAMILY_TEMPLATES = {**{family: f"{LLAVA_SYSTEM} {LLAVA_TURN}" for family in ("tinyllava", "tinyllava-legacy", "imp")},
                    "llava-hf": LLAVA_TURN}
FAMILY_STOPS = {"imp": ("</s>",)}


def family_prompt(family: str, question: str, tokenizer: Tokenizer, num_image_tokens: int) -> list[int]:
    """The ids a TinyLLaVA / Imp / llava-hf model is asked with: its template, the image's slots at <image>."""
    check_text(question)
    if "<image>" in question:
        raise PromptError("the question contains <image>, where the template puts the picture; remove it")
    text = FAMILY_TEMPLATES[family].format(question).replace("<image>", IMAGE_MARKER)
    return with_image_slots(text, tokenizer, num_image_tokens)


# Boxes: {<x1><y1><x2><y2>}, integers 0..100 relative to the image size (MiniGPT-v2's grid)

def format_box(box: Sequence[float], width: float = 1.0, height: float = 1.0, truncate: bool = False) -> str:
    """box (x1, y1, x2, y2) in pixels of a width x height image (or in fractions, the default) -> text. Rounded to
    the nearest integer; truncate=True cuts the fraction off, as TinyGPT-V's RefCOCO reader does (int(v / size *
    100), in that order, so that the same file gives the same numbers)."""
    scaled = (v / s * 100 for v, s in zip(box, (width, height, width, height)))
    x1, y1, x2, y2 = (int(v) if truncate else round(v) for v in scaled)
    x1, y1, x2, y2 = (min(max(v, 0), 100) for v in (x1, y1, x2, y2))
    return f"{{<{x1}><{y1}><{x2}><{y2}>}}"


_BOX = re.compile(r"\{<(\d{1,3})><(\d{1,3})><(\d{1,3})><(\d{1,3})>\}")


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every well-formed {<x1><y1><x2><y2>} in generated text, as 0..100 integers; malformed ones are skipped."""
    return [b for b in (tuple(int(v) for v in m.groups()) for m in _BOX.finditer(text))
            if all(0 <= v <= 100 for v in b) and b[0] <= b[2] and b[1] <= b[3]]


_BOX_LIKE = re.compile(r"\{\s*<[^{}]*\}")      # whatever a user wrote as a box: "{<" up to the next "}"


def check_question_boxes(question: str, task: str) -> str:
    """A stage-4 question, refused where a box in it is not one the model can read ({<x1><y1><x2><y2>}: integers
    0..100, x1 <= x2, y1 <= y2; it was never shown another), or where an [identify] question, which names what is
    in a box, has not exactly one. A malformed box would otherwise be answered as if it were some other box."""
    written = _BOX_LIKE.findall(question)
    for text in written:
        if not (_BOX.fullmatch(text) and parse_boxes(text)):
            raise PromptError(f"the box {text!r} is not {{<x1><y1><x2><y2>}}: four integers 0..100 (of the image's "
                              f"width and height), x1 <= x2 and y1 <= y2, e.g. {{<13><16><47><50>}}")
    if task == "[identify]" and len(written) != 1:
        raise PromptError(f"[identify] names what is in one box; the question has {len(written)}: e.g. "
                          f"\"what object is in this location {{<13><16><47><50>}}\"")
    return question


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Real data formats. Each reader returns a list of Samples; image paths are relative to image_root.

def read_json_records(path: str | Path) -> list[dict]:
    """A JSON list (or {"annotations": [...]}, {"data": [...]}, {id: object}) or JSONL file of objects; at least one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: neither JSON nor JSONL (line {e.lineno}: {e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("annotations", data.get("data")), list):
        data = data["annotations"] if "annotations" in data else data["data"]      # COCO's layout, TextCaps' layout
    elif isinstance(data, dict) and data and all(isinstance(r, dict) for r in data.values()):
        data = [{"id": k} | r for k, r in data.items()]          # keyed by id (GQA's question files)
    elif isinstance(data, dict):
        data = [data]                                            # a JSONL file of one line
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (JSON) or one object per line (JSONL)")
    if not data:
        raise DataError(f"{path}: holds no records")
    return data


def record_field(record: dict, key: str, path, i: int):
    """record[key], or an error naming the file, the record and the fields it has."""
    if key not in record:
        raise DataError(f"{path}: record {i} has no {key!r} field (fields: {sorted(record)})")
    return record[key]


CAPTION_INSTRUCTION = ""          # stages 1-2 captions have no instruction


def read_captions(path: str | Path, image_root: str | Path = ".") -> list[Sample] | CaptionShards:
    """Image-caption pairs: a JSON / JSONL list of {"image", "caption"}; webdataset .tar shards (a file, or a
    folder of them) give a CaptionShards instead, to be read as a stream."""
    path = Path(path)
    if path.suffix == ".tar" or path.is_dir() and any(path.glob("*.tar")):
        return caption_shards(path)
    root = Path(image_root)
    return [Sample(root / record_field(r, "image", path, i), [(CAPTION_INSTRUCTION, str(record_field(r, "caption", path, i)))],
                   meta={"source": str(path)})
            for i, r in enumerate(read_json_records(path))]


HELD_OUT_EVERY = 20       # of each shard's samples every 20th is held out: the 5% other formats hold out at the end


@dataclass
class CaptionShards:
    """Webdataset shards as LAION, CC and SBU are distributed (thousands of .tar files, millions of pairs, more than
    any RAM): {key}.jpg (or .png / .jpeg / .webp) next to {key}.txt, or {key}.json with a "caption". They are never
    read whole: samples() walks a shard one sample at a time, and SampleStream shuffles them through a buffer."""
    shards: list[Path]

    def samples(self, shard: Path, part: str = "all") -> Iterator[Sample]:
        """One shard's samples in order, captions cleaned (clean_caption) as other caption files are. part: "all",
        "train" or "held out" (every HELD_OUT_EVERY-th). A sample without an image or a caption, or the rest of a
        shard that stops being readable (an interrupted download), comes out as a Sample whose meta["problem"] says
        so: whoever encodes it skips and counts it, as with any unusable sample."""
        def sample(key: str, files: dict[str, bytes]) -> Sample:
            image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
            caption = files["txt"].decode("utf-8", "replace").strip() if "txt" in files else \
                _json_caption(files["json"]) if "json" in files else None
            if image is None or not caption:
                return Sample(None, [], meta={"problem": f"{shard}: sample {key!r} lacks an image or a caption "
                                                         f"(has {sorted(files)})"})
            return Sample(EncodedImage(f"{shard}:{key}", image), [(CAPTION_INSTRUCTION, clean_caption(caption))],
                          meta={"source": str(shard)})

        def grouped() -> Iterator[Sample]:            # the files of a sample lie next to each other in the tar
            key, files = None, {}
            try:
                with tarfile.open(shard, "r|*") as tar:    # "r|": a stream, never an index of the whole file
                    for member in tar:
                        if not member.isfile():
                            continue
                        k, _, ext = member.name.rpartition(".")
                        if key is not None and k != key:
                            yield sample(key, files)
                            files = {}
                        key, files[ext.lower()] = k, tar.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError) as e:
                pending = sample(key, files) if key is not None else None
                if pending is not None and "problem" not in pending.meta:       # read whole before the break
                    yield pending
                yield Sample(None, [], meta={"problem": f"{shard}: unreadable after sample {key!r}, the rest of it "
                                                        f"is skipped ({type(e).__name__}: {e})"})
                return
            if key is not None:
                yield sample(key, files)

        for i, s in enumerate(grouped()):
            held_out = i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
            if part == "all" or (part == "held out") == held_out:
                yield s

    def first(self, n: int, part: str = "all") -> list[Sample]:
        """The first n samples of a part, the shards in order: a held-out set that never grows with the data."""
        out = []
        for shard in self.shards:
            for s in self.samples(shard, part):
                if "problem" not in s.meta:
                    out.append(s)
                if len(out) == n:
                    return out
        return out


def _json_caption(raw: bytes) -> str | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record.get("caption") if isinstance(record, dict) else None


def caption_shards(path: str | Path) -> CaptionShards:
    path = Path(path)
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    for shard in shards:
        if not shard.is_file() or shard.stat().st_size == 0:
            raise DataError(f"{shard}: no such shard, or an empty file")
    return CaptionShards(shards)


@dataclass
class EncodedImage:
    """Image bytes held in memory (from a tar shard), with a name for error messages."""
    name: str
    data: bytes


def read_cc_sbu_align(folder: str | Path, instruction: str = "Describe this image in detail.") -> list[Sample]:
    """MiniGPT-4's cc_sbu_align: image/{image_id}.jpg and filter_cap.json {"annotations": [{image_id, caption}]}."""
    folder = Path(folder)
    records = read_json_records(folder / "filter_cap.json")
    return [Sample(folder / "image" / f"{record_field(r, 'image_id', folder, i)}.jpg",
                   [(instruction, record_field(r, "caption", folder, i))], meta={"source": str(folder)})
            for i, r in enumerate(records)]


def read_llava(path: str | Path, image_root: str | Path = ".") -> list[Sample]:
    """LLaVA conversations: {"image", "conversations": [{"from": "human" | "gpt", "value"}, ...]}; the "<image>"
    marker is removed from the text (our prompt template places the image)."""
    path, root, samples = Path(path), Path(image_root), []
    for i, r in enumerate(read_json_records(path)):
        conv = record_field(r, "conversations", path, i)
        turns = []
        for q, a in zip(conv[::2], conv[1::2]):
            if q.get("from") != "human" or a.get("from") != "gpt":
                raise DataError(f"{path}: record {i}: turns must alternate human / gpt")
            turns.append((q["value"].replace("<image>", "").strip(), a["value"].strip()))
        if not turns:
            raise DataError(f"{path}: record {i} has no human / gpt turn")
        samples.append(Sample(root / record_field(r, "image", path, i), turns, meta={"source": str(path)}))
    return samples


VQA_TEMPLATE = "Based on the image, respond to this question with a short answer: {}"


def read_vqa(path: str | Path, image_root: str | Path = ".", pool: Sequence[str] = (VQA_TEMPLATE,),
             answers_field: str = "answers", image_basename: bool = False) -> list[Sample]:
    """VQA records {"image", "question", "answer"}, with "answer" one string or the annotators' list (LAVIS's and
    TinyGPT-V's VQAv2 / OK-VQA / GQA files), or {"answers": [...]} (VQAv2's own, entries strings or {"answer": ...};
    A-OKVQA's "direct_answers" with answers_field). Training uses the most frequent answer; evaluation scores
    against all of them (meta["answers"]). TinyGPT-V instead draws one per use, weighted by how many annotators gave
    it; a fixed answer keeps every batch reproducible, which --resume's exactness rests on. The question and the
    answer trained on pass through clean_caption, as TinyGPT-V's text processor puts every stage-4 text; the scored
    answers stay as written. The instruction is pool's entries in turn (TinyGPT-V's sets: VQA_POOL); image_basename:
    the image is the file name of "image" under image_root (the repo's COCO and A-OKVQA readers)."""
    path, root, samples = Path(path), Path(image_root), []
    for i, r in enumerate(read_json_records(path)):
        answers = r.get(answers_field)
        if answers is None:
            answers = record_field(r, "answer", path, i)
        if not isinstance(answers, list):
            answers = [answers]
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
        if not answers:
            raise DataError(f"{path}: record {i} has an empty answer list")
        best = max(set(answers), key=lambda a: (answers.count(a), -answers.index(a)))
        image = str(record_field(r, "image", path, i))
        question = pool[i % len(pool)].format(clean_text(str(record_field(r, "question", path, i))))
        samples.append(Sample(root / (image.split("/")[-1] if image_basename else image), [(question, clean_text(best))],
                              task="[vqa]", meta={"answers": answers, "source": str(path)}))
    return samples


def read_refs(path: str | Path, image_root: str | Path = ".", inverse: bool = False) -> list[Sample]:
    """Referring expressions (RefCOCO style): {"image", "bbox": [x, y, w, h] in pixels, "sentence"}, plus the
    image's "width" and "height" (read from the image when absent). inverse=True makes [identify] samples
    (box -> phrase) instead of [refer] (phrase -> box). The phrase passes through clean_caption, and the box is
    truncated, as in TinyGPT-V's RefCOCO reader."""
    path, root, samples = Path(path), Path(image_root), []
    for i, r in enumerate(read_json_records(path)):
        image = root / record_field(r, "image", path, i)
        x, y, w, h = record_field(r, "bbox", path, i)
        if "width" in r and "height" in r:
            W, H = r["width"], r["height"]
        else:
            W, H = open_image(image).size
        box = format_box((x, y, x + w, y + h), W, H, truncate=True)
        # one instruction for every sample, the pools' second ("give me the location of {}")
        samples.append(refer_sample(image, str(record_field(r, "sentence", path, i)), box, 1, inverse, str(path)))
    return samples


# TinyGPT-V's stage-4 data sets, in the files its repository reads (minigpt4/datasets/datasets/*.py), with its
# instructions and text cleaning. Where it draws an instruction from a pool at random on every use, we take the
# pool's entries in turn over the samples (sample i gets entry i mod the pool's size): the same instructions, in
# the same shares, and a reproducible batch, which --resume's exactness rests on. Where it draws one of a
# referring expression's sentences, or a VQA answer by annotator weight, we keep one sample per sentence and the
# most frequent answer (read_vqa says why). Image files are named as the repo names them, under --image-root.

REFER_POOL = ("{}", "give me the location of {}", "where is {} ?", "from this image, tell me the location of {}",
              "the location of {} is", "could you tell me the location for {} ?", "where can I locate the {} ?")
IDENTIFY_POOL = ("{}", "what object is in this location {}", "identify the object present at this location {}",
                 "what is it in {}", "describe this object in {}", "this {} is", "the object in {} is")
VQA_POOL = ("{}", "Based on the image, respond to this question with a short answer: {}")
GROUNDING_POOL = ("please describe this image in details", "describe this image as detailed as possible",
                  "summarize this image in details", "give a thorough description of what you see in this image")
SHORT_CAPTION_POOL = (
    "Briefly describe this image.", "Provide a concise depiction of this image.",
    "Present a short description of this image.", "Summarize this image in a few words.", "A short image caption:",
    "A short image description:", "A photo of ", "An image that shows ", "Write a short description for the image. ",
    "Write a description for the photo.", "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.", "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.", "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.")


def coco_train_image(root, image_id) -> Path:
    return Path(root) / f"COCO_train2014_{image_id}.jpg"


def _conversation(record: dict, path, i: int) -> list[tuple[str, str]]:
    """LLaVA-style turns [{"from": "human"|"gpt", "value"}, ...] -> (question, answer) pairs; the first question
    loses its "<image>" marker and line breaks, as the repo strips them."""
    conv = record_field(record, "conversations", path, i)
    if len(conv) < 2 or len(conv) % 2:
        raise DataError(f"{path}: record {i}: a conversation needs question / answer pairs, got {len(conv)} turns")
    first = conv[0]["value"].replace("<image>", "").replace("\n", "").strip()
    return [(first if k == 0 else q["value"], a["value"]) for k, (q, a) in enumerate(zip(conv[::2], conv[1::2]))]


def read_llava_single(path, image_root) -> list[Sample]:
    """LLaVA's detail_23k / complex_reasoning_77k: {"id", "conversations"}: the first question (cleaned) and its
    answer, the picture COCO_train2014_{id}.jpg."""
    return [Sample(coco_train_image(image_root, record_field(r, "id", path, i)),
                   [(clean_text(q), a)], meta={"source": str(path)})
            for i, r in enumerate(read_json_records(path)) for q, a in _conversation(r, path, i)[:1]]


def read_llava_conversation(path, image_root) -> list[Sample]:
    """LLaVA's conversation_58k, and TinyGPT-V's multitask_conversation: every turn of {"id", "conversations"}, as
    written, the picture COCO_train2014_{id}.jpg."""
    return [Sample(coco_train_image(image_root, record_field(r, "id", path, i)), _conversation(r, path, i),
                   meta={"source": str(path)}) for i, r in enumerate(read_json_records(path))]


def read_flickr(path, image_root, kind: str) -> list[Sample]:
    """Flickr30k Entities as MiniGPT-v2 prepared it, {image_id}.jpg pictures; kind:
    "grounded": {"image_id", "grounded_caption"} -> [grounding], a caption with a <p>phrase</p> {box} per thing;
    "caption_to_phrase": {"image_id", "caption", "output"} -> [detection] the caption's phrases and boxes;
    "phrase_to_object": {"image_id", "phrase", "bbox"} -> [detection] "<p>phrase</p> {box}"."""
    samples = []
    for i, r in enumerate(read_json_records(path)):
        image = Path(image_root) / f"{record_field(r, 'image_id', path, i)}.jpg"
        if kind == "grounded":
            sample = Sample(image, [(GROUNDING_POOL[i % len(GROUNDING_POOL)], record_field(r, "grounded_caption", path, i))],
                            task="[grounding]")
        elif kind == "caption_to_phrase":
            sample = Sample(image, [(record_field(r, "caption", path, i), record_field(r, "output", path, i))], task="[detection]")
        else:
            phrase = record_field(r, "phrase", path, i)
            sample = Sample(image, [(phrase, f"<p>{phrase}</p> {record_field(r, 'bbox', path, i)}")], task="[detection]")
        samples.append(dataclasses.replace(sample, meta={"source": str(path)}))
    return samples


def read_textcaps(path, image_root) -> list[Sample]:
    """TextCaps' TextCaps_0.1_train.json: {"data": [{"image_id", "caption_str", ...}]}: [caption] with a short-caption
    instruction, the caption cleaned, the picture {image_id}.jpg."""
    return [Sample(Path(image_root) / f"{record_field(r, 'image_id', path, i)}.jpg",
                   [(SHORT_CAPTION_POOL[i % len(SHORT_CAPTION_POOL)], clean_text(record_field(r, "caption_str", path, i)))],
                   task="[caption]", meta={"source": str(path)})
            for i, r in enumerate(read_json_records(path))]


def refer_sample(image: Path, phrase: str, box: str, i: int, inverse: bool, source: str) -> Sample:
    """A [refer] sample (phrase -> box) or, inverse, an [identify] one (box -> phrase), its phrase cleaned, its
    instruction entry i (mod its size) of the repo's pool."""
    phrase = clean_text(phrase)
    meta = {"box": parse_boxes(box)[0], "phrase": phrase, "source": source}
    if inverse:
        return Sample(image, [(IDENTIFY_POOL[i % len(IDENTIFY_POOL)].format(box), phrase)], task="[identify]", meta=meta)
    return Sample(image, [(REFER_POOL[i % len(REFER_POOL)].format(phrase), box)], task="[refer]", meta=meta)


class _NoCodePickle(pickle.Unpickler):
    """Unpickles plain data only (lists, dicts, strings, numbers): a pickle that names any class or function is
    refused instead of being allowed to run it."""

    def find_class(self, module, name):
        raise DataError(f"this pickle asks for {module}.{name}: only plain data (lists, dicts, strings, numbers) is read")


def read_refer_pickle(path, image_root, inverse: bool = False) -> list[Sample]:
    """RefCOCO, RefCOCO+ and RefCOCOg as the REFER toolkit ships them: PATH is a refs(unc).p / refs(umd).p file with
    instances.json beside it; the "train" split, one sample per sentence, the box ann["bbox"] ([x, y, w, h] in pixels
    of the COCO picture COCO_train2014_{image_id:012}.jpg, sized by instances.json) truncated to 0..100."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such REFER refs file (refs(unc).p, refs(umd).p)")
    try:
        with open(path, "rb") as f:
            refs = _NoCodePickle(f, encoding="latin1").load()      # the toolkit's files were pickled by Python 2
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable REFER refs pickle ({type(e).__name__}: {e})") from None
    instances = path.parent / "instances.json"
    if not instances.is_file():
        raise DataError(f"{instances}: missing (the REFER toolkit keeps it beside {path.name})")
    coco = json.loads(instances.read_text())
    boxes = {a["id"]: a["bbox"] for a in coco["annotations"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    samples = []
    for ref in refs:
        if ref.get("split") != "train":
            continue
        if ref["ann_id"] not in boxes or ref["image_id"] not in sizes:
            raise DataError(f"{path}: ref {ref.get('ref_id')} names annotation {ref['ann_id']} / image "
                            f"{ref['image_id']}, which {instances.name} does not hold")
        x, y, w, h = boxes[ref["ann_id"]]
        box = format_box((x, y, x + w, y + h), *sizes[ref["image_id"]], truncate=True)
        image = Path(image_root) / f"COCO_train2014_{ref['image_id']:0>12}.jpg"
        for sentence in ref["sentences"]:
            samples.append(refer_sample(image, sentence["raw"], box, len(samples), inverse, str(path)))
    if not samples:
        raise DataError(f"{path}: no ref of the train split")
    return samples


def read_visual_genome(folder, image_root=None, max_area: int = 16384) -> list[Sample]:
    """Visual Genome's region descriptions as [refer] samples: FOLDER holds region_descriptions.json ([{"id",
    "regions": [{"image_id", "phrase", "x", "y", "width", "height"}]}]) and image_data.json ([{"image_id", "url",
    "width", "height"}]); each picture is FOLDER/ plus the last two parts of its url (VG_100K/1.jpg). As the repo does,
    only regions smaller than 16,384 square pixels (small things, where finding them is the lesson)."""
    folder = Path(folder)
    images = {r["image_id"]: r for r in read_json_records(folder / "image_data.json")}
    samples = []
    for i, entry in enumerate(read_json_records(folder / "region_descriptions.json")):
        for region in record_field(entry, "regions", folder / "region_descriptions.json", i):
            if region["width"] * region["height"] >= max_area:
                continue
            info = images.get(region["image_id"])
            if info is None:
                raise DataError(f"{folder / 'image_data.json'}: no image {region['image_id']} (region "
                                f"{region.get('region_id')})")
            x, y, w, h = region["x"], region["y"], region["width"], region["height"]
            box = format_box((x, y, x + w, y + h), info["width"], info["height"], truncate=True)
            image = folder.joinpath(*info["url"].split("/")[-2:])
            samples.append(refer_sample(image, region["phrase"], box, len(samples), False, str(folder)))
    return samples


def read_unnatural_instructions(path, image_root=None) -> list[Sample]:
    """Unnatural Instructions (text only, no picture): [{"instances": [{"instruction_with_input", "constraints",
    "output"}]}]: the first instance, its constraints appended to the instruction, both cleaned (and so cut at 50
    words, as the repo's processor cuts them)."""
    samples = []
    for i, r in enumerate(read_json_records(path)):
        first = record_field(r, "instances", path, i)[0]
        constraints = first.get("constraints")
        instruction = first["instruction_with_input"] + (f" {constraints}" if constraints is not None else "")
        samples.append(Sample(TEXT_ONLY, [(clean_text(instruction), clean_text(first["output"]))],
                              meta={"source": str(path)}))
    return samples


def load_image(sample: Sample, notices: list[str] | None = None) -> Image.Image:
    image = sample.image
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, Scene):
        return image.render()
    if isinstance(image, EncodedImage):
        return decode_image(io.BytesIO(image.data), image.name, notices)
    return open_image(image, notices)


class VLMDataset(torch.utils.data.Dataset):
    """Samples -> model inputs. A sample that cannot be used (an unreadable image, text that cannot be encoded, more
    tokens than the model has positions) stops the run with its message; with skip_bad, __getitem__ returns None
    instead (collate drops it), and the sample is counted in .skipped and reported (the first few printed)."""

    SHOWN = 3           # skipped samples printed one by one; the rest are only counted

    def __init__(self, samples: Sequence[Sample], tokenizer: Tokenizer, stage: int, image_size: int,
                 num_image_tokens: int, max_len: int | None = None, skip_bad: bool = False,
                 max_positions: int | None = None, layout: str = "tiny"):
        self.samples, self.tokenizer, self.stage, self.layout = list(samples), tokenizer, stage, layout
        self.image_size, self.num_image_tokens, self.max_len = image_size, num_image_tokens, max_len
        self.skip_bad, self.max_positions = skip_bad, max_positions
        self.skipped: list[str] = []
        self.notices: list[str] = []           # the image library's warnings, one per picture that had one

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict | None:
        return self.item(self.samples[i], i)

    def item(self, sample: Sample, i: int) -> dict | None:
        """The model inputs of one sample (i: its number, for messages), or None when it is skipped."""
        try:
            if "problem" in sample.meta:                  # a stream's sample that could not be read
                raise PromptError(sample.meta["problem"])
            ids, labels = self.tokens(sample, i)
            if sample.image is TEXT_ONLY:                 # a text-only instruction (stage 4)
                return {"input_ids": ids, "labels": labels, "index": i}
            pixels = self.pixels(sample)
        except (ImageError, PromptError) as e:
            self.skip(i, e)
            return None
        return {"pixels": pixels, "input_ids": ids, "labels": labels, "index": i}

    def pixels(self, sample: Sample) -> torch.Tensor:
        """The sample's picture, read and preprocessed: (3, size, size). Raises ImageError; the image library's
        warnings are kept in .notices (the first few printed)."""
        seen = len(self.notices)
        pixels = preprocess(load_image(sample, self.notices), self.image_size)
        for notice in self.notices[seen:]:
            if len(self.notices) <= self.SHOWN:
                print(f"note: {notice}" + (" (further notes are counted, not shown)"
                                           if len(self.notices) == self.SHOWN else ""))
        return pixels

    def image_input(self, i: int) -> torch.Tensor:
        """What the model reads of sample i's picture: its pixels (for evaluation; raises ImageError)."""
        return preprocess(load_image(self.samples[i]), self.image_size)

    def tokens(self, sample: Sample, i: int) -> tuple[list[int], list[int]]:
        ids, labels = encode(sample, self.tokenizer, self.stage, self.num_image_tokens, self.max_len,
                             layout=self.layout)
        if self.max_positions and len(ids) > self.max_positions:
            raise PromptError(f"sample {i}: {len(ids)} tokens with the image, more than the model's "
                              f"{self.max_positions} positions")
        return ids, labels

    def skip(self, i: int, e: Exception) -> None:
        """Sample i cannot be used (e): counted in .skipped and shown (the first few), or without skip_bad, e stops
        the run."""
        if not self.skip_bad:
            raise e
        self.skipped.append(str(e))
        if len(self.skipped) <= self.SHOWN:
            print(f"skipping sample {i}: {e}" + (" (further ones are counted, not shown)"
                                                 if len(self.skipped) == self.SHOWN else ""))


class FeatureDataset(torch.utils.data.Dataset):
    """A VLMDataset whose images were replaced by their (frozen) visual features, computed once: the ViT and the
    Q-Former are frozen in every stage, so a trainer may cache their output per image. A sample whose picture could
    not be read has no features (its message in `unreadable`) and is skipped or stops the run, as VLMDataset does."""

    def __init__(self, base: VLMDataset, features: torch.Tensor, feature_index: list[int],
                 unreadable: dict[int, str] | None = None):
        self.base, self.features, self.feature_index = base, features, feature_index
        self.unreadable = unreadable or {}         # sample number -> why its picture could not be read
        self.samples, self.image_size = base.samples, base.image_size
        self.skipped, self.notices = base.skipped, base.notices

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict | None:
        try:
            ids, labels = self.base.tokens(self.samples[i], i)
            if i in self.unreadable:
                raise ImageError(self.unreadable[i])
        except (ImageError, PromptError) as e:
            self.base.skip(i, e)
            return None
        return {"features": self.features[self.feature_index[i]], "input_ids": ids, "labels": labels, "index": i}

    def image_input(self, i: int) -> torch.Tensor:
        """What the model reads of sample i's picture: its visual features (raises ImageError)."""
        if i in self.unreadable:
            raise ImageError(self.unreadable[i])
        return self.features[self.feature_index[i]]


class SampleStream:
    """An endless, shuffled stream of model inputs from CaptionShards, for one rank: memory holds `buffer` samples,
    whatever the size of the data. Each epoch visits this rank's shards (every world-th, from the rank-th: under
    DDP each rank reads its own) in an order drawn from (seed, epoch), and shuffles within the buffer: a sample waits
    there until a random draw sends it out, replaced by the next one read. Held-out samples never come out.

    take(n) gives n usable inputs; the unusable ones on the way (an unreadable image, a sample without a caption,
    a damaged shard) are skipped and counted (.skipped), as VLMDataset does. state_dict() is the position (epoch,
    samples drawn in it): load_state_dict() continues from exactly there, reading again up to it."""

    UNUSABLE_LIMIT = 256

    def __init__(self, source: CaptionShards, encoder: VLMDataset, buffer: int = 1000, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.source, self.encoder, self.buffer, self.seed = source, encoder, buffer, seed
        self.shards = source.shards[rank::world]
        if not self.shards:
            raise DataError(f"{len(source.shards)} shard(s) for {world} ranks: every rank needs at least one "
                            f"(split the data into more shards, or use fewer ranks)")
        self.epoch, self.drawn = 0, 0
        self._stream = None

    @property
    def skipped(self) -> list[str]:
        return self.encoder.skipped

    @property
    def notices(self) -> list[str]:
        return self.encoder.notices

    def _samples(self) -> Iterator[Sample]:
        while True:
            rng = random.Random(self.seed * 1_000_003 + self.epoch)
            order = list(self.shards)
            rng.shuffle(order)
            buffer, read = [], 0
            for shard in order:
                for sample in self.source.samples(shard, "train"):
                    read += 1
                    if len(buffer) < self.buffer:
                        buffer.append(sample)
                        continue
                    j = rng.randrange(len(buffer))
                    buffer[j], sample = sample, buffer[j]
                    yield sample
            rng.shuffle(buffer)
            yield from buffer
            if not read:
                raise DataError(f"shards {', '.join(map(str, order[:3]))}: no training samples in them")
            self.epoch, self.drawn = self.epoch + 1, 0

    def _next_sample(self) -> Sample:
        if self._stream is None:
            self._stream = self._samples()
            for _ in range(self.drawn):                   # resumed: draw again, unencoded, up to where it stopped
                next(self._stream)
        sample = next(self._stream)
        self.drawn += 1
        return sample

    def take(self, n: int) -> list[dict]:
        items, unusable = [], 0
        while len(items) < n:
            item = self.encoder.item(self._next_sample(), self.drawn - 1)
            if item is not None:
                items.append(item)
                unusable = 0
                continue
            unusable += 1
            if unusable >= self.UNUSABLE_LIMIT:
                raise DataError(f"shards {self.shards[0]}...: none of the last {unusable} samples could be used "
                                f"(e.g. {self.skipped[-1]})")
        return items

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.drawn, self._stream = state["epoch"], state["drawn"], None


def collate(items: Sequence[dict | None], pad_id: int) -> dict | None:
    """Right-pad a batch (pad = eos, as TinyGPT-V does); attention_mask marks the real tokens."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    T = max(len(it["input_ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n] = torch.tensor(it["input_ids"])
        labels[b, :n] = torch.tensor(it["labels"])
        mask[b, :n] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "index": [it["index"] for it in items]}
    for key in ("pixels", "features"):          # features: precomputed visual features (a trainer's cache)
        if any(key in it for it in items) and not all(key in it for it in items):
            raise ValueError(f"a batch mixes samples with and without {key} (one data set per batch keeps them apart)")
        if key in items[0]:
            out[key] = torch.stack([it[key] for it in items])
    return out


def model_inputs(batch: dict, device) -> dict:
    """A collated batch as TinyVLM's keyword arguments, on `device`: its tokens and mask, and its pixels or cached
    visual features (None where it has none)."""
    on_device = {k: batch[k].to(device) if k in batch else None for k in ("pixels", "features")}
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            **on_device}


class Mixture:
    """Several datasets mixed by sample ratio: each iteration draws one dataset (probability proportional to its
    ratio) and a batch from it, as TinyGPT-V's runner does; each dataset is shuffled and cycled on its own. A
    dataset whose last UNUSABLE_LIMIT draws were all skipped stops the run (a wrong --image-root, say), rather than
    drawing forever. Under DDP every rank draws the same datasets and yields its share of each batch (every
    world-th sample from the rank-th): of the same drawn samples for a dataset in memory, of its own shards for a
    SampleStream."""

    UNUSABLE_LIMIT = 256

    def __init__(self, datasets: dict[str, torch.utils.data.Dataset | SampleStream], ratios: dict[str, float],
                 batch_size: int | dict[str, int], seed: int = 42, pad_id: int = 0, rank: int = 0, world: int = 1):
        """batch_size: one for all, or each dataset's own."""
        if set(datasets) != set(ratios):
            raise ValueError(f"ratios {sorted(ratios)} do not match datasets {sorted(datasets)}")
        self.batch_sizes = batch_size if isinstance(batch_size, dict) else {n: batch_size for n in datasets}
        if set(self.batch_sizes) != set(datasets):
            raise ValueError(f"batch sizes {sorted(self.batch_sizes)} do not match datasets {sorted(datasets)}")
        if min(self.batch_sizes.values()) < world:
            raise ValueError(f"every batch size ({self.batch_sizes}) must be at least the number of ranks ({world})")
        empty = [n for n, d in datasets.items() if not isinstance(d, SampleStream) and len(d) == 0]
        if empty:
            raise DataError(f"data set {empty[0]} has no samples")
        if any(not (r >= 0 and r < float("inf")) for r in ratios.values()) or not sum(ratios.values()) > 0:
            raise DataError(f"sample ratios must be finite, at least 0 and not all 0: {ratios}")
        self.datasets, self.pad_id, self.rank, self.world = datasets, pad_id, rank, world
        self.names = sorted(datasets)
        total = sum(ratios.values())
        self.weights = [ratios[n] / total for n in self.names]
        self.rng = random.Random(seed)
        self.orders = {n: [] for n in self.names}

    def _next_indices(self, name: str) -> list[int]:
        order, size = self.orders[name], self.batch_sizes[name]
        while len(order) < size:
            perm = list(range(len(self.datasets[name])))
            self.rng.shuffle(perm)
            order.extend(perm)
        batch, self.orders[name] = order[:size], order[size:]
        return batch

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        unusable = {n: 0 for n in self.names}          # draws in a row that gave no sample
        while True:
            name = self.rng.choices(self.names, self.weights)[0]
            dataset = self.datasets[name]
            if isinstance(dataset, SampleStream):       # this rank's shards: its share, every sample usable
                yield name, collate(dataset.take(len(range(self.rank, self.batch_sizes[name], self.world))), self.pad_id)
                continue
            items = [dataset[i] for i in self._next_indices(name)]
            unusable[name] = 0 if any(it is not None for it in items) else unusable[name] + len(items)
            if unusable[name] >= self.UNUSABLE_LIMIT:
                skipped = getattr(dataset, "skipped", None) or ["?"]
                raise DataError(f"data set {name}: none of the last {unusable[name]} samples drawn could be used "
                                f"(e.g. {skipped[-1]}); is --image-root right?")
            batch = collate(items, self.pad_id)
            if batch is not None:
                yield name, {k: v[self.rank::self.world] for k, v in batch.items()}

    def stream_states(self) -> dict[str, dict]:
        """Where this rank's streams stand (each rank reads its own shards: a checkpoint keeps every rank's)."""
        return {n: d.state_dict() for n, d in self.datasets.items() if isinstance(d, SampleStream)}

    def state_dict(self, streams_per_rank: list[dict[str, dict]] | None = None) -> dict:
        return {"rng": self.rng.getstate(), "orders": self.orders,
                "streams": streams_per_rank if streams_per_rank is not None else [self.stream_states()]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.orders = {k: list(v) for k, v in state["orders"].items()}
        streams = state.get("streams", [{}])
        if self.stream_states() and len(streams) != self.world:
            raise DataError(f"the checkpoint's streams were read by {len(streams)} rank(s), this run has {self.world}: "
                            f"resume with the same number of ranks")
        for name, position in (streams[self.rank] if self.rank < len(streams) else {}).items():
            self.datasets[name].load_state_dict(position)


# ----------------------------------------------------------------------------------------------------------------------
# The shapes world: a deterministic, procedurally drawn world that exercises every task

KINDS = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (245, 130, 20)}
SIZES = {"small": 0.2, "large": 0.34}          # side of the shape's box, as a fraction of the image
RELATIONS = ("left of", "right of", "above", "below")   # a position question's, judged by the boxes' centres
NUMBERS = ("zero", "one", "two", "three", "four")
BACKGROUND = (232, 232, 232)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    box: tuple[float, float, float, float]     # x1, y1, x2, y2 as fractions of the image

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def contains(self, x: float, y: float) -> bool:
        """Is the point (fractions of the image) inside the drawn shape?"""
        x1, y1, x2, y2 = self.box
        if not (x1 <= x <= x2 and y1 <= y <= y2):
            return False
        u, v = (x - x1) / (x2 - x1), (y - y1) / (y2 - y1)          # 0..1 inside the box
        if self.kind == "circle":
            return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
        if self.kind == "triangle":
            return abs(u - 0.5) <= v / 2
        if self.kind == "diamond":
            return abs(u - 0.5) + abs(v - 0.5) <= 0.5
        return True

    def cell_candidates(self, grid: int, margin: float = 0.04) -> list[int]:
        """The cells of a grid x grid (row by row) that may hold this shape: the one of its centre first, then, when
        the centre is within `margin` of a cell border, the cells on the other side. A query's idea of where a
        centre lies is a little blurred; at a border either neighbour may fairly claim the shape."""
        def along(v: float) -> list[int]:         # the centre's row (or column), then a neighbour within margin
            home = min(int(v * grid), grid - 1)
            return [home] + [i for i in {int((v - margin) * grid), int((v + margin) * grid)} if 0 <= i < grid and i != home]
        cx, cy = self.centre
        return [r * grid + c for r in along(cy) for c in along(cx)]

    def region(self) -> str:
        x, y = self.centre
        v = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else "middle"
        h = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "centre"
        if (v, h) == ("middle", "centre"):
            return "in the centre"
        if v == "middle":
            return f"on the {h}"
        return f"at the {v}" if h == "centre" else f"at the {v} {h}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    size: int = 64                 # pixels the scene is rendered at

    def cells(self, grid: int, rng: random.Random | None = None) -> list[Shape | None]:
        """The scene on a grid x grid of cells, row by row: each cell holds the shape whose centre lies in it (two
        centres in one cell are rare; the first shape keeps it). The tiny Q-Former's queries read the picture this
        way (one query per cell), and stage 0's language curriculum writes scenes this way. With rng, a shape near a
        cell border goes to one of its cell_candidates at random, as the queries may read it on either side."""
        cells: list[Shape | None] = [None] * grid * grid
        for s in self.shapes:
            candidates = s.cell_candidates(grid)
            if rng is not None:
                rng.shuffle(candidates)
            j = next((c for c in candidates if cells[c] is None), None)
            if j is not None:
                cells[j] = s
        return cells

    def text(self, grid: int) -> str:
        """The scene written out in words, cell by cell: each shape's size, colour, kind and box."""
        return "; ".join(f"{s.size} {s.name} {format_box(s.box)}" for s in self.cells(grid) if s is not None)

    def key(self) -> str:
        """A canonical description: two scenes with the same key are the same picture."""
        return ";".join(f"{s.kind},{s.colour},{s.size},{','.join(f'{v:.3f}' for v in s.box)}" for s in self.shapes)

    def render(self, size: int | None = None) -> Image.Image:
        """Drawn at 4x and downsampled, so edges are anti-aliased and the picture is the same on every machine."""
        size = size or self.size
        big = 4 * size
        img = Image.new("RGB", (big, big), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for s in self.shapes:
            x1, y1, x2, y2 = (v * big for v in s.box)
            colour = COLOURS[s.colour]
            if s.kind == "circle":
                draw.ellipse((x1, y1, x2, y2), fill=colour)
            elif s.kind == "square":
                draw.rectangle((x1, y1, x2, y2), fill=colour)
            elif s.kind == "triangle":
                draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)
            elif s.kind == "diamond":
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=colour)
        return img.resize((size, size), Image.BOX)


def pixels_of(scenes: Sequence["Scene"], size: int) -> torch.Tensor:
    """A batch of scenes rendered at size px and preprocessed: (B, 3, size, size)."""
    return torch.stack([preprocess(s.render(size), size) for s in scenes])


def _plural(kind: str, n: int) -> str:
    return kind if n == 1 else kind + "s"


def _list_phrase(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class ShapesWorld:
    """From one seed: scenes of 1-4 shapes (each colour-kind pair at most once, so every shape has a unique name),
    routed to train / val / test by a hash of the picture itself, so the splits never share a scene."""

    SPLITS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}

    def __init__(self, seed: int = 0, image_size: int = 64):
        self.seed, self.image_size = seed, image_size
        self._drawn: dict[str, list[Scene]] = {}      # split -> its longest list of scenes drawn so far

    def _random_scene(self, rng: random.Random) -> Scene:
        n = rng.randint(1, 4)
        pairs = rng.sample([(k, c) for k in KINDS for c in COLOURS], n)
        shapes: list[Shape] = []
        for kind, colour in pairs:
            for _ in range(100):          # rejection sampling: no overlaps, a small gap between shapes
                size = rng.choice(list(SIZES))
                side = SIZES[size]
                x, y = rng.uniform(0.02, 0.98 - side), rng.uniform(0.02, 0.98 - side)
                box = (round(x, 3), round(y, 3), round(x + side, 3), round(y + side, 3))
                if all(box[2] + 0.03 < o.box[0] or o.box[2] + 0.03 < box[0] or box[3] + 0.03 < o.box[1]
                       or o.box[3] + 0.03 < box[1] for o in shapes):
                    shapes.append(Shape(kind, colour, size, box))
                    break
        shapes.sort(key=lambda s: (s.centre[0], s.centre[1]))     # left to right: captions read in that order
        return Scene(tuple(shapes), self.image_size)

    def scenes(self, split: str, n: int) -> list[Scene]:
        """The first n scenes of a split; the same seed always gives the same scenes. Drawn once and kept: stage 4
        asks several tasks of the same scenes."""
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {sorted(self.SPLITS)}")
        if len(self._drawn.get(split, ())) < n:
            buckets = self.SPLITS[split]
            rng = random.Random(f"shapes-world-{self.seed}")
            out: list[Scene] = []
            while len(out) < n:
                scene = self._random_scene(rng)
                if int(hashlib.sha256(scene.key().encode()).hexdigest(), 16) % 10 in buckets:
                    out.append(scene)
            self._drawn[split] = out
        return self._drawn[split][:n]

    # ---- texts

    @staticmethod
    def caption(scene: Scene, rng: random.Random) -> str:
        """A short caption (stages 1-2): the shapes from left to right."""
        names = [f"a {s.size} {s.name}" for s in scene.shapes]
        template = rng.choice(["{}", "a picture of {}", "an image with {}", "{} on a grey background"])
        return template.format(_list_phrase(names))

    @staticmethod
    def description(scene: Scene) -> str:
        """A detailed description (stage 3): how many shapes, then each with its size, colour and place."""
        n = len(scene.shapes)
        head = "There is one shape in the image." if n == 1 else f"There are {NUMBERS[n]} shapes in the image."
        parts = [f"A {s.size} {s.name} {s.region()}." for s in scene.shapes]
        return " ".join([head] + parts)

    VQA_TYPES = ("count", "count_kind", "exists", "colour", "shape", "position")

    @staticmethod
    def vqa_types(scene: Scene) -> list[str]:
        """The question types a scene can be asked: a colour question needs a kind that occurs once (else "the
        square" names no one shape), a shape question a colour that occurs once, a position question two shapes."""
        kinds = [s.kind for s in scene.shapes]
        colours = [s.colour for s in scene.shapes]
        options = ["count", "count_kind", "exists"]
        if any(kinds.count(k) == 1 for k in kinds):
            options.append("colour")
        if any(colours.count(c) == 1 for c in colours):
            options.append("shape")
        if len(scene.shapes) >= 2:
            options.append("position")
        return options

    @staticmethod
    def vqa(scene: Scene, rng: random.Random, qtype: str | None = None) -> tuple[str, str, str]:
        """One free-form question, its answer and its type: colour, shape, count (of all shapes or of one kind),
        existence (yes / no) or relative position (yes / no); of type `qtype` if given, else of a random one."""
        shapes = scene.shapes
        kinds = [s.kind for s in shapes]
        colours = [s.colour for s in shapes]
        options = ShapesWorld.vqa_types(scene)
        if qtype is not None and qtype not in options:
            raise ValueError(f"a scene of {len(shapes)} shapes cannot be asked a {qtype!r} question")
        q = qtype or rng.choice(options)
        if q == "count":
            return "how many shapes are there?", str(len(shapes)), q
        if q == "count_kind":
            kind = rng.choice(KINDS)
            return f"how many {kind}s are there?", str(kinds.count(kind)), q
        if q == "exists":
            if rng.random() < 0.5:
                s = rng.choice(shapes)
                return f"is there a {s.name}?", "yes", q
            absent = [(k, c) for k in KINDS for c in COLOURS if (k, c) not in {(s.kind, s.colour) for s in shapes}]
            k, c = rng.choice(absent)
            return f"is there a {c} {k}?", "no", q
        if q == "colour":
            s = rng.choice([s for s in shapes if kinds.count(s.kind) == 1])
            return f"what color is the {s.kind}?", s.colour, q
        if q == "shape":
            s = rng.choice([s for s in shapes if colours.count(s.colour) == 1])
            return f"what shape is the {s.colour} one?", s.kind, q
        a, b = rng.sample(list(shapes), 2)
        return *ShapesWorld.position_question(a, b, rng.choice(RELATIONS)), q

    @staticmethod
    def position_question(a: Shape, b: Shape, relation: str) -> tuple[str, str]:
        """Is a left of / right of / above / below b? Judged by the boxes' centres."""
        (ax, ay), (bx, by) = a.centre, b.centre
        truth = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]
        return f"is the {a.name} {relation} the {b.name}?", "yes" if truth else "no"

    def task_sample(self, scene: Scene, task: str, rng: random.Random, shape: Shape | None = None) -> Sample:
        """A stage-4 sample for one of the six task identifiers, about `shape` where the task names one (default:
        one drawn at random)."""
        s = shape or rng.choice(scene.shapes)
        if task == "[vqa]":
            q, a, kind = self.vqa(scene, rng)
            return Sample(scene, [(q, a)], task, {"answers": [a], "qtype": kind})
        if task == "[caption]":
            return Sample(scene, [("briefly describe the image", self.caption(scene, rng))], task)
        if task == "[refer]":
            return Sample(scene, [(f"give me the location of the {s.name}", format_box(s.box))], task,
                          {"box": parse_boxes(format_box(s.box))[0]})
        if task == "[identify]":
            # Where another shape has the asked one's colour, the colour does not single it out (its kind must come
            # from what the box points to), and models name the other's kind far more often there (docs/stage4.md,
            # section 20): the report gives these questions a row of their own.
            case = "colour shared" if s in self.shared_colour(scene) else "colour alone"
            return Sample(scene, [(f"what object is in this location {format_box(s.box)}", s.name)], task,
                          {"answers": [s.name], "qtype": case})
        if task == "[grounding]":
            text = " and ".join(f"<p>a {t.size} {t.name}</p> {format_box(t.box)}" for t in scene.shapes)
            return Sample(scene, [("describe the image", text)], task)
        if task == "[detection]":
            boxes = "<delim>".join(format_box(t.box) for t in scene.shapes if t.kind == s.kind)
            return Sample(scene, [(f"{s.kind}s", f"<p>{s.kind}</p> {boxes}")], task)
        raise PromptError(f"unknown task identifier {task!r}; expected one of {', '.join(TASKS)}")

    # ---- data sets per stage

    def samples(self, stage: int, split: str, n: int, seed: int = 0) -> list[Sample]:
        """n samples for a stage: captions (1-2), detailed descriptions (3), the six tasks mixed (4)."""
        rng = random.Random(f"{self.seed}-{stage}-{split}-{seed}")
        out = []
        for scene in self.scenes(split, n):
            if stage in (1, 2):
                out.append(Sample(scene, [(CAPTION_INSTRUCTION, self.caption(scene, rng))]))
            elif stage == 3:
                instruction = rng.choice(["Describe this image in detail.", "Tell me what you see in this picture.",
                                          "Give a detailed description of the image."])
                out.append(Sample(scene, [(instruction, self.description(scene))]))
            elif stage == 4:
                out.append(self.task_sample(scene, rng.choice(TASKS), rng))
            else:
                raise ValueError(f"stage must be 1-4, got {stage}")
        return out

    def curriculum(self, split: str, n: int, seed: int = 0, conversations: int = 3) -> list[tuple[int, Sample]]:
        """Stage 0's language curriculum: for each of n scenes, (stage, sample) pairs of every kind the stages will
        ask about it. What lists the whole scene comes alone: a caption (stage 1 or stage 4's [caption]), a detailed
        description (3), the [grounding] text (4). The short answers, where the hard part is finding the shape a
        question means, come as `conversations` conversations in a random order (4; the task identifier in each
        turn): two [vqa] questions, [refer] and [identify] about two different shapes, [detection], so that one
        reading of the scene serves five answers and no answer gives away another."""
        rng = random.Random(f"{self.seed}-curriculum-{split}-{seed}")
        out = []
        for scene in self.scenes(split, n):
            caption = self.task_sample(scene, "[caption]", rng)
            out.append((4, caption) if rng.random() < 0.5 else (1, Sample(scene, [(CAPTION_INSTRUCTION, caption.turns[0][1])])))
            out.append((3, Sample(scene, [("Describe this image in detail.", self.description(scene))])))
            out.append((4, self.task_sample(scene, "[grounding]", rng)))
            for _ in range(conversations):
                a, b = rng.sample(scene.shapes, 2) if len(scene.shapes) > 1 else (scene.shapes[0], None)
                turns = [self.task_sample(scene, "[vqa]", rng), self.task_sample(scene, "[vqa]", rng),
                         self.task_sample(scene, "[refer]", rng, shape=a), self.task_sample(scene, "[detection]", rng)]
                if b is not None:
                    turns.append(self.task_sample(scene, "[identify]", rng, shape=b))
                rng.shuffle(turns)
                out.append((4, Sample(scene, [(f"{t.task} {t.turns[0][0]}", t.turns[0][1]) for t in turns])))
        return out

    # Stage 0's second lesson: questions the curriculum leaves near chance (is there a ..., is A left of B, and the
    # colour and count-of-a-kind ones that those lessons would otherwise crowd out; which shape is in this box),
    # many about one scene at a time. A yes / no position question is answered from two boxes' edges in the right
    # order, an [identify] question by finding the shape whose box has these numbers; the LM learns either only
    # from tens of thousands of such questions (docs/stage4.md).
    DRILL_TYPES = {"exists": 1, "position": 2, "colour": 1, "count_kind": 1, "identify": 6}    # type -> weight

    def question_drill(self, split: str, n: int, seed: int = 0, per_scene: int = 6) -> list[tuple[int, Sample]]:
        """For each of n scenes one stage-4 conversation of `per_scene` questions, each of a type drawn from
        DRILL_TYPES by weight among those the scene can be asked: [vqa] questions, and [identify] where the scene
        has two shapes (with one, the answer needs no box)."""
        rng = random.Random(f"{self.seed}-drill-{split}-{seed}")
        out = []
        for scene in self.scenes(split, n):
            allowed = self.vqa_types(scene) + (["identify"] if len(scene.shapes) >= 2 else [])
            types = [t for t in self.DRILL_TYPES if t in allowed]
            turns, named = [], []
            for qtype in rng.choices(types, [self.DRILL_TYPES[t] for t in types], k=per_scene):
                if qtype == "identify":       # a shape not asked about yet, so that no answer repeats an earlier one
                    shape = rng.choice([t for t in scene.shapes if t not in named] or scene.shapes)
                    named.append(shape)
                    s = self.task_sample(scene, "[identify]", rng, shape=shape)
                    turns.append((f"[identify] {s.turns[0][0]}", s.turns[0][1]))
                else:
                    q, a, _ = self.vqa(scene, rng, qtype)
                    turns.append((f"[vqa] {q}", a))
            out.append((4, Sample(scene, turns)))           # each turn names its task, as the curriculum's
        return out

    # Stage 0's last lesson (its same_kind part): the LM finds a shape by its kind (the lookup phase taught it
    # so), and when two shapes share a kind it hardly uses the colour word to choose between them: [refer] found such
    # a shape 0.30 of the time where it found one alone of its kind 0.92 (docs/stage4.md, section 10). So the drill
    # again, half its questions in such scenes about a shape of the shared kind: where it is, or where it lies
    # against another shape.

    @staticmethod
    def shared_kind(scene: Scene) -> list[Shape]:
        """The shapes of a scene that share their kind with another: only their colour tells them apart."""
        kinds = [s.kind for s in scene.shapes]
        return [s for s in scene.shapes if kinds.count(s.kind) > 1]

    @staticmethod
    def shared_colour(scene: Scene) -> list[Shape]:
        """The shapes of a scene that share their colour with another: only their kind (and box) tells them apart."""
        colours = [s.colour for s in scene.shapes]
        return [s for s in scene.shapes if colours.count(s.colour) > 1]

    def same_kind_sample(self, scene: Scene, rng: random.Random) -> Sample:
        """A [refer] or a position question (even odds) about a shape that shares its kind with another."""
        t = rng.choice(self.shared_kind(scene))
        if rng.random() < 0.5:
            return self.task_sample(scene, "[refer]", rng, shape=t)
        other = rng.choice([s for s in scene.shapes if s is not t])
        a, b = (t, other) if rng.random() < 0.5 else (other, t)
        q, answer = self.position_question(a, b, rng.choice(RELATIONS))
        return Sample(scene, [(q, answer)], "[vqa]", {"answers": [answer], "qtype": "position"})

    def same_kind_drill(self, split: str, n: int, seed: int = 0, asked: int = 3) -> list[tuple[int, Sample]]:
        """question_drill's conversations, `asked` of the questions of each (at random turns) replaced, in a scene
        with two shapes of one kind, by same_kind_sample's."""
        rng = random.Random(f"{self.seed}-same-kind-{split}-{seed}")
        out = []
        for stage, sample in self.question_drill(split, n, seed):
            turns = list(sample.turns)
            if self.shared_kind(sample.image):
                for i in rng.sample(range(len(turns)), asked):
                    t = self.same_kind_sample(sample.image, rng)
                    turns[i] = (f"{t.task} {t.turns[0][0]}", t.turns[0][1])
            out.append((stage, Sample(sample.image, turns)))
        return out

    def same_kind_questions(self, split: str, n: int, seed: int = 0) -> list[Sample]:
        """n same_kind_sample's, one for each of the first scenes of the split with two shapes of one kind."""
        rng = random.Random(f"{self.seed}-same-kind-questions-{split}-{seed}")
        scenes = [s for s in self.scenes(split, 8 * n) if self.shared_kind(s)][:n]
        if len(scenes) < n:
            raise ValueError(f"fewer than {n} scenes of split {split!r} have two shapes of one kind")
        return [self.same_kind_sample(scene, rng) for scene in scenes]

    def shared_colour_questions(self, split: str, n: int, seed: int = 0) -> list[Sample]:
        """n [identify] samples, each about a shape that shares its colour with another, one for each of the first
        scenes of the split that have one (stage 0's read-out of the case stage 4 gets wrong most: docs/stage4.md,
        section 20)."""
        rng = random.Random(f"{self.seed}-shared-colour-questions-{split}-{seed}")
        scenes = [s for s in self.scenes(split, 8 * n) if self.shared_colour(s)][:n]
        if len(scenes) < n:
            raise ValueError(f"fewer than {n} scenes of split {split!r} have two shapes of one colour")
        return [self.task_sample(scene, "[identify]", rng, shape=rng.choice(self.shared_colour(scene)))
                for scene in scenes]

    def typed_questions(self, qtype: str, split: str, n: int, seed: int = 0) -> list[Sample]:
        """n [vqa] samples of one question type, about the first scenes of the split that can be asked it."""
        rng = random.Random(f"{self.seed}-{qtype}-{split}-{seed}")
        out = []
        for scene in self.scenes(split, 4 * n):          # position needs two shapes: about 3 scenes in 4 have them
            if qtype in self.vqa_types(scene):
                q, a, _ = self.vqa(scene, rng, qtype)
                out.append(Sample(scene, [(q, a)], "[vqa]", {"answers": [a], "qtype": qtype}))
                if len(out) == n:
                    return out
        raise ValueError(f"fewer than {n} scenes of split {split!r} can be asked a {qtype!r} question")

    def task_samples(self, task: str, split: str, n: int, seed: int = 0) -> list[Sample]:
        """n stage-4 samples of one task (for evaluation per task)."""
        rng = random.Random(f"{self.seed}-{task}-{split}-{seed}")
        return [self.task_sample(scene, task, rng) for scene in self.scenes(split, n)]

    def text_corpus(self, split: str, n: int, seed: int = 0) -> list[str]:
        """Text only, for pretraining the tiny language model: every kind of sentence of the world, written the way
        the stages will use it (the templates included), but with no image."""
        rng = random.Random(f"{self.seed}-text-{split}-{seed}")
        lines = []
        for scene in self.scenes(split, n):
            q, a, _ = self.vqa(scene, rng)
            task = self.task_sample(scene, rng.choice(TASKS), rng)
            (ti, ta), = task.turns
            lines.append(self.caption(scene, rng) + "\n")
            lines.append(f"###Human: {IMAGE_PROMPT} Describe this image in detail. ###Assistant: "
                         f"{self.description(scene)}###")
            lines.append(f"[INST] {IMAGE_PROMPT} [vqa] {q} [/INST] {a}###")
            lines.append(f"[INST] {IMAGE_PROMPT} {task.task} {ti} [/INST] {ta}###")
        return lines


def train_tokenizer(corpus: Sequence[str], vocab_size: int):
    """A small byte-level BPE (tokenizers) learnt from corpus, with <|endoftext|> as bos = eos, as Phi-2 has. Byte
    level: any text can be written, a word it never learnt in pieces down to single bytes."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    tok = HFTokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def shapes_corpus(world: ShapesWorld) -> list[str]:
    """The built-in world's text that its tokenizer is learnt from: every kind of sentence, and each stage's samples.
    Each answer follows its prompt's space here, where `encode` tokenizes it apart, so the tokenizer writes an
    answer's first word in pieces ("blue" is b-lu-e; Phi-2's writes it whole). Adding the answers as encode writes
    them would mend that, and retrain every shipped file (docs/stage4.md, section 22)."""
    corpus = world.text_corpus("train", 4000)
    for stage in (1, 3, 4):
        corpus += [" ".join(f"{q} {a}" for q, a in s.turns) for s in world.samples(stage, "train", 1000)]
    return corpus


def train_shapes_tokenizer(world: ShapesWorld, vocab_size: int = 1024):
    """The shapes world's tokenizer (it stops at 613 tokens: the world has no more pairs worth merging)."""
    return train_tokenizer(shapes_corpus(world), vocab_size)


SHAPES_TOKENIZER = ASSETS / "shapes_tokenizer.json"


def shapes_tokenizer() -> Tokenizer:
    """The shipped tokenizer of the shapes world (rebuild it with `python data.py --build-tokenizer`)."""
    return Tokenizer.from_file(SHAPES_TOKENIZER)


def world_words(world: ShapesWorld | None = None, n: int = 300) -> set[str]:
    """The words the tiny language model met in stage 0: those of the built-in world's text."""
    world = world or ShapesWorld(seed=0)
    return {w for line in world.text_corpus("train", n) for w in re.findall(r"[a-z]+", line.lower())}


def vocabulary_check(texts: Sequence[str], tok: Tokenizer, known: set[str]) -> dict[str, float]:
    """How foreign a user's text is to a tokenizer and a language model: the share of its words the model never
    met, and the share of its letters that the tokenizer can only write one letter at a time (a word cut into
    single letters is a word the tokenizer has not learnt)."""
    words = [w for t in texts for w in re.findall(r"[a-z]+", t.lower())]
    lone = 0
    for w in set(words):
        pieces = [tok.decode([i]).strip() for i in tok.encode(" " + w)]
        if len(pieces) > 1:
            lone += words.count(w) * sum(len(p) == 1 for p in pieces)
    return {"unseen words": sum(w not in known for w in words) / max(1, len(words)),
            "letters in one-letter pieces": lone / max(1, sum(map(len, words)))}


def read_text_file(path: str | Path) -> list[str]:
    """Plain text for stage 0's --text: one text per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"{path}: no text in it")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# A real captioned picture set that can be had offline, for "bring your own pictures" (README, WORKSHOP.md):
# the npm package emoji-datasource-google holds Noto Color Emoji (Apache 2.0) as 64 px PNGs (RGBA, transparent
# around the drawing) and emoji.json with each one's Unicode name, category and subcategory.

EMOJI_CATEGORIES = ("Animals & Nature", "Food & Drink", "Travel & Places", "Activities", "Objects")   # things


def emoji_caption(record: dict) -> str:
    """One line from the package's own fields: what kind of thing it is, then its name ("drink, teapot"). The kind
    comes first because it is what a picture can tell: a model reads the picture before it writes anything."""
    kind = record["subcategory"].replace("-", " ").replace("&", "and")
    return f"{kind}, {record['name']}".lower()


def holds_captions(path: Path) -> bool:
    """A JSON list of {"image", "caption"} rows, as write_emoji_captions writes."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and {"image", "caption"} <= set(r) for r in rows)


CAPTIONS_FILE = ("captions file", holds_captions)


def write_emoji_captions(package: str | Path, out: str | Path, test_every: int = 8) -> dict[str, int]:
    """Copy the pictures of everyday things (EMOJI_CATEGORIES, 857 in version 16.0.0) to OUT/images and write
    OUT/train.json and OUT/test.json in the captions format, every test_every-th picture held out."""
    package, out = Path(package), Path(out)
    index = package / "emoji.json"
    if not index.is_file():
        raise UserError(f"{index}: not found; unpack the npm package first (npm pack emoji-datasource-google@16.0.0 "
                        f"&& tar xzf emoji-datasource-google-16.0.0.tgz gives the folder `package`)")
    records = sorted((r for r in json.loads(index.read_text()) if r["category"] in EMOJI_CATEGORIES
                      and r.get("has_img_google") and (package / "img/google/64" / r["image"]).is_file()),
                     key=lambda r: r["sort_order"])
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for i, r in enumerate(records):
        (out / "images" / r["image"]).write_bytes((package / "img/google/64" / r["image"]).read_bytes())
        splits["test" if i % test_every == test_every - 1 else "train"].append(
            {"image": f"images/{r['image']}", "caption": emoji_caption(r)})
    for name, rows in splits.items():
        (out / f"{name}.json").write_text(json.dumps(rows, indent=0) + "\n")
    return {name: len(rows) for name, rows in splits.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Preview

STAGE_SAMPLES = {1: "captions (stage 1: no prompt)", 2: "captions (stage 2: no prompt)",
                 3: "detailed descriptions (stage 3: ###Human prompts)", 4: "the six tasks (stage 4: [INST] prompts)"}


def font(size: int):
    """Pillow's bundled scalable font (its bitmap default loses the spaces between words at small sizes)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                 # Pillow before 10.1
        return ImageFont.load_default()


def preview(path: str | Path, n: int = 12, stage: int = 4, seed: int = 0, scale: int = 3) -> Path:
    """A sheet of samples with their full texts and boxes drawn, titled with what they are, so a student can see
    the data a stage trains on."""
    samples = ShapesWorld().samples(stage, "train", n, seed=seed)
    cell, cols, pad, line_h = 64 * scale, 4, 10, 15
    text_font, title_font = font(12), font(16)
    texts = []
    for s in samples:
        question, answer = s.turns[0]
        text = f"{s.task + ' ' if s.task else ''}{question or '(no prompt)'}\n-> {answer}"
        texts.append([w for part in text.split("\n") for w in textwrap.wrap(part, 30) or [""]])
    rows = (n + cols - 1) // cols
    text_h = line_h * max(len(t) for t in texts) + pad
    title_h = 34
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, title_h + rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), f"the built-in shapes world: {STAGE_SAMPLES[stage]}, {n} training samples (seed {seed})",
              fill=(0, 0, 0), font=title_font)
    for i, (s, lines) in enumerate(zip(samples, texts)):
        x0, y0 = pad + (i % cols) * (cell + pad), title_h + (i // cols) * (cell + text_h)
        img = s.image.render().resize((cell, cell), Image.NEAREST)
        d = ImageDraw.Draw(img)
        for box in parse_boxes(" ".join(s.turns[0])):
            d.rectangle([v * cell / 100 for v in box], outline=(0, 0, 0), width=2)
        sheet.paste(img, (x0, y0))
        for k, line in enumerate(lines):
            draw.text((x0, y0 + cell + 3 + k * line_h), line, fill=(0, 0, 0), font=text_font)
    sheet.save(path)
    return Path(path)


@dataclass
class DataConfig:
    preview: bool = False           # draw a sheet of 12 samples of --stage, with their texts and boxes (to --out)
    out: str = ""                   # where --preview writes its sheet (default out/shapes_stage{--stage}.png)
    stage: int = 4                  # the samples of which stage: 1-2 captions, 3 descriptions, 4 the six tasks
    scene: str = ""                 # write one held-out scene of the shapes world to this PNG and print what is in it
    seed: int = 0                   # which scene (--scene), or which samples (--preview)
    build_tokenizer: bool = False   # retrain the shapes world's tokenizer and write assets/shapes_tokenizer.json
    emoji: str = ""                 # an unpacked emoji-datasource-google npm package: write its everyday things as captions
    emoji_out: str = "emoji"        # where --emoji writes images/, train.json and test.json

    CHOICES: ClassVar[dict[str, tuple]] = {"stage": (1, 2, 3, 4)}
    LIMITS: ClassVar[dict[str, tuple]] = {"seed": (0, None)}


def write_scene(path: str | Path, seed: int = 0, size: int = 256) -> Scene:
    """The seed-th scene of the held-out test split, drawn at `size` px, to ask the model about."""
    scene = ShapesWorld().scenes("test", seed + 1)[seed]
    scene.render(size).save(path)
    return scene


def scene_truth(scene: Scene) -> str:
    """What is in a scene, and questions a stage-4 model answers about it, with the answers it should give."""
    lines = [ShapesWorld.description(scene)]
    lines += [f"  {s.size:<5} {s.name:<16} {s.region():<22} box {format_box(s.box)}" for s in scene.shapes]
    rng = random.Random(0)
    s = scene.shapes[0]
    asks = [("[vqa]", *ShapesWorld.vqa(scene, rng)[:2]), ("[vqa]", "how many shapes are there?", str(len(scene.shapes))),
            ("[refer]", f"give me the location of the {s.name}", format_box(s.box)),
            ("[identify]", f"what object is in this location {format_box(s.box)}", s.name)]
    lines.append("to ask a stage-4 model (python tinyvlm.py --image FILE --task TASK \"QUESTION\"), with the true answers:")
    lines += [f"  --task {t:<11} \"{q}\"  ->  {a}" for t, q, a in asks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import cli
    args = cli.config_from_args(DataConfig, cli.parser_for(DataConfig, __doc__).parse_args(argv))
    if not (args.build_tokenizer or args.preview or args.scene or args.emoji):
        raise UserError("nothing to do: pass --preview, --scene FILE, --emoji PACKAGE or --build-tokenizer (see --help)")
    if args.emoji:
        for split in ("train", "test"):     # a folder of the user's own may hold files of these names
            cli.writable_file(Path(args.emoji_out) / f"{split}.json", "--emoji-out", CAPTIONS_FILE)
        counts = write_emoji_captions(args.emoji, cli.writable_folder(args.emoji_out, "--emoji-out"))
        print(f"wrote {args.emoji_out}/images ({sum(counts.values())} pictures), {args.emoji_out}/train.json "
              f"({counts['train']}) and {args.emoji_out}/test.json ({counts['test']})")
    if args.build_tokenizer:
        ASSETS.mkdir(exist_ok=True)
        train_shapes_tokenizer(ShapesWorld()).save(str(SHAPES_TOKENIZER))
        print(f"wrote {SHAPES_TOKENIZER} ({len(shapes_tokenizer())} tokens)")
    if args.preview:
        out = args.out or f"out/shapes_stage{args.stage}.png"     # one file per stage: a sheet does not hide another
        print(f"wrote {preview(cli.writable_file(out, '--out', PICTURE), stage=args.stage, seed=args.seed)}")
    if args.scene:
        scene = write_scene(cli.writable_file(args.scene, "--scene", PICTURE), args.seed)
        print(f"wrote {args.scene}: test scene {args.seed}\n{scene_truth(scene)}")


if __name__ == "__main__":
    import cli
    cli.run(main)
