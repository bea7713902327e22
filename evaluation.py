"""
evaluation.py: what a trained model answers on held-out data, and how good that is.

    answers     greedy generation for every sample's first question, batched (left padding, KV cache)
    metrics     VQA accuracy with the official answer normalisation, box IoU, box recall, and on the built-in
                world the share of a picture's shapes that a caption names, beside the same caption scored
                against another picture (what chance looks like)
    report      one table per task
"""

from __future__ import annotations

import re

import torch

import data
import tinyvlm as tv

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#]")


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation, in short: lowercase, punctuation out (a period only when it is not
    a decimal point), number words to digits, articles out, whitespace collapsed."""
    a = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    a = _PUNCT.sub("", a)
    a = re.sub(r"(?!<=\d)(\.)(?!\d)", "", a)
    words = [_NUMBERS.get(w, w) for w in a.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, answers: list[str]) -> float:
    """min(#annotators who gave the prediction / 3, 1) with several answers; exact match with one."""
    p = normalize_answer(prediction)
    truth = [normalize_answer(a) for a in answers]
    if len(truth) == 1:
        return float(p == truth[0])
    return min(truth.count(p) / 3.0, 1.0)


# new tokens to generate per answer in evaluation: captions, detailed descriptions, task answers (TinyGPT-V's
# own evaluation uses 20, enough for short VQA answers and one box)
EVAL_NEW_TOKENS = {1: 32, 2: 32, 3: 96, 4: 48}


def answer_text(tok: data.Tokenizer, tokens: list[int], stage: int) -> str:
    text = tok.decode(tokens, skip_special_tokens=True)
    return text.split(data.END[stage])[0].strip() if data.END[stage].strip() else text.split("\n")[0].strip()


@torch.no_grad()
def generate_answers(model: tv.TinyVLM, tok: data.Tokenizer, dataset, stage: int, device,
                     max_new_tokens: int | None = None, batch_size: int = 64,
                     limit: int | None = None) -> list[str | None]:
    """Greedy answers to the first turn of every sample, or of the first `limit` (left-padded batches, KV cache).
    None for a sample that cannot be asked: its image unreadable, its text holding the image marker, or its prompt
    and answer longer than the model's positions."""
    max_new_tokens = max_new_tokens or EVAL_NEW_TOKENS[stage]
    model.eval()
    samples = dataset.samples[:limit]
    answers: list[str | None] = [None] * len(samples)
    for i in range(0, len(samples), batch_size):
        rows, prompts, images = [], [], []
        for j in range(i, min(i + batch_size, len(samples))):
            try:
                prompt = data.encode_prompt(samples[j].turns[0][0], tok, stage, model.cfg.num_image_tokens,
                                            samples[j].task)
                if len(prompt) + max_new_tokens > model.cfg.phi.max_positions:
                    raise data.PromptError(f"sample {j}: a prompt of {len(prompt)} tokens leaves no room for an answer")
                images.append(dataset.features[dataset.feature_index[j]] if isinstance(dataset, data.FeatureDataset)
                              else data.preprocess(data.load_image(samples[j]), dataset.image_size))
            except (data.ImageError, data.PromptError):
                continue
            rows.append(j)
            prompts.append(prompt)
        if not rows:
            continue
        T = max(map(len, prompts))
        ids = torch.full((len(rows), T), tok.eos_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
        images = torch.stack(images).to(device)
        features = images if isinstance(dataset, data.FeatureDataset) else None
        out = model.generate(None if features is not None else images, ids.to(device), mask.to(device),
                             features=features, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_id,
                             stop_strings=(data.END[stage],), decode=tok.decode)
        for j, tokens in zip(rows, out):
            answers[j] = answer_text(tok, tokens, stage)
    return answers


def score(sample: data.Sample, prediction: str) -> dict[str, float]:
    """The metrics of one prediction, by task."""
    if sample.task == "[refer]":
        boxes = data.parse_boxes(prediction)
        iou = data.box_iou(boxes[0], sample.meta["box"]) if boxes else 0.0
        return {"iou": iou, "iou>=0.5": float(iou >= 0.5)}
    if sample.task in ("[vqa]", "[identify]") or "answers" in sample.meta:
        return {"accuracy": vqa_score(prediction, sample.meta.get("answers") or [sample.turns[0][1]])}
    truth = sample.turns[0][1]
    if sample.task in ("[detection]", "[grounding]"):     # every true box found (IoU >= 0.5 with a predicted one)
        boxes = data.parse_boxes(prediction)
        found = [any(data.box_iou(t, p) >= 0.5 for p in boxes) for t in data.parse_boxes(truth)]
        out = {"box recall": sum(found) / max(1, len(found)), "extra boxes": max(0, len(boxes) - len(found))}
        if sample.task == "[grounding]" and isinstance(sample.image, data.Scene):
            names = {s.name for s in sample.image.shapes}
            out["shape recall"] = len({n for n in names if n in prediction}) / len(names)
        return out
    if isinstance(sample.image, data.Scene):      # captions and descriptions of the world: which shapes are named
        names = {s.name for s in sample.image.shapes}
        said = {f"{c} {k}" for c in data.COLOURS for k in data.KINDS if f"{c} {k}" in prediction}
        return {"shape recall": len(names & said) / len(names), "exact": float(prediction.strip() == truth.strip())}
    return {"exact": float(normalize_answer(prediction) == normalize_answer(truth))}


def evaluate(model, tok, datasets: dict[str, torch.utils.data.Dataset], stage: int, device,
             max_new_tokens: int | None = None) -> dict[str, dict[str, float]]:
    """Per-task tables: every metric averaged over the held-out samples of that task."""
    table: dict[str, dict[str, list[float]]] = {}
    examples = []
    skipped: dict[str, int] = {}
    for name, ds in datasets.items():
        samples = ds.samples
        preds = generate_answers(model, tok, ds, stage, device, max_new_tokens)
        for i, (s, p) in enumerate(zip(samples, preds)):
            if p is None:
                skipped[s.task or name] = skipped.get(s.task or name, 0) + 1
                continue
            row = table.setdefault(s.task or name, {})
            for k, v in score(s, p).items():
                row.setdefault(k, []).append(v)
            if isinstance(s.image, data.Scene) and stage in (1, 2, 3):
                # chance level: the same prediction scored against another image of the set
                other = samples[(i + 1) % len(samples)]
                row.setdefault("shape recall (wrong image)", []).append(score(other, p)["shape recall"])
        examples += [(s.task or name, s.turns[0][0], s.turns[0][1], p) for s, p in zip(samples, preds)
                     if p is not None][:3]
    metrics = {task: {k: sum(v) / len(v) for k, v in row.items()} | {"n": len(next(iter(row.values())))}
               for task, row in sorted(table.items())}
    for task, n in skipped.items():          # samples that could not be asked are counted, not scored
        metrics.setdefault(task, {})["skipped"] = n
    return {"metrics": metrics, "examples": examples}


def print_report(result: dict) -> None:
    print("\nheld-out evaluation")
    for task, row in result["metrics"].items():
        print(f"  {task:<12} " + "  ".join(f"{k} {v:.3f}" if k not in ("n", "skipped") else f"{k} {int(v)}"
                                            for k, v in row.items()))
    print("examples (task | question | truth | model):")
    for task, q, truth, pred in result["examples"][:8]:
        print(f"  {task} | {q[:60]} | {truth[:60]} | {pred[:60]}")
