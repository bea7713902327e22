"""
evaluation.py: what a trained model answers on held-out data, and how good that is.

    answers     greedy generation for every sample's first question, batched (left padding, KV cache)
    metrics     VQA accuracy with the official answer normalisation, box IoU, box recall, and on the built-in
                world the share of a picture's shapes that a caption names, beside the same caption scored
                against another picture (what chance looks like)
    report      one table per task
    benchmarks  the paper's (GQA, VSR, IconQA, VizWiz, Hateful Memes) read from their published files and scored
                the way TinyGPT-V's own evaluation script scores them
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

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
                text_only = samples[j].image is data.TEXT_ONLY
                prompt = data.encode_prompt(samples[j].turns[0][0], tok, stage, model.cfg.num_image_tokens,
                                            samples[j].task, layout=model.cfg.prompt_layout, image=not text_only)
                if len(prompt) + max_new_tokens > model.cfg.phi.max_positions:
                    raise data.PromptError(f"sample {j}: a prompt of {len(prompt)} tokens leaves no room for an answer")
                images.append(None if text_only else dataset.image_input(j))    # pixels, or cached features
            except (data.ImageError, data.PromptError):
                continue
            rows.append(j)
            prompts.append(prompt)
        if not rows:
            continue
        images = None if images[0] is None else torch.stack(images).to(device)   # a data set is all text or all pictures
        features = isinstance(dataset, data.FeatureDataset)
        out = generate_batch(model, tok, prompts, images, features, max_new_tokens, stop_strings=(data.END[stage],),
                             device=device)
        for j, tokens in zip(rows, out):
            answers[j] = answer_text(tok, tokens, stage)
    return answers


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch, padded on the left so that every row's next token comes at the
    same position: (ids, attention mask), each (B, T)."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    return ids, mask


def generate_batch(model: tv.TinyVLM, tok: data.Tokenizer, prompts: list[list[int]], images: torch.Tensor | None,
                   features: bool = False, max_new_tokens: int = 20, stop_strings: tuple[str, ...] = (),
                   device=None) -> list[list[int]]:
    """Greedy new tokens for prompts of different lengths (left-padded into one batch), one image each (pixels, or
    visual features when features=True; None for text-only prompts); each row stops at <|endoftext|>, at one of
    stop_strings, or after max_new_tokens."""
    ids, mask = left_padded(prompts, tok.eos_id)
    device = images.device if images is not None else device
    return model.generate(None if features else images, ids.to(device), mask.to(device),
                          features=images if features else None, max_new_tokens=max_new_tokens,
                          eos_token_id=tok.eos_id, stop_strings=stop_strings, decode=tok.decode)


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
            if "qtype" in s.meta:      # the built-in world: one more row per kind of [vqa] question or [identify] case
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


# ----------------------------------------------------------------------------------------------------------------------
# Looking inside: the language model's attention logits, what QK-norm holds down (train.py --attention-logits)

ATTENTION_SAMPLES = 64          # held-out samples per task


@torch.no_grad()
def attention_logits(model: tv.TinyVLM, tok: data.Tokenizer, datasets: dict[str, torch.utils.data.Dataset], device,
                     n: int = ATTENTION_SAMPLES, batch_size: int = 16) -> list[dict[str, float]]:
    """Per layer of the language model, over the first n held-out samples of each set (prompt and answer, read as
    in training): the attention logits q.k / sqrt(hs) of every head, at every position a real token attends to
    (the largest |logit|, the mean |logit|), and the softmax rows they make (the mean weight of a row's top position;
    the share of rows with more than 0.99 of their weight on one position: a near-hard choice, which a small change
    in two logits can turn). A row that sees one position only (a sequence's first token) is left out.

    QK-norm normalises each head's q and k before their product, so the logits stay near the size its weights set;
    without it they grow as training makes q and k longer. SDPA does not return its logits, so each attention's
    q and k are computed again from its input, by the layer's own projection, norms and rotation."""
    model.eval()
    layers = model.phi.layers
    totals = [{"max": 0.0, "abs sum": 0.0, "logits": 0, "top sum": 0.0, "saturated": 0, "rows": 0} for _ in layers]
    seen = torch.empty(0)            # (B, 1, T, T): which positions each real query attends to; set per batch

    def read(t: dict):
        def hook(attn, args, out):
            logits = attn.attention_logits(*args[:3])                                          # (B, nh, T, T)
            mask = seen.expand_as(logits)
            rows = mask.sum(-1) > 1                                                            # (B, nh, T)
            top = logits.masked_fill(~mask, float("-inf")).softmax(-1).amax(-1)[rows]
            logits = logits.abs()[mask & rows[..., None]]
            t["max"] = max(t["max"], float(logits.max()))
            t["abs sum"] += float(logits.sum())
            t["logits"] += logits.numel()
            t["top sum"] += float(top.sum())
            t["saturated"] += int((top > 0.99).sum())
            t["rows"] += top.numel()
        return hook

    hooks = [layer.self_attn.register_forward_hook(read(t)) for layer, t in zip(layers, totals)]
    try:
        for ds in datasets.values():
            items = [ds[j] for j in range(min(n, len(ds)))]
            for i in range(0, len(items), batch_size):
                batch = data.collate(items[i:i + batch_size], tok.eos_id)
                if batch is None:
                    continue
                real = batch["attention_mask"].bool()                                          # (B, T)
                T = real.shape[1]
                causal = torch.ones(T, T, dtype=torch.bool).tril()
                seen = (causal & real[:, None, :] & real[:, :, None])[:, None].to(device)
                model(**data.model_inputs(batch, device))
    finally:
        for h in hooks:
            h.remove()
    if not totals[0]["rows"]:
        raise ValueError("attention_logits: no held-out sample had two or more tokens to read")
    return [{"max |logit|": t["max"], "mean |logit|": t["abs sum"] / t["logits"], "mean top weight":
             t["top sum"] / t["rows"], "rows > 0.99": t["saturated"] / t["rows"]} for t in totals]


def print_attention_logits(rows: list[dict[str, float]], n: int = ATTENTION_SAMPLES) -> None:
    print(f"\nattention logits of the language model (q.k / sqrt(head_dim), every head; {n} held-out samples per task)")
    print("  layer  max |logit|  mean |logit|  mean top weight  rows > 0.99")
    for i, r in enumerate(rows):
        print(f"  {i:5d}  {r['max |logit|']:11.2f}  {r['mean |logit|']:12.2f}  {r['mean top weight']:15.3f}  "
              f"{r['rows > 0.99']:11.3f}")


# ----------------------------------------------------------------------------------------------------------------------
# The paper's benchmarks (its Table 2: GQA 38.9, VSR 54.7, IconQA 44.7, VizWiz 37.8, Hateful Memes 54.0), each read
# from the files its publishers give and scored as TinyGPT-V's eval_vqa.py (the script its EVAL_README runs) scores
# it, so that a released checkpoint can be held against the published figures. That script:
#   - puts the benchmark's question into MiniGPT-v2's conversation template with an empty system message,
#     "###Human: <Img><ImageHere></Img> {question}###Assistant: " (no space before "###Assistant"), with no BOS in
#     front: its generate() asks Phi-2's tokenizer for special tokens, and that tokenizer adds none (training put a
#     BOS there; the evaluation did not, and we score as it did);
#   - generates 20 new tokens greedily, stopping only at <|endoftext|> (its "###" stop is commented out), and keeps
#     the decoded text after the last "[/INST]";
#   - then matches each answer its own loose way, on substrings, not with the VQA normalisation (per benchmark below).
# IconQA is multiple choice: each candidate is scored by the model's mean loss on "candidate\n" (the model's end
# symbol in that config) after "###Human: <Img><ImageHere></Img> {question} ###Assistant: " with a BOS first (its
# forward(), as in training), and the lowest loss is the answer. The top-level eval_vqa.py splits the choices at
# "|" where its reader joined them with "_" (one candidate is left, and the score is meaningless);
# eval_scripts/eval_vqa.py splits at "_" and compares the winner's index with the answer's: we follow that one.

BENCHMARK_PROMPT = "###Human: <Img><ImageHere></Img> {}###Assistant: "
CHOICE_PROMPT = "###Human: <Img><ImageHere></Img> {} ###Assistant: "
CHOICE_END = "\n"
BENCHMARK_NEW_TOKENS = 20
SHORT_ANSWER = "[vqa] Based on the image, respond to this question with a short answer: {}"


def read_gqa(path, image_root) -> list[data.Sample]:
    """GQA: MiniGPT-v2's testdev_balanced_questions.json ([{"image": "n161313.jpg", "question", "answer"}]), or
    GQA's own questions file ({question id: {"imageId", "question", "answer", ...}}); the images in image_root."""
    samples = []
    for i, r in enumerate(data.read_json_records(path)):
        image = r["image"] if "image" in r else f"{data.record_field(r, 'imageId', path, i)}.jpg"
        answer = str(data.record_field(r, "answer", path, i))
        samples.append(data.Sample(Path(image_root) / image,
                                   [(SHORT_ANSWER.format(data.record_field(r, "question", path, i)), answer)],
                                   meta={"truth": answer}))
    return samples


def read_vsr(path, image_root) -> list[data.Sample]:
    """VSR (cambridgeltl/vsr_zeroshot, test.jsonl): {"image": "000000085637.jpg", "caption", "label": 1 or 0}; the
    image in image_root/train2017 or image_root/val2017 (COCO 2017's folders). The truth is "true" or "false"."""
    samples = []
    for i, r in enumerate(data.read_json_records(path)):
        image = Path(image_root) / "train2017" / data.record_field(r, "image", path, i)
        if not image.exists():
            image = Path(image_root) / "val2017" / r["image"]
        truth = "true" if data.record_field(r, "label", path, i) == 1 else "false"
        question = f"[vqa] Based on the image, is this statement true or false? {data.record_field(r, 'caption', path, i)}"
        samples.append(data.Sample(image, [(question, truth)], meta={"truth": truth}))
    return samples


def read_iconqa(path, image_root) -> list[data.Sample]:
    """IconQA's multiple-choice questions as MiniGPT-v2 reads them (choose_text_val.json: [{"image_id", "question",
    "choices": [...], "answer": index of the right choice}]); the picture in image_root/IMAGE_ID/image.png."""
    samples = []
    for i, r in enumerate(data.read_json_records(path)):
        choices, answer = data.record_field(r, "choices", path, i), data.record_field(r, "answer", path, i)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise data.DataError(f"{path}: record {i}: 'choices' must be a list of two or more strings")
        if answer in choices:                          # the right choice written out instead of its index
            answer = choices.index(answer)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise data.DataError(f"{path}: record {i}: 'answer' must be the index of one of the {len(choices)} "
                                 f"choices (or the choice itself), got {answer!r}")
        image = Path(image_root) / str(data.record_field(r, "image_id", path, i)) / "image.png"
        samples.append(data.Sample(image, [(SHORT_ANSWER.format(data.record_field(r, "question", path, i)), choices[answer])],
                                   meta={"truth": answer, "choices": choices}))
    return samples


def read_vizwiz(path, image_root) -> list[data.Sample]:
    """VizWiz-VQA's val.json: [{"image": "VizWiz_val_00000000.jpg", "question", "answers": [{"answer": ...}, ...]}];
    the question asks the model to say 'unanswerable' when the picture does not tell."""
    samples = []
    for i, r in enumerate(data.read_json_records(path)):
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in data.record_field(r, "answers", path, i)]
        question = (f"[vqa] The question is '{data.record_field(r, 'question', path, i)}' Based on the image, answer the "
                    f"question with a single word or phrase. and reply 'unanswerable' when the provided information "
                    f"is insufficient")
        samples.append(data.Sample(Path(image_root) / data.record_field(r, "image", path, i),
                                   [(question, " / ".join(answers))], meta={"truth": answers}))
    return samples


