"""The caption metrics on small cases worked out by hand, and the wrong-image control beside them; the paper's
benchmarks read from their published layouts and scored the way TinyGPT-V's evaluation scores them."""

import json
import math

import pytest
import torch
from PIL import Image

import data
import evaluation as ev
from conftest import attention_inputs_and_outputs
from tinyvlm import IGNORE_INDEX, IMAGE_TOKEN


def test_bleu4_on_hand_worked_cases():
    assert ev.bleu4(["the cat sat on the mat"], [["The cat sat on the mat."]]) == pytest.approx(1.0)
    # 8 words against 9: 1-grams 8/8, 2-grams 6/7 ("a blue" is not in the reference), 3-grams 4/6, 4-grams 3/5,
    # brevity penalty exp(1 - 9/8)
    want = math.exp(1 - 9 / 8) * (1 * 6 / 7 * 4 / 6 * 3 / 5) ** 0.25
    got = ev.bleu4(["a small red circle and a blue square"], [["a small red circle and a large blue square"]])
    assert got == pytest.approx(want)
    # no 4-gram in common: 0; the closest reference length is the one used for the brevity penalty
    assert ev.bleu4(["a red ball"], [["a red ball"]]) == 0.0
    assert ev.bleu4(["one two three four five"], [["one two three four five six seven eight nine ten",
                                                   "one two three four five"]]) == pytest.approx(1.0)


def test_cider_d_on_hand_worked_cases():
    # two images, one reference each, predictions equal to them: "a" is in every reference (idf 0), every other
    # n-gram in one (idf log 2); the 1-, 2- and 3-gram cosines are 1, there are no 4-grams: 10 * 3 / 4
    assert ev.cider_d(["a red ball", "a blue box"], [["a red ball"], ["a blue box"]]) == pytest.approx(7.5)
    # a prediction two words too long: the same cosines for 1-3, damped by exp(-2^2 / (2 * 6^2))
    got = ev.cider_d(["a red ball a ball", "a blue box"], [["a red ball"], ["a blue box"]])
    first = 10 / 4 * math.exp(-4 / 72) * sum(_cosines_for_long_red_ball())
    assert got == pytest.approx((first + 7.5) / 2)
    assert ev.cider_d(["a green cone", "a green cone"], [["a red ball"], ["a blue box"]]) == 0.0


def _cosines_for_long_red_ball():
    """By hand: prediction "a red ball a ball" against "a red ball", idf: a -> 0, the rest log 2."""
    l2 = math.log(2)
    # unigrams: prediction {a: 0, red: l2, ball: 2 l2}, reference {a: 0, red: l2, ball: l2}; "ball" is clipped
    # to the reference's weight: (l2 * l2 + l2 * l2) / (|(l2, 2 l2)| |(l2, l2)|) = 2 / sqrt(10)
    uni = (l2 * l2 + l2 * l2) / (math.sqrt(l2 ** 2 + (2 * l2) ** 2) * math.sqrt(2 * l2 ** 2))
    # bigrams: prediction {a red, red ball, ball a, a ball} each once; reference {a red, red ball}; clipped products
    bi = 2 * l2 * l2 / (math.sqrt(4 * l2 ** 2) * math.sqrt(2 * l2 ** 2))
    # trigrams: prediction {a red ball, red ball a, ball a ball}, reference {a red ball}
    tri = l2 * l2 / (math.sqrt(3 * l2 ** 2) * l2)
    return uni, bi, tri


