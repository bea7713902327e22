"""
chat.py: ask tinyvlm about an image, from the command line (`python tinyvlm.py ...` runs this too).

    python tinyvlm.py --image scene.png "what shape is the purple one?"
    python tinyvlm.py --image scene.png --chat
    python tinyvlm.py --image scene.png --attention attention.png "how many shapes are there?"
    python tinyvlm.py --image scene.png --lm-attention-at triangle "what color is the triangle?"
    python tinyvlm.py --image scene.png --lm-attention-token 2 --task "[refer]" "give me the location of the triangle"

The newest out/stageN/model.safetensors is used by default, built as it was trained (its config is in its metadata)
and asked with that stage's prompt template; `--help` lists every flag.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import cli
import data
import quantize
import tinyvlm as tv
import train
import weights


# ----------------------------------------------------------------------------------------------------------------------
# Looking inside: where the Q-Former's queries look

@torch.no_grad()
def qformer_attention(model: tv.TinyVLM, pixels: torch.Tensor) -> torch.Tensor:
    """Cross-attention probabilities of every query over the image tokens, averaged over heads and over the
    cross-attention layers: (B, num_queries, num_image_tokens). SDPA does not return its weights, so the inputs of
    each cross-attention are captured and softmax(q k^T / sqrt(hs)) is computed again, plainly."""
    captured = []
    hooks = [layer.cross_attn.register_forward_hook(lambda m, args, out: captured.append((m, *args)))
             for layer in model.qformer.layers if layer.cross_attn is not None]
    try:
        model.visual_features(pixels)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for attn, x, context in captured:
        B, T, C = x.shape
        hs = C // attn.num_heads
        q = attn.query(x).view(B, T, attn.num_heads, hs).transpose(1, 2)                   # (B, nh, T, hs)
        k = attn.key(context).view(B, context.shape[1], attn.num_heads, hs).transpose(1, 2)  # (B, nh, N, hs)
        maps.append((q @ k.transpose(-1, -2) / math.sqrt(hs)).softmax(-1).mean(1))          # (B, T, N)
    return torch.stack(maps).mean(0)


def lm_attention(model: tv.TinyVLM, features: torch.Tensor, ids: list[int], position: int = -1
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Where the language model looks from one position of the prompt, read once more: each layer's attention
    weights of every head over the positions it sees, (nh, position + 1) per layer, and the next-token logits there
    (V,). The default, the last position, is the one whose output is the answer's first token. The weights are
    computed again from each attention's input (PhiAttention.attention_logits)."""
    rows = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda attn, args, out: rows.append(attn.attention_logits(*args[:3], query=position)[0, :, 0]))  # (nh, t)
        for layer in model.phi.layers]
    try:
        with torch.no_grad():
            logits, _ = model(None, torch.tensor([ids], device=features.device), features=features)
    finally:
        for h in hooks:
            h.remove()
    return [r.softmax(-1) for r in rows], logits[0, position].float()


def word_ends(text: str, word: str) -> list[int]:
    """Where each whole-word occurrence of `word` in `text` ends (none for an empty word)."""
    return [m.end() for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text)] if word.strip() else []


def word_position(tok: data.Tokenizer, ids: list[int], question: str, word: str) -> int:
    """The prompt position of the last token of `word`'s last whole-word occurrence in the question (the question's
    own text inside the prompt; where the template changed it, the prompt's last occurrence of the word)."""
    pieces = ["\0" if t == tv.IMAGE_TOKEN else tok.decode([t]) for t in ids]      # an image slot: one character
    ends = list(itertools.accumulate(map(len, pieces)))               # where each token's text ends
    text, asked = "".join(pieces), question.strip()
    start = text.rfind(asked)
    matches = word_ends(text, word)
    inside = [end for end in matches if start >= 0 and start < end <= start + len(asked)]
    if not (inside or matches):
        raise cli.UserError(f"--lm-attention-at {word!r}: no such word in the prompt")
    return bisect.bisect_left(ends, (inside or matches)[-1])            # the token that holds its last letter


