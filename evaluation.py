"""
evaluation.py: what a trained model answers on held-out data, and how good that is.

    answers     greedy generation for every sample's first question, batched (left padding, KV cache)
    metrics     VQA accuracy with the official answer normalisation, box IoU, box recall, and on the built-in
                world the share of a picture's shapes that a caption names, beside the same caption scored
                against another picture (what chance looks like)
    report      one table per task
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

import cli
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


# Caption metrics, as the COCO caption evaluation defines them: BLEU-4 (Papineni et al. 2002) over the whole set,
# with the reference length closest to each caption's for the brevity penalty; CIDEr-D (Vedantam et al. 2015), the
# tf-idf weighted n-gram agreement with each image's references, its document frequencies taken from the
# references of the set. Both on lowercased words without punctuation.

def caption_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def ngram_counts(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4: the geometric mean of the 1- to 4-gram precisions, each n-gram counted at most as often as
    in the reference that has it most, times the brevity penalty exp(1 - r / c) when the predictions' length c is
    below r, the sum of each prediction's closest reference length."""
    matched, total, c, r = [0] * 4, [0] * 4, 0, 0
    for prediction, refs in zip(predictions, references):
        words, ref_words = caption_words(prediction), [caption_words(x) for x in refs]
        c += len(words)
        r += min((abs(len(x) - len(words)), len(x)) for x in ref_words)[1]
        for n in range(1, 5):
            counts = ngram_counts(words, n)
            most = Counter()
            for x in ref_words:
                most |= ngram_counts(x, n)                          # per n-gram, its largest count in one ref
            matched[n - 1] += sum(min(k, most[g]) for g, k in counts.items())
            total[n - 1] += sum(counts.values())
    if min(matched) == 0:
        return 0.0
    precision = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    return math.exp(precision + min(0.0, 1 - r / c))


def cider_d(predictions: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D, the mean over images of: for n = 1..4, the cosine between the prediction's and each reference's
    tf-idf vectors of n-grams (the prediction's weights clipped at the reference's), damped by a Gaussian of their
    length difference (sigma 6); averaged over n and the references, times 10. idf = log(images / images whose
    references hold the n-gram)."""
    refs = [[caption_words(x) for x in rs] for rs in references]
    df = Counter(g for rs in refs for g in {g for x in rs for n in range(1, 5) for g in ngram_counts(x, n)})
    log_images = math.log(len(refs))

    def vectors(words):      # per n: the tf-idf vector of the n-grams, and its norm
        out = []
        for n in range(1, 5):
            v = {g: k * (log_images - math.log(max(1, df[g]))) for g, k in ngram_counts(words, n).items()}
            out.append((v, math.sqrt(sum(x * x for x in v.values()))))
        return out

    scores = []
    for prediction, rs in zip(predictions, refs):
        words = caption_words(prediction)
        vec = vectors(words)
        total = 0.0
        for x in rs:
            penalty = math.exp(-((len(words) - len(x)) ** 2) / (2 * sigma ** 2))
            for (h, h_norm), (g, g_norm) in zip(vec, vectors(x)):
                if h_norm and g_norm:
                    total += penalty * sum(min(w, g.get(k, 0.0)) * g.get(k, 0.0) for k, w in h.items()) / (h_norm * g_norm)
        scores.append(10 * total / 4 / len(rs))
    return sum(scores) / len(scores)


def token_f1(prediction: str, refs: list[str]) -> float:
    """The best, over the references, harmonic mean of word precision and recall (words as a multiset)."""
    words = Counter(caption_words(prediction))
    best = 0.0
    for ref in refs:
        truth = Counter(caption_words(ref))
        common = sum((words & truth).values())
        if common:
            p, r = common / sum(words.values()), common / sum(truth.values())
            best = max(best, 2 * p * r / (p + r))
    return best


def caption_metrics(samples: list[data.Sample], predictions: list[str]) -> dict[str, float]:
    """BLEU-4, CIDEr-D and token F1 of one prediction per image against all of that image's references in the set,
    each beside its wrong-image control: the same predictions scored against the references of the image half
    the set away, what a model that ignores the picture would get. (Not the next image: in a folder listed in
    order, a neighbour is often the same kind of picture, and the control would score as if it had looked.)"""
    refs: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    for s, p in zip(samples, predictions):
        key = s.image.key() if isinstance(s.image, data.Scene) else str(getattr(s.image, "name", s.image))
        refs.setdefault(key, []).append(s.turns[0][1])
        first.setdefault(key, p)
    keys = list(refs)
    if len(keys) < 2:
        return {}
    preds, truth = [first[k] for k in keys], [refs[k] for k in keys]
    wrong = truth[len(keys) // 2:] + truth[:len(keys) // 2]
    out = {}
    for name, metric in (("BLEU-4", bleu4), ("CIDEr-D", cider_d)):
        out[name], out[f"{name} (wrong image)"] = metric(preds, truth), metric(preds, wrong)
    out["token F1"] = sum(token_f1(p, t) for p, t in zip(preds, truth)) / len(keys)
    out["token F1 (wrong image)"] = sum(token_f1(p, t) for p, t in zip(preds, wrong)) / len(keys)
    return out


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
                                            samples[j].task, layout=model.cfg.prompt_layout)
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
    corpus: dict[str, dict[str, float]] = {}
    tick = cli.Ticker("evaluation", sum(len(ds) for ds in datasets.values()))
    done = 0
    for name, ds in datasets.items():
        samples = ds.samples
        preds = generate_answers(model, tok, ds, stage, device, max_new_tokens)
        done += len(ds)
        tick(done)
        for i, (s, p) in enumerate(zip(samples, preds)):
            if p is None:
                skipped[s.task or name] = skipped.get(s.task or name, 0) + 1
                continue
            row = table.setdefault(s.task or name, {})
            scores = score(s, p)
            for k, v in scores.items():
                row.setdefault(k, []).append(v)
            if "qtype" in s.meta:                 # the built-in world's VQA: one more row per kind of question
                for k, v in scores.items():
                    table.setdefault(f"{s.task} {s.meta['qtype']}", {}).setdefault(k, []).append(v)
            if isinstance(s.image, data.Scene) and stage in (1, 2, 3):
                # chance level: the same prediction scored against another image of the set
                other = samples[(i + 1) % len(samples)]
                row.setdefault("shape recall (wrong image)", []).append(score(other, p)["shape recall"])
        examples += [(s.task or name, s.turns[0][0], s.turns[0][1], p) for s, p in zip(samples, preds)
                     if p is not None][:3]
        answered = [(s, p) for s, p in zip(samples, preds) if p is not None and s.task in (None, "[caption]")]
        if answered:                              # captions and descriptions: the corpus metrics too
            corpus[answered[0][0].task or name] = caption_metrics(*map(list, zip(*answered)))
    metrics = {task: {k: sum(v) / len(v) for k, v in row.items()} | corpus.get(task, {})
               | {"n": len(next(iter(row.values())))} for task, row in sorted(table.items())}
    for task, n in skipped.items():          # samples that could not be asked are counted, not scored
        metrics.setdefault(task, {})["skipped"] = n
    return {"metrics": metrics, "examples": examples}


def print_report(result: dict) -> None:
    print("\nheld-out evaluation")
    for task, row in result["metrics"].items():
        print(f"  {task:<12} " + "  ".join(f"{k} {v:.3f}" if k not in ("n", "skipped") else f"{k} {int(v)}"
                                            for k, v in row.items()))
    print("examples:")
    for task, q, truth, pred in result["examples"][:12]:
        print(f"  {task}  {q}\n      truth: {truth}\n      model: {pred}")