def test_token_f1():
    assert ev.token_f1("a red ball", ["the red ball"]) == pytest.approx(2 / 3)
    assert ev.token_f1("red red", ["red"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert ev.token_f1("nothing alike", ["a red ball", "a blue box"]) == 0.0
    assert ev.token_f1("a blue box", ["a red ball", "a blue box"]) == 1.0      # the best reference counts


def test_caption_metrics_group_references_by_image_and_report_the_wrong_image():
    samples = [data.Sample(f"{name}.png", [("", caption)]) for name, caption in
               (("a", "a red ball"), ("a", "one red ball"), ("b", "a blue box"), ("c", "a green cone"))]
    predictions = ["a red ball", "ignored: the second sample of the same image", "a blue box", "a green cone"]
    m = ev.caption_metrics(samples, predictions)
    assert m["token F1"] == pytest.approx(1.0) and m["token F1 (wrong image)"] < 0.5
    assert m["CIDEr-D"] > 5 and m["CIDEr-D (wrong image)"] < 1
    assert m["BLEU-4"] == 0.0               # three-word captions have no 4-grams


# The paper's benchmarks, TinyGPT-V's way (evaluation.py, "The paper's benchmarks")

def test_benchmark_prompts_are_the_repo_tokens(phi2_tokenizer_files):
    """The prompt ids of a benchmark question are those of the repo's evaluation, rebuilt here as it builds them:
    MiniGPT-v2's Conversation (system "", sep "###", roles "Human: " / "Assistant: ") around "<Img><ImageHere></Img>
    {question}", each side of the image tokenized alone with the tokenizer's special tokens asked for (Phi-2's adds
    none); IconQA's ranking rows: BOS, "###Human: ... ###Assistant: ", then the candidate and "\n"."""
    from tokenizers import AddedToken
    from transformers import CodeGenTokenizer
    folder, out = phi2_tokenizer_files
    ours = data.Tokenizer.from_file(out)
    ref = CodeGenTokenizer(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))
    ref.add_tokens([AddedToken(t, normalized=True, special=False) for t in data.phi2_whitespace_tokens()])
    n, question = 32, ev.SHORT_ANSWER.format("What is the man holding?")
    conversation = "" + "###" + "Human: " + f"<Img><ImageHere></Img> {question}" + "###" + "Assistant: "
    before, after = conversation.split("<ImageHere>")
    want = ref(before)["input_ids"] + [IMAGE_TOKEN] * n + ref(after)["input_ids"]
    assert ref(before)["input_ids"] == ref(before, add_special_tokens=False)["input_ids"]     # no BOS added
    assert data.with_image_slots(ev.BENCHMARK_PROMPT.format(question), ours, n) == want
    before, after = "###Human: <Img><ImageHere></Img> {} ###Assistant: ".format(question).split("<ImageHere>")
    hf = lambda text: ref(text, add_special_tokens=False)["input_ids"]
    row = [50256] + hf(before) + [IMAGE_TOKEN] * n + hf(after) + hf("a dog\n")
    assert [50256] + data.with_image_slots(ev.CHOICE_PROMPT.format(question), ours, n) + ours.encode(
        "a dog" + ev.CHOICE_END) == row


def test_benchmark_scorers_match_the_repo_quirks():
    # GQA: the truth anywhere in the 20 tokens, even past the "###"
    assert ev.score_gqa("Blue###Human: red", "red") == 1.0 and ev.score_gqa("blue", "red") == 0.0
    # VSR: "true" / "false" anywhere
    assert ev.score_vsr("True, it is.", "true") == 1.0 and ev.score_vsr("yes", "true") == 0.0
    # VizWiz: each annotator whose answer equals, holds or is held by the model's counts a third
    assert ev.score_vizwiz("unanswerable###", ["unanswerable"] * 3 + ["blue"]) == 1.0
    assert ev.score_vizwiz("Assistant: light blue", ["blue", "red", "red"]) == pytest.approx(1 / 3)
    assert ev.score_vizwiz("blue", ["light_blue", "red"]) == pytest.approx(1 / 3)       # "_" splits an answer
    assert ev.score_vizwiz("blue", ["blue_blue", "red"]) == pytest.approx(2 / 3)
    # Hateful Memes: "yes" anywhere is hateful, else "no" anywhere (in "not" too) is not, else wrong
    assert ev.score_hateful_memes("Yes.", 1) == 1.0 and ev.score_hateful_memes("I do not know", 0) == 1.0
    assert ev.score_hateful_memes("maybe", 0) == 0.0 and ev.score_hateful_memes("maybe", 1) == 0.0


@pytest.fixture(scope="module")
def benchmark_files(tmp_path_factory):
    """Tiny files in each benchmark's published layout, around pictures of the shapes world."""
    d = tmp_path_factory.mktemp("benchmarks")
    scenes = [data.write_scene(d / f"{i}.png", seed=i) for i in range(3)]
    for sub in ("train2017", "val2017", "img", "q7", "q8"):
        (d / sub).mkdir()
    (d / "0.png").rename(d / "train2017" / "000000000000.png")
    (d / "1.png").rename(d / "val2017" / "000000000001.png")
    Image.open(d / "2.png").save(d / "img" / "01235.png")
    Image.open(d / "2.png").save(d / "q7" / "image.png")
    Image.open(d / "2.png").save(d / "q8" / "image.png")
    files = {
        "gqa": [{"image": "2.png", "question": "what colour is the shape?", "answer": "red"},
                {"image": "2.png", "question": "how many shapes are there?", "answer": "two"}],
        "gqa_own": {"201": {"imageId": "2", "question": "what is it?", "answer": "circle", "types": {}}},
        "vsr": [{"image": "000000000000.png", "caption": "The circle is left of the square.", "label": 1},
                {"image": "000000000001.png", "caption": "The square is under the circle.", "label": 0}],
        "iconqa": [{"image_id": "q7", "question": "Which shape is there?", "choices": ["a red circle", "a square"],
                    "answer": 0},
                   {"image_id": "q8", "question": "How many?", "choices": ["one", "two", "three"], "answer": "two"}],
        "vizwiz": [{"image": "2.png", "question": "What is this?",
                    "answers": [{"answer": "circle", "answer_confidence": "yes"}] * 10, "answerable": 1}],
        "hm": [{"id": 1235, "img": "img/01235.png", "label": 0, "text": "shapes are friends"}],
    }
    for name, records in files.items():
        path = d / (f"{name}.jsonl" if name in ("vsr", "hm") else f"{name}.json")
        path.write_text("\n".join(json.dumps(r) for r in records) if path.suffix == ".jsonl" else json.dumps(records))
    return d, scenes


def test_benchmark_readers_take_the_published_layouts(benchmark_files):
    d, _ = benchmark_files
    vsr = ev.read_benchmark("vsr", d / "vsr.jsonl", d)
    assert [s.image for s in vsr] == [d / "train2017" / "000000000000.png", d / "val2017" / "000000000001.png"]
    assert [s.meta["truth"] for s in vsr] == ["true", "false"]
    assert vsr[0].turns[0][0] == "[vqa] Based on the image, is this statement true or false? The circle is left of the square."
    own = ev.read_benchmark("gqa", d / "gqa_own.json", d)
    assert own[0].image == d / "2.jpg" and own[0].meta["truth"] == "circle"      # GQA names its images ID.jpg
    icon = ev.read_benchmark("iconqa", d / "iconqa.json", d)
    assert [s.meta["truth"] for s in icon] == [0, 1] and icon[1].image == d / "q8" / "image.png"
    assert ev.read_benchmark("vizwiz", d / "vizwiz.json", d)[0].meta["truth"] == ["circle"] * 10
    hm = ev.read_benchmark("hm", d / "hm.jsonl", d)
    assert hm[0].turns[0][0] == ("This is an image writting 'shapes are friends'. Is this image hateful? "
                                 "Answer yes or no. Answer:") and hm[0].meta["truth"] == 0
    bad = d / "bad_iconqa.json"
    bad.write_text(json.dumps([{"image_id": "q7", "question": "?", "choices": ["a", "b"], "answer": 2}]))
    with pytest.raises(data.DataError, match="record 0: 'answer' must be the index of one of the 2 choices"):
        ev.read_benchmark("iconqa", bad, d)


def test_benchmark_runs_score_what_the_model_answers(benchmark_files, capsys):
    """Through the command line with the shipped stage-4 model: each answer is the model's own greedy answer to
    the benchmark prompt, asked alone (no batch, no padding), the score is the repo's match over them; IconQA's
    pick is the candidate with the lowest loss, each computed alone by the model's forward()."""
    import train
    d, _ = benchmark_files
    result = train.main(["--benchmark", "gqa", "--data", str(d / "gqa.json"), "--image-root", str(d)])
    assert f"gqa: {result['score']:.2f} (2 scored)" in capsys.readouterr().out
    model, tok, n, size = _shipped()
    samples = ev.read_benchmark("gqa", d / "gqa.json", d)
    for s, answer in zip(samples, result["answers"]):
        ids = torch.tensor([data.with_image_slots(ev.BENCHMARK_PROMPT.format(s.turns[0][0]), tok, n)])
        pixels = data.preprocess(data.load_image(s), size)[None]
        alone = model.generate(pixels, ids, max_new_tokens=ev.BENCHMARK_NEW_TOKENS, eos_token_id=tok.eos_id)[0]
        assert answer == ev.benchmark_answer(tok, alone)
    assert result["score"] == pytest.approx(50 * sum(ev.score_gqa(a, s.meta["truth"])
                                                     for a, s in zip(result["answers"], samples)))
    icon = train.main(["--benchmark", "iconqa", "--data", str(d / "iconqa.json"), "--image-root", str(d)])
    for s, picked in zip(ev.read_benchmark("iconqa", d / "iconqa.json", d), icon["answers"]):
        losses = []
        for c in s.meta["choices"]:
            prompt = [tok.bos_id] + data.with_image_slots(ev.CHOICE_PROMPT.format(s.turns[0][0]), tok, n)
            answer = tok.encode(c + ev.CHOICE_END)
            labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + answer])
            pixels = data.preprocess(data.load_image(s), size)[None]
            with torch.no_grad():
                losses.append(float(model(pixels, torch.tensor([prompt + answer]), labels=labels)[1]))
        assert picked == s.meta["choices"][losses.index(min(losses))]
    for name, file in (("vsr", "vsr.jsonl"), ("vizwiz", "vizwiz.json"), ("hm", "hm.jsonl")):
        out = train.main(["--benchmark", name, "--data", str(d / file), "--image-root", str(d)])
        assert out["n"] >= 1 and out["skipped"] == 0 and 0 <= out["score"] <= 100