def print_lm_attention(loaded: train.Loaded, features: torch.Tensor, ids: list[int], question: str = "",
                       word: str = "", answered: list[int] | None = None) -> None:
    """--lm-attention, on stderr: per layer, the share of the heads' mean weight on the picture's tokens, the one
    position the most decided head chose (with its weight), and the three positions the heads weigh most together;
    from the prompt's last position (the answer's first token), from a word of the question (--lm-attention-at), or
    from the last of the answer's tokens `answered` read after the prompt (the next one's: --lm-attention-token)."""
    answered = answered or []
    ids = ids + answered
    position = word_position(loaded.tok, ids, question, word) if word else len(ids) - 1
    rows, logits = lm_attention(loaded.model, features, ids, position)
    image = torch.tensor(ids[:position + 1]) == tv.IMAGE_TOKEN
    slot = image.long().cumsum(0) - 1                      # image token k: the k-th of the picture's, from 0
    name = lambda j: f"image token {int(slot[j])}" if image[j] else repr(loaded.tok.decode([ids[j]]))
    reads = "the Q-Former's query k, which --attention draws" if loaded.model.cfg.connector == "qformer" else \
        "the ViT's output token k"
    say = lambda text: print(text, file=sys.stderr)
    if word:
        say(f"where the language model looks at the question's word {word!r} ({name(position)}, position {position}),")
    else:
        p = logits.softmax(-1)
        likely = int(p.argmax())
        which = f"token {len(answered) + 1}" if answered else "first token"
        where = f"its token {len(answered)}, {name(position)}" if answered else "the prompt's last"
        say(f"where the language model looks as it picks its answer's {which} ({loaded.tok.decode([likely])!r} "
            f"the most likely, p {float(p[likely]):.2f}),\nfrom position {position} ({where}),")
    say(f"over the {position + 1} positions it sees; {int(image.sum())} of them are the picture's\n"
        f"(image token k: {reads}):")
    say("  layer  on the picture  the most decided head  the three positions the heads weigh most (their mean weight)")
    for i, w in enumerate(rows):
        w = w.cpu()                                        # (nh, t): each head's weights
        mean = w.mean(0)
        top = mean.topk(min(3, len(mean)))
        where = ", ".join(f"{name(int(j))} {float(v):.2f}" for v, j in zip(top.values, top.indices))
        head = int(w.amax(-1).argmax())
        decided = f"{name(int(w[head].argmax()))} {float(w[head].max()):.2f}"
        say(f"  {i:5d}  {float(mean[image].sum()):14.2f}  {decided:>21}  {where}")


# ----------------------------------------------------------------------------------------------------------------------
# Command line: ask the model about an image