def read_hateful_memes(path, image_root) -> list[data.Sample]:
    """Hateful Memes' dev.jsonl: {"id", "img": "img/01235.png", "label": 1 (hateful) or 0, "text"}: the meme's
    printed words go into the question."""
    samples = []
    for i, r in enumerate(data.read_json_records(path)):
        label = int(data.record_field(r, "label", path, i))
        question = (f"This is an image writting '{data.record_field(r, 'text', path, i)}'. Is this image hateful? Answer "
                    f"yes or no. Answer:")                      # sic: the repo's wording, which the model was asked
        samples.append(data.Sample(Path(image_root) / data.record_field(r, "img", path, i),
                                   [(question, "yes" if label else "no")], meta={"truth": label}))
    return samples


def before_stop(answer: str) -> str:
    """What VizWiz and Hateful Memes score: the text before a "###", after an "Assistant:"."""
    return answer.split("###")[0].split("Assistant:")[-1].strip()


def score_gqa(answer: str, truth: str) -> float:
    return float(truth in answer.lower())              # anywhere in the 20 tokens, "###" and all


def score_vsr(answer: str, truth: str) -> float:
    return float(truth in answer.lower())              # "true" / "false" anywhere in the answer


def score_vizwiz(answer: str, truth: list[str]) -> float:
    """min(#annotators whose answer equals, contains or is contained in the model's / 3, 1). (The answers are
    joined with "_" and split again, as the repo's reader does: an answer holding "_" counts as several.)"""
    a = before_stop(answer).lower()
    matches = sum(1 for gt in "_".join(truth).split("_") if gt.lower() == a or gt.lower() in a or a in gt.lower())
    return min(matches / 3.0, 1.0)