def _shipped():
    import train
    loaded = train.load_trained(str(train.SHIPPED_STAGE4), "out", torch.device("cpu"))
    return loaded.model, loaded.tok, loaded.model.cfg.num_image_tokens, loaded.image_size


def test_attention_logits_are_the_ones_each_layer_attends_with(tmp_path):
    """train.py --attention-logits: each layer's logits are computed again from its input. Their softmax times v must
    be the layer's own attention output (what SDPA gave), and their statistics over padded batches of mixed lengths
    those of each sample read alone (padding and a sequence's first row left out)."""
    import dataclasses
    import train
    cpu = torch.device("cpu")
    model, tok, _, _ = _shipped()
    cfg = dataclasses.replace(train.config_of_checkpoint(str(train.SHIPPED_STAGE4), device="cpu"),
                              out_dir=str(tmp_path), cache_features=False)
    sets = {k: ds for k, (ds, _) in train.make_datasets(cfg, model, tok, "val", 5, cpu).items()}
    items = [ds[j] for ds in sets.values() for j in range(5)]
    assert len(items) == 30 and len({len(it["input_ids"]) for it in items}) > 3       # six tasks, padding to do

    layers = model.phi.layers
    seen = {i: {"logits": [], "top": []} for i in range(len(layers))}
    with attention_inputs_and_outputs(layers) as (inputs, outputs), torch.no_grad():
        for it in items:                                   # each sample alone: no padding, plain causal attention
            batch = data.collate([it], tok.eos_id)
            model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
            for i, layer in enumerate(layers):
                attn = layer.self_attn
                q, k, v = attn.queries_keys_values(*inputs[i])                     # (1, nh, T, hs)
                T = q.shape[2]
                logits = q @ k.transpose(-1, -2) / math.sqrt(attn.cfg.head_dim)
                causal = torch.ones(T, T, dtype=torch.bool).tril()
                p = logits.masked_fill(~causal, float("-inf")).softmax(-1)
                own = outputs[i].view(1, T, attn.cfg.num_heads, attn.cfg.head_dim).transpose(1, 2)
                torch.testing.assert_close(p @ v, own, atol=1e-5, rtol=1e-5)     # the logits SDPA used
                seen[i]["logits"].append(logits[:, :, 1:][causal[1:].expand_as(logits[:, :, 1:])].abs())
                seen[i]["top"].append(p[:, :, 1:].amax(-1).flatten())
    rows = ev.attention_logits(model, tok, sets, cpu, n=5, batch_size=4)
    assert len(rows) == len(layers)
    for i, row in enumerate(rows):
        logits, top = torch.cat(seen[i]["logits"]), torch.cat(seen[i]["top"])
        expected = {"max |logit|": logits.max(), "mean |logit|": logits.mean(), "mean top weight": top.mean(),
                    "rows > 0.99": (top > 0.99).float().mean()}
        for key, value in expected.items():
            assert row[key] == pytest.approx(float(value), rel=1e-4, abs=1e-6), (i, key)
    assert all(0 < r["mean |logit|"] < r["max |logit|"] and 0 < r["mean top weight"] <= 1 for r in rows)