@dataclass
class ChatConfig:
    # what to ask
    image: str = ""                 # the picture to ask about (python data.py --scene scene.png writes one)
    task: str = ""                  # a stage-4 model's task identifier (default: [vqa])
    chat: bool = False              # several turns: read questions from the terminal until an empty line
    # the model (default: the newest OUT_DIR/stageN/model.safetensors)
    checkpoint: str = ""            # a model.safetensors written by train.py, or a TinyGPT-V stage .pth (with --phi, --blip2)
    stage: int = 0                  # a TinyGPT-V .pth: the stage it is from (default: the number in its file name)
    out_dir: str = "out"            # where to look for the newest stage when --checkpoint is not given
    quantized: str = ""             # a file written by quantize.py --out, to run instead
    model: str = ""                 # a TinyLLaVA, Imp or llava-hf folder (SigLIP + MLP + Phi), asked its family's way
    family: str = ""                # --model's family when its config.json does not say
    quantize: str = ""              # quantize the language model as it loads: int8, int4 or fp16
    phi: str = ""                   # real weights: the microsoft/phi-2 folder (default: the one it was trained with)
    blip2: str = ""                 # real weights: the Salesforce/blip2-* folder or LAVIS pickle (default: likewise)
    vit: str = ""                   # real weights: LAVIS's eva_vit_g.pth, when --blip2 is a LAVIS pickle
    tokenizer: str = ""             # a tokenizer.json (default: the one it was trained with)
    device: str = "cpu"             # auto: CUDA when present, else the CPU
    # generation (TinyGPT-V's demo: --temperature 1.0 --top-p 0.9 --repetition-penalty 1.05)
    max_new_tokens: int = 64        # the longest answer, in tokens
    temperature: float = 0.0        # 0: greedy (the most likely token each time)
    top_k: int = 0                  # sample from the k most likely tokens only (0: all)
    top_p: float = 1.0              # sample from the smallest set of tokens whose probability reaches p
    repetition_penalty: float = 1.0  # above 1: tokens already generated become less likely
    seed: int = 0                   # of the sampling
    # pictures, and looking inside
    draw: str = ""                  # write the image with the answer's boxes drawn on it to this PNG
    attention: str = ""             # write where the Q-Former's queries look in the image to this PNG
    lm_attention: bool = False      # print where the language model looks as it picks each answer's first token
    lm_attention_at: str = ""       # the same from a word of the question instead (e.g. triangle)
    lm_attention_token: int = 0     # the same as it picks the answer's K-th token (2: a tiny model's first box number)

    CHOICES: ClassVar[dict[str, tuple]] = {"task": data.TASKS, "quantize": ("int8", "int4", "fp16"),
                                           "family": tuple(data.FAMILY_TEMPLATES),
                                           "device": ("auto", "cpu", "cuda")}
    LIMITS: ClassVar[dict[str, tuple]] = {"max_new_tokens": (1, None), "temperature": (0.0, None), "top_k": (0, None),
                                          "top_p": (0.01, 1.0), "repetition_penalty": (0.01, None), "seed": (0, None),
                                          "stage": (0, 4), "lm_attention_token": (0, None)}


def load_model(cfg: ChatConfig, device: torch.device) -> train.Loaded:
    """A quantize.py file, or a trained model (train.load_trained: ours, built as it was trained, or a TinyGPT-V
    stage .pth), quantized as it loads if --quantize says so; on a CPU, public weights in bf16 are packed where
    this CPU streams them faster so (quantize.pack_bf16_layers)."""
    if cfg.model:
        return load_family(cfg, device)
    if cfg.quantized:
        model = quantize.load_quantized(cfg.quantized).to(device)
        stored = model.trained_for["train_config"] or {}
        if model.trained_for["tokenizer"] and not cfg.tokenizer:     # files written since quantize.py kept it
            tok = data.Tokenizer.from_str(model.trained_for["tokenizer"])
        else:
            tok = train.build_tokenizer(train.TrainConfig(tokenizer=cfg.tokenizer or stored.get("tokenizer", ""),
                                                          phi=cfg.phi or stored.get("phi", "")))
        shapes_only = model.cfg.vit.image_size <= 96 and tok.to_str() == data.shapes_tokenizer().to_str()
        return train.Loaded(model.eval(), tok, model.trained_for["stage"], model.trained_for["image_size"],
                            cfg.quantized, shapes_world_only=shapes_only)
    loaded = train.load_trained(cfg.checkpoint, cfg.out_dir, device, phi=cfg.phi, blip2=cfg.blip2, vit=cfg.vit,
                                tokenizer=cfg.tokenizer, stage=cfg.stage)
    if cfg.quantize:
        loaded.model = quantize_language_model(loaded.model, cfg.quantize).eval()
    quantize.pack_bf16_layers(loaded.model)
    return loaded


def quantize_language_model(model: tv.TinyVLM, mode: str) -> tv.TinyVLM:
    """--quantize: the language model's linear layers (groups of 128 columns, 64 where the width is no multiple)."""
    return quantize.quantize_model(model, mode, ("phi",), group=64 if model.cfg.phi.hidden % 128 else 128)