def score_hateful_memes(answer: str, truth: int) -> float:
    """"yes" anywhere means hateful, else "no" anywhere means not; an answer with neither is wrong."""
    a = before_stop(answer).lower()
    said = 1 if "yes" in a else 0 if "no" in a else None
    return float(said == truth)


# name: (reader, scorer; None: multiple choice, ranked by loss)
BENCHMARKS = {"gqa": (read_gqa, score_gqa), "vsr": (read_vsr, score_vsr), "iconqa": (read_iconqa, None),
              "vizwiz": (read_vizwiz, score_vizwiz), "hm": (read_hateful_memes, score_hateful_memes)}


def read_benchmark(name: str, path, image_root) -> list[data.Sample]:
    if name not in BENCHMARKS:
        raise cli.UserError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name][0](path, image_root)


def benchmark_answer(tok: data.Tokenizer, tokens: list[int]) -> str:
    """The decoded answer as the repo's generate() returns it."""
    text = tok.decode(tokens, skip_special_tokens=True)
    return text.split("</s>")[0].replace("<s>", "").split("[/INST]")[-1].strip()


@torch.no_grad()
def choice_losses(model: tv.TinyVLM, tok: data.Tokenizer, features: torch.Tensor, question: str,
                  choices: list[str]) -> torch.Tensor:
    """The model's mean next-token loss on each "choice\n" after the question's prompt, one image's visual
    features (1, ...) shared by all: (len(choices),)."""
    prompt = [tok.bos_id] + data.with_image_slots(CHOICE_PROMPT.format(question), tok, model.cfg.num_image_tokens)
    answers = [tok.encode(c + CHOICE_END) for c in choices]
    batch = data.collate([{"input_ids": prompt + a, "labels": [tv.IGNORE_INDEX] * len(prompt) + a, "index": b}
                          for b, a in enumerate(answers)], tok.eos_id)  # right padding: the answers start together
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    device = features.device
    logits, _ = model(None, ids.to(device), mask.to(device),
                      features=features.expand(len(choices), *features.shape[1:]))
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].to(device),
                           ignore_index=tv.IGNORE_INDEX, reduction="none")           # (n, T - 1)
    return loss.sum(1).cpu() / (labels[:, 1:] != tv.IGNORE_INDEX).sum(1)


