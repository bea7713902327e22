"""
chat.py: ask tinyvlm about an image, from the command line (`python tinyvlm.py ...` runs this too).

    python tinyvlm.py --image scene.png "what shape is the purple one?"
    python tinyvlm.py --image scene.png --chat
    python tinyvlm.py --image scene.png --attention attention.png "how many shapes are there?"

The newest out/stageN/model.safetensors is used by default, with that stage's prompt template.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

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


# ----------------------------------------------------------------------------------------------------------------------
# Command line: ask the model about an image

def parse_args(argv: list[str] | None):
    import argparse
    p = argparse.ArgumentParser(description="Ask tinyvlm about an image (streams the answer).")
    p.add_argument("question", nargs="?", default="", help="the question (or instruction); empty with --chat")
    p.add_argument("--image", required=True)
    p.add_argument("--task", default="", help="stage-4 task identifier, e.g. [vqa] [caption] [refer] [identify]")
    p.add_argument("--chat", action="store_true", help="multi-turn: read questions from the terminal")
    p.add_argument("--checkpoint", default="", help="a train.py checkpoint (default: the newest out/stageN)")
    p.add_argument("--quantized", default="", help="a quantize.py output to run instead")
    p.add_argument("--quantize", choices=("int8", "int4", "fp16"), help="quantize the language model on the fly")
    p.add_argument("--phi", default=""), p.add_argument("--blip2", default=""), p.add_argument("--tokenizer", default="")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (TinyGPT-V's demo: 1.0 with --top-p 0.9)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draw", default="", help="draw the boxes of the answer onto the image, save here")
    p.add_argument("--attention", default="", help="save a picture of where the Q-Former's queries look")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def load_model(args) -> tuple[tv.TinyVLM, data.Tokenizer, int, int]:
    """The model to ask, its tokenizer, the stage it was trained for (its prompt template) and its image size:
    a train.py checkpoint (the newest out/stageN by default), quantized on the fly if asked, or a quantize.py file."""
    checkpoint = args.checkpoint or next((str(c) for c in sorted(Path("out").glob("stage[1-4]/model.safetensors"),
                                                                   reverse=True)), "")
    if not (checkpoint or args.quantized):
        raise SystemExit("no trained model found: run `python train.py --stage 1` (and on to 4), or pass --checkpoint")
    if args.quantized:
        model = quantize.load_quantized(args.quantized)
        tok = data.Tokenizer.from_file(args.tokenizer) if args.tokenizer else data.shapes_tokenizer()
        return model.eval(), tok, model.trained_for["stage"], model.trained_for["image_size"]
    stage = int(weights.read_metadata(checkpoint).get("stage", "4"))
    cfg = train.resolve(train.TrainConfig(stage=stage, init=checkpoint, phi=args.phi, blip2=args.blip2,
                                          tokenizer=args.tokenizer))
    model, _ = train.build_model(cfg, torch.device(args.device))
    if args.quantize:
        model = quantize.quantize_model(model, args.quantize, ("phi",), group=64 if model.cfg.phi.hidden % 128 else 128)
    return model.eval(), train.build_tokenizer(cfg), stage, cfg.image_size


def ask(model: tv.TinyVLM, tok: data.Tokenizer, stage: int, features: torch.Tensor, turns: list[tuple[str, str]],
        question: str, task: str | None, args, generator: torch.Generator) -> str:
    """One answer to `question` after the earlier turns, printed as it is generated; returns its text."""
    sample = data.Sample(None, turns + [(question, "")], task if stage == 4 else None)
    ids, _ = data.encode(sample, tok, stage, model.cfg.num_image_tokens, max_len=10 ** 9)
    ids = ids[:-len(tok.encode(data.END[stage]))]             # everything up to where the answer starts
    if len(ids) + args.max_new_tokens > model.cfg.phi.max_positions:
        raise SystemExit(f"error: the conversation ({len(ids)} tokens) is too long for the model")
    answer_ids, shown = [], ""
    stream = model.generate_stream(None, torch.tensor([ids], device=args.device), features=features,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                   eos_token_id=tok.eos_id, stop_strings=(data.END[stage],), decode=tok.decode,
                                   generator=generator)
    for token, active in stream:
        if active[0]:
            answer_ids.append(int(token[0]))
            text = tok.decode(answer_ids, skip_special_tokens=True).split(data.END[stage])[0]
            print(text[len(shown):], end="", flush=True)
            shown = text
    print()
    return shown.strip()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tok, stage, image_size = load_model(args)
    try:
        image = data.open_image(args.image)
    except data.ImageError as e:
        raise SystemExit(f"error: {e}") from None
    task = args.task or ("[vqa]" if stage == 4 else None)
    if task is not None and task not in data.TASKS:
        raise SystemExit(f"error: unknown task identifier {task!r}; expected one of {', '.join(data.TASKS)}")
    pixels = data.preprocess(image, image_size)[None].to(args.device)
    features = model.visual_features(pixels)              # once: every turn asks about the same picture
    generator = torch.Generator().manual_seed(args.seed)
    turns: list[tuple[str, str]] = []
    while True:
        question = args.question
        if args.chat:
            try:
                question = input("you> ").strip()
            except EOFError:
                break
            if not question:
                break
            print("tinyvlm> ", end="", flush=True)
        turns.append((question, ask(model, tok, stage, features, turns, question, task, args, generator)))
        if not args.chat:
            break
    if args.draw:
        draw_boxes(image, " ".join(a for _, a in turns), args.draw)
        print(f"wrote {args.draw}", file=sys.stderr)
    if args.attention:
        save_attention_picture(model, pixels, image, args.attention)
        print(f"wrote {args.attention}", file=sys.stderr)


def draw_boxes(image, text: str, path: str) -> None:
    """The boxes {<x1><y1><x2><y2>} of an answer (0..100 of the image's sides) drawn onto a copy of the image."""
    from PIL import ImageDraw
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    for box in data.parse_boxes(text):
        draw.rectangle([v / 100 * s for v, s in zip(box, canvas.size * 2)], outline=(255, 0, 0), width=3)
    canvas.save(path)


def save_attention_picture(model: tv.TinyVLM, pixels: torch.Tensor, image, path: str) -> None:
    """One tile per query: the image, tinted by how much that query's cross-attention looks at each patch."""
    from PIL import Image
    attn = qformer_attention(model, pixels)[0].float()                     # (Q, N)
    n_cls = int(model.vit.cls_token is not None)
    side = math.isqrt(attn.shape[1] - n_cls)
    grid = attn[:, n_cls:].reshape(-1, side, side)
    grid = grid / grid.amax(dim=(1, 2), keepdim=True)
    tile = 96
    base = image.convert("RGB").resize((tile, tile))
    cols = math.ceil(math.sqrt(grid.shape[0]))
    sheet = Image.new("RGB", (cols * (tile + 4), math.ceil(grid.shape[0] / cols) * (tile + 4)), (255, 255, 255))
    for j, g in enumerate(grid):
        heat = Image.fromarray((g.numpy() * 255).astype("uint8")).resize((tile, tile), Image.BICUBIC)
        red = Image.merge("RGB", (heat, Image.new("L", heat.size), Image.new("L", heat.size)))
        sheet.paste(Image.blend(base, red, 0.55), ((j % cols) * (tile + 4), (j // cols) * (tile + 4)))
    sheet.save(path)


if __name__ == "__main__":
    main()