def load_family(cfg: ChatConfig, device: torch.device) -> train.Loaded:
    """A sibling model's folder (weights.load_llava_family), its tokenizer from the folder, quantized as it loads
    if --quantize says so (the language model, as for our own), its bf16 layers packed as load_model's are."""
    if cfg.checkpoint or cfg.quantized:
        raise cli.UserError("--model is a whole model: give it without --checkpoint or --quantized")
    if cfg.chat:
        raise cli.UserError("--chat: the sibling families are asked one question per run here")
    model, facts = weights.load_llava_family(cfg.model, cfg.family or None)
    if cfg.quantize:
        model = quantize_language_model(model, cfg.quantize)
    try:
        tok = data.Tokenizer.from_file(cfg.tokenizer or cfg.model)
    except FileNotFoundError as e:
        raise cli.UserError(f"{e}: give --tokenizer") from None
    model = model.to(device).eval()
    quantize.pack_bf16_layers(model)
    return train.Loaded(model, tok, 4, facts.image_size, cfg.model, family=facts)


STAGE_CAN = {1: "captions only (no prompt): it describes the picture",
             2: "captions only (no prompt): it describes the picture",
             3: "detailed descriptions (###Human prompts): it was taught to describe pictures",
             4: "the six tasks ([INST] prompts): it answers questions, finds and names things"}


def check_request(cfg: ChatConfig, question: str, stage: int) -> str | None:
    """The task to prompt with, after saying (on stderr) what this stage cannot honour; a question that no stage
    could use is an error."""
    note = lambda text: print(f"note: {text}", file=sys.stderr)
    if stage in (1, 2) and question:
        note(f"a stage-{stage} model ignores the question: it was trained on captions with no prompt at all "
             f"(stage 4 answers questions)")
    if stage >= 3 and not question and not cfg.chat:
        raise cli.UserError(f"a stage-{stage} model needs a question or an instruction (or --chat), e.g. "
                            f"\"what shape is the red one?\"")
    if stage == 3 and question:
        note("stage 3 was trained on one kind of instruction, to describe the picture; its answer to another "
             "question rests on what its language model knew before (stage 4 is trained on questions)")
    if cfg.task and stage != 4:
        note(f"--task {cfg.task} needs a stage-4 model; a stage-{stage} one has no task identifiers: ignored")
    if cfg.draw and stage != 4:
        note("--draw: only a stage-4 model writes boxes ([refer], [grounding], [detection]); the picture will have none")
    task = (cfg.task or "[vqa]") if stage == 4 else None
    if question:
        check_question(question, task)
    return task


def check_question(question: str, task: str | None) -> str:
    """A question refused before any work if its prompt cannot be built, or if its box cannot be read."""
    data.check_text(question)
    return question if task is None else data.check_question_boxes(question, task)


def looks_like_the_shapes_world(image) -> bool:
    """Most of a shapes-world picture is its grey background."""
    small = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.int16)
    return (np.abs(small - np.array(data.BACKGROUND)).max(-1) < 12).mean() > 0.4


def prompt_ids(loaded: train.Loaded, turns: list[tuple[str, str]], question: str, task: str | None) -> list[int]:
    """The prompt's tokens: the earlier turns and the question, in the model's template, up to where the answer
    starts."""
    model, tok, stage = loaded.model, loaded.tok, loaded.stage
    if loaded.family:                                        # a sibling model: its own template, one question
        return data.family_prompt(loaded.family.family, question, tok, model.cfg.num_image_tokens)
    sample = data.Sample(None, turns + [(question, "")], task)
    ids, _ = data.encode(sample, tok, stage, model.cfg.num_image_tokens, max_len=10 ** 9,
                         layout=model.cfg.prompt_layout)
    return ids[:-len(tok.encode(data.END[stage]))]