@torch.no_grad()
def run_benchmark(model: tv.TinyVLM, tok: data.Tokenizer, name: str, samples: list[data.Sample], image_size: int,
                  device, batch_size: int = 16) -> dict:
    """Score a model on a benchmark's samples as TinyGPT-V's evaluation does: {"score": percent correct (the
    paper's unit), "n": questions scored, "skipped": questions whose picture could not be read or whose text
    does not fit the model (counted, not scored), "answers": the model's answers in order (None where skipped)}."""
    model.eval()
    scorer = BENCHMARKS[name][1]
    answers: list[str | None] = [None] * len(samples)
    points: list[float] = []
    tick = cli.Ticker(f"{name}: {len(samples):,} questions", len(samples))
    for i in range(0, len(samples), batch_size):
        rows, pixels, prompts = [], [], []
        for j in range(i, min(i + batch_size, len(samples))):
            try:
                # the prompt, and a multiple-choice question's candidates after it: what must fit the positions
                longest = BENCHMARK_PROMPT.format(samples[j].turns[0][0]) + " ".join(samples[j].meta.get("choices", []))
                ids = data.with_image_slots(longest, tok, model.cfg.num_image_tokens)
                if len(ids) + BENCHMARK_NEW_TOKENS > model.cfg.phi.max_positions:
                    raise data.PromptError(f"{len(ids) + BENCHMARK_NEW_TOKENS} tokens with the answer, more than the "
                                           f"model's {model.cfg.phi.max_positions} positions")
                pixels.append(data.preprocess(data.load_image(samples[j]), image_size))
                rows.append(j)
                prompts.append(ids)           # without choices, `longest` is the generation prompt itself
            except (data.ImageError, data.PromptError) as e:
                print(f"skipping question {j}: {e}")
        if rows:
            features = model.visual_features(torch.stack(pixels).to(device))
            if scorer is None:
                for b, j in enumerate(rows):
                    losses = choice_losses(model, tok, features[b:b + 1], samples[j].turns[0][0],
                                           samples[j].meta["choices"])
                    best = int(losses.argmin())
                    answers[j] = samples[j].meta["choices"][best]
                    points.append(float(best == samples[j].meta["truth"]))
            else:
                out = generate_batch(model, tok, prompts, features, True, BENCHMARK_NEW_TOKENS)
                for j, tokens in zip(rows, out):
                    answers[j] = benchmark_answer(tok, tokens)
                    points.append(scorer(answers[j], samples[j].meta["truth"]))
        tick(min(i + batch_size, len(samples)))
    return {"benchmark": name, "score": 100.0 * sum(points) / max(1, len(points)), "n": len(points),
            "skipped": len(samples) - len(points), "answers": answers}