def turns_that_fit(loaded: train.Loaded, turns: list[tuple[str, str]], question: str, task: str | None,
                   cfg: ChatConfig) -> list[tuple[str, str]]:
    """The most recent of the earlier turns that fit in the model's positions beside the question and its answer
    (--max-new-tokens): a long --chat forgets its oldest turns (the picture stays: the template puts it in the first
    turn kept). A question that does not fit alone is an error."""
    room = loaded.model.cfg.phi.max_positions - cfg.max_new_tokens
    for first in range(len(turns) + 1):
        n = len(prompt_ids(loaded, turns[first:], question, task))
        if n <= room:
            return turns[first:]
    positions, bare = room + cfg.max_new_tokens, len(prompt_ids(loaded, [], "", task))
    fixes = [f"give --max-new-tokens {positions - n} or less"] * (n < positions)
    fixes += ["ask a shorter question"] * (n > bare)              # a stage-1 or 2 prompt holds no question
    raise cli.UserError(f"the picture, the template and the question ({n} tokens) and --max-new-tokens "
                        f"{cfg.max_new_tokens} do not fit in the model's {positions} positions: {' or '.join(fixes)}")


def ask(loaded: train.Loaded, features: torch.Tensor, turns: list[tuple[str, str]], question: str, task: str | None,
        cfg: ChatConfig, device, generator: torch.Generator) -> tuple[str, list[int]]:
    """One answer to `question` after the earlier turns (turns_that_fit), printed as it is generated; returns its
    text and the tokens generated (a stop string's or the end token among them)."""
    model, tok, stage = loaded.model, loaded.tok, loaded.stage
    stops = data.FAMILY_STOPS.get(loaded.family.family, ()) if loaded.family else (data.END[stage],)
    ids = prompt_ids(loaded, turns, question, task)
    answer_ids, shown = [], ""
    stream = model.generate_stream(None, torch.tensor([ids], device=device), features=features,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                   top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, eos_token_id=tok.eos_id,
                                   stop_strings=stops, decode=tok.decode, generator=generator)
    for token, active in stream:
        if active[0]:
            answer_ids.append(int(token[0]))
            text = tok.decode(answer_ids, skip_special_tokens=True)
            for stop in stops:
                text = text.split(stop)[0]
            print(text[len(shown):], end="", flush=True)
            shown = text
    print()
    return shown.strip(), answer_ids


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser_for(ChatConfig, __doc__)
    parser.add_argument("question", nargs="*", help="the question or instruction (none with --chat); its words may "
                        "come unquoted, but quotes keep the shell off a ? or *")
    args = parser.parse_args(argv)
    given = " ".join(args.question)                        # the question on the command line, its words rejoined
    cfg = cli.config_from_args(ChatConfig, args)
    if not cfg.image:
        raise cli.UserError("--image is required: the picture to ask about (python data.py --scene scene.png writes one)")
    if cfg.chat and given:
        raise cli.UserError("--chat reads the questions from the terminal: give no question on the command line")
    for flag, path in (("--draw", cfg.draw), ("--attention", cfg.attention)):
        if path:
            cli.writable_file(path, flag, data.PICTURE)
            if Path(path).exists() and Path(path).resolve() == Path(cfg.image).resolve():
                raise cli.UserError(f"{flag} {path} is the picture asked about (--image): the drawing would replace "
                                    f"it; give another file")
    device = cli.device(cfg.device)
    check_question(given, cfg.task or None)              # a typo costs no waiting for the model (again at its stage)
    if cfg.lm_attention_at and cfg.lm_attention_token:
        raise cli.UserError("--lm-attention-at and --lm-attention-token both set: the view is from one position; "
                            "give one of them")
    if cfg.lm_attention_at and not cfg.chat and not word_ends(given, cfg.lm_attention_at):
        raise cli.UserError(f"--lm-attention-at {cfg.lm_attention_at!r}: not a word of the question {given!r}")
    notices: list[str] = []
    image = data.open_image(cfg.image, notices)            # before the model: a wrong path costs no waiting
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    if cfg.model and (cfg.attention or not given):
        raise cli.UserError("--model: give a question" if not given else
                            "--attention draws the Q-Former's queries; a --model family has none (its MLP shows "
                            "every patch)")
    loaded = load_model(cfg, device)
    if cfg.lm_attention_at and not loaded.family and loaded.stage in (1, 2):
        raise cli.UserError(f"--lm-attention-at: a stage-{loaded.stage} model's prompt holds no question (it was "
                            f"trained on captions alone); --lm-attention shows where it looks as it starts one")
    task = None if loaded.family else check_request(cfg, given, loaded.stage)
    turns_that_fit(loaded, [], given, task, cfg)      # a question (or --chat's first) with no room left: an error now
    if loaded.family:
        print(f"model: {loaded.name} ({loaded.family.family}: SigLIP, MLP connector, Phi; "
              f"{loaded.model.cfg.num_image_tokens} image tokens)", file=sys.stderr)
        pad = (127, 127, 127) if loaded.family.pad_to_square else None          # the mean colour, as LLaVA pads
        pixels = data.preprocess(image, loaded.image_size, data.SIGLIP_MEAN, data.SIGLIP_STD, pad)[None].to(device)
    else:
        print(f"model: {loaded.name} (stage {loaded.stage}: {STAGE_CAN[loaded.stage]})", file=sys.stderr)
        if loaded.shapes_world_only and not looks_like_the_shapes_world(image):
            print("note: the tiny model knows only the built-in shapes world; about other pictures it will still talk "
                  "of shapes", file=sys.stderr)
        pixels = data.preprocess(image, loaded.image_size)[None].to(device)
    quantize.pack_weights(loaded.model.phi)       # now, not as a stall after the first token
    features = loaded.model.visual_features(pixels)        # once: every turn asks about the same picture
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    turns: list[tuple[str, str]] = []
    while True:
        question = given
        if cfg.chat:
            try:
                question = input("you> ").strip()
            except EOFError:
                break
            if not question:
                break
            try:
                check_question(question, task)
                kept = turns_that_fit(loaded, turns, question, task, cfg)
            except cli.UserError as e:                      # a mistake costs the question, not the conversation
                print(f"error: {e}", file=sys.stderr)
                continue
            if len(kept) < len(turns):
                print(f"note: the conversation outgrew the model's {loaded.model.cfg.phi.max_positions} positions: "
                      f"it forgets its first {len(turns) - len(kept)} turn(s)", file=sys.stderr)
                turns = kept
            print("tinyvlm> ", end="", flush=True)
        answer, answer_ids = ask(loaded, features, turns, question, task, cfg, device, generator)
        if cfg.lm_attention or cfg.lm_attention_at or cfg.lm_attention_token:
            at = cfg.lm_attention_at if word_ends(question, cfg.lm_attention_at) else ""
            if cfg.lm_attention_at and not at:
                print(f"note: --lm-attention-at {cfg.lm_attention_at!r}: not a word of this question; the view is "
                      f"from the answer's first token", file=sys.stderr)
            k = min(cfg.lm_attention_token, len(answer_ids))
            if k < cfg.lm_attention_token:
                print(f"note: --lm-attention-token {cfg.lm_attention_token}: the answer has {len(answer_ids)} tokens; "
                      f"the view is from where its last was picked", file=sys.stderr)
            print_lm_attention(loaded, features, prompt_ids(loaded, turns, question, task), question, at,
                               answer_ids[:max(k - 1, 0)])
        turns.append((question, answer))
        if not cfg.chat:
            break
    if cfg.draw:
        n = draw_boxes(image, " ".join(a for _, a in turns), cfg.draw)
        print(f"wrote {cfg.draw} ({n} box{'es' if n != 1 else ''})", file=sys.stderr)
    if cfg.attention:
        asked = " / ".join(f'"{q}" -> {a}' for q, a in turns) if turns and turns[0][0] else (turns[0][1] if turns else "")
        save_attention_picture(loaded.model, pixels, image, cfg.attention,
                               f"where each Q-Former query looks ({loaded.name}, stage {loaded.stage}): {asked}")
        print(f"wrote {cfg.attention}", file=sys.stderr)


def draw_boxes(image, text: str, path: str) -> int:
    """The boxes {<x1><y1><x2><y2>} of an answer (0..100 of the image's sides) drawn onto a copy of the image;
    returns how many."""
    from PIL import ImageDraw
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    boxes = data.parse_boxes(text)
    for box in boxes:
        draw.rectangle([v / 100 * s for v, s in zip(box, canvas.size * 2)], outline=(255, 0, 0), width=3)
    canvas.save(path)
    return len(boxes)


def save_attention_picture(model: tv.TinyVLM, pixels: torch.Tensor, image, path: str, title: str = "") -> None:
    """One tile per Q-Former query: the picture, lightened, with a red tint where that query's cross-attention looks
    (one colour scale for all tiles, drawn below them), and the grid cell the query was taught to read (stage 0: a
    query per cell of a sqrt(Q) x sqrt(Q) grid) outlined. The title says what was asked and answered."""
    import numpy as np
    from PIL import Image, ImageDraw
    attn = qformer_attention(model, pixels)[0].float()                     # (Q, N)
    n_cls = int(model.vit.cls_token is not None)
    side = math.isqrt(attn.shape[1] - n_cls)
    heat = attn[:, n_cls:].reshape(-1, side, side)                          # (Q, side, side): over the patches
    top = float(heat.max())
    Q, tile, gap, cols = heat.shape[0], 120, 8, math.ceil(math.sqrt(heat.shape[0]))
    grid = math.isqrt(Q)
    rows = math.ceil(Q / cols)
    width = gap + cols * (tile + gap)
    per_line = max(20, (width - 2 * gap) // 7)               # characters of a 13 px font that fit the width
    lines = [line for part in (title or "").split("\n") for line in textwrap.wrap(part, per_line)]
    head = 12 + 16 * len(lines)
    sheet = Image.new("RGB", (width, head + rows * (tile + 22) + 44), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    small = data.font(11)
    for k, line in enumerate(lines):
        draw.text((gap, 6 + 16 * k), line, fill=(0, 0, 0), font=data.font(13))
    light = np.asarray(image.convert("RGB").resize((tile, tile)), dtype=np.float32) * 0.45 + 255 * 0.55
    red = np.array([220, 20, 20], dtype=np.float32)
    for j in range(Q):
        h = np.asarray(Image.fromarray((heat[j].numpy() / top * 255).astype("uint8")).resize((tile, tile),
                                                                                         Image.BICUBIC),
                       dtype=np.float32)[..., None] / 255
        tinted = Image.fromarray((light * (1 - h) + red * h).clip(0, 255).astype("uint8"))
        x0, y0 = gap + (j % cols) * (tile + gap), head + (j // cols) * (tile + 22)
        sheet.paste(tinted, (x0, y0 + 16))
        cell = tile / grid
        cx, cy = x0 + (j % grid) * cell, y0 + 16 + (j // grid) * cell
        draw.rectangle([cx, cy, cx + cell, cy + cell], outline=(30, 90, 220), width=2)
        draw.text((x0, y0 + 2), f"query {j} (cell {j // grid},{j % grid})", fill=(0, 0, 0), font=small)
    y = head + rows * (tile + 22) + 10                                       # the colour scale
    bar = np.linspace(0, 1, width - 2 * gap, dtype=np.float32)[None, :, None]
    strip = (np.full((1, 1, 3), 255, np.float32) * (1 - bar) + red * bar).repeat(12, axis=0)
    sheet.paste(Image.fromarray(strip.astype("uint8")), (gap, y))
    draw.text((gap, y + 14), "0", fill=(0, 0, 0), font=small)
    label = f"{top:.3f} of a query's attention on one patch (blue: the cell the query reads)"
    draw.text((width - gap - draw.textlength(label, font=small), y + 14), label, fill=(0, 0, 0), font=small)
    sheet.save(path)


if __name__ == "__main__":
    cli.run(main)
