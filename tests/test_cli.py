"""`python tinyvlm.py --image ...`: on a real photo, with boxes drawn, the attention picture and int8, and the
clear errors for a corrupt image, an unknown task identifier and a box the model cannot read."""

import copy
import io
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import chat
import cli
import quantize
import tinyvlm as tv
import train
import weights
from conftest import attention_inputs_and_outputs, lm_attention_rows


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


def test_a_box_the_model_cannot_read_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """A box with three numbers, or one past 100, or an [identify] question without its box, would be answered as
    if it were some other box: it is refused, naming it, before the model loads; in --chat it costs that question,
    not the conversation."""
    import data
    stage4 = str(train.ASSETS / "stage4.safetensors")
    data.write_scene(tmp_path / "scene.png", seed=3)
    common = ["--image", str(tmp_path / "scene.png"), "--checkpoint", stage4, "--max-new-tokens", "8"]
    for task, question, named in [("[identify]", "what object is in this location {<13><16><47>}", "{<13><16><47>}"),
                                  ("[identify]", "what is at {<13><16><47><150>}", "{<13><16><47><150>}"),
                                  ("[identify]", "what is at {<50><16><47><60>}", "{<50><16><47><60>}"),   # x1 > x2
                                  ("[identify]", "what object is in this location", "in one box"),
                                  ("[vqa]", "is there a circle in {<1><2><3>}?", "{<1><2><3>}")]:
        with pytest.raises(SystemExit) as e:
            cli.run(chat.main, [*common, "--task", task, question])
        err = capsys.readouterr().err
        assert e.value.code == 2 and named in err and "model:" not in err and len(err.strip().splitlines()) == 1
    assert data.check_question_boxes("what is at {<13><16><47><50>}?", "[identify]")
    monkeypatch.setattr("sys.stdin", io.StringIO("is there a circle in {<1><2>}?\nhow many shapes are there?\n"))
    chat.main([*common, "--chat"])
    out = capsys.readouterr()
    answers = out.out.split("tinyvlm> ")[1:]
    assert "the box '{<1><2>}' is not" in out.err and len(answers) == 1 and answers[0].splitlines()[0] == "4"


def test_a_long_chat_forgets_its_oldest_turns(tmp_path, capsys, monkeypatch):
    """--chat past the model's 512 positions goes on, forgetting its oldest turns and saying so; a question too
    long even alone is refused, and the conversation goes on after it."""
    import data
    data.write_scene(tmp_path / "scene.png", seed=3)
    questions = ["what color is the circle? " * 120] + ["how many shapes are there in this picture?"] * 40
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(questions) + "\n"))
    chat.main(["--image", str(tmp_path / "scene.png"), "--checkpoint", str(train.ASSETS / "stage4.safetensors"),
               "--chat", "--max-new-tokens", "8"])
    out = capsys.readouterr()
    assert "do not fit in the model's 512 positions" in out.err and "forgets its first 1 turn(s)" in out.err
    assert len(out.out.split("tinyvlm> ")[1:]) == 40


@pytest.fixture(scope="module")
def quantized_answers(checkpoint, tmp_path_factory, command_lines):
    """{mode: the run of `python tinyvlm.py --quantized FILE --device cpu --image red.png`} on a file saved by
    quantize.py in that mode, each in a process of its own."""
    folder = tmp_path_factory.mktemp("quantized")
    cfg = train.resolve(train.TrainConfig(stage=1, init=str(checkpoint)))
    model, _ = train.build_model(cfg, torch.device("cpu"))
    Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "red.png")
    commands = {}
    for mode in quantize.MODES:
        path = quantize.save_quantized(quantize.quantize_model(copy.deepcopy(model).eval(), mode, quantize.PARTS,
                                                               group=64),
                                       folder / f"{mode}.safetensors", stage=1, image_size=cfg.image_size)
        commands[mode] = ("tinyvlm.py", ["--quantized", str(path), "--device", "cpu", "--image", str(folder / "red.png"),
                                         "--max-new-tokens", "6"])
    runs = command_lines.run_all(list(commands.values()), folder)
    return dict(zip(commands, runs))


@pytest.mark.parametrize("mode", quantize.MODES)
def test_saved_quantized_model_answers_in_a_process_of_its_own(quantized_answers, mode):
    """As a user runs it: a file saved by quantize.py, then `python tinyvlm.py --quantized FILE --device cpu` in a
    process of its own, so a crash in a kernel is a failed test with its exit code, not a dead test runner."""
    proc = quantized_answers[mode]
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip()


def test_a_released_tinygptv_checkpoint_through_the_cli(tmp_path, hf_blip2_dir, command_lines, monkeypatch, capsys):
    """TinyGPT-V_for_Stage4.pth as the original runner saves it (trained tensors under "model", plus the Q-Former's
    position-id buffer, the optimizer, config, scaler and epoch), on a Phi folder of .bin pickles (Phi-2's first
    revisions) and a BLIP-2 folder: loaded with its sizes read off the file, every key used, its bf16 layers packed
    where oneDNN's layout is the fastest (simulated here), asked in a process of its own."""
    import shutil
    from transformers import PhiConfig, PhiForCausalLM
    from conftest import randomize_
    from test_checkpoints import stage_checkpoint, vlm_config
    import data
    phi = randomize_(PhiForCausalLM(PhiConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, partial_rotary_factor=0.4, qk_layernorm=True)))
    phi.config.save_pretrained(tmp_path / "phi")          # the weights as pytorch_model.bin, as Phi-2 first shipped
    torch.save(phi.state_dict(), tmp_path / "phi" / "pytorch_model.bin")
    sd = stage_checkpoint(vlm_config(), tv.PhiConfig(hidden=64, num_heads=4, num_layers=2), stage=4)
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    release = tmp_path / "TinyGPT-V_for_Stage4.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
                "config": {"run": {"task": "image_text_pretrain"}}, "scaler": None, "epoch": 49}, release)
    blip2 = str(hf_blip2_dir[1])
    cfg = chat.ChatConfig(checkpoint=str(release), phi=str(tmp_path / "phi"), blip2=blip2,
                          tokenizer=str(data.SHAPES_TOKENIZER))
    monkeypatch.setattr(weights, "BF16_ROW_SECONDS", {"mv": 2.0, "linear": 2.0, "packed": 1.0})
    loaded = chat.load_model(cfg, torch.device("cpu"))
    assert (loaded.stage, loaded.image_size, loaded.model.cfg.lora.rank, loaded.model.cfg.proj_dim) == (4, 112, 4, 24)
    layer = loaded.model.phi.layers[0]
    for packed in (layer.mlp.fc1, layer.self_attn.qkv):               # with bf16 instructions: packed, LoRA merged
        assert isinstance(packed, quantize.Bf16Linear) == weights.PACKED_BF16
    assert loaded.model.cfg.prompt_layout == "tinygptv"          # asked in the tokens it was trained on
    assert torch.equal(loaded.model.llama_proj2.weight, sd["llama_proj2.weight"])

    Image.new("RGB", (80, 60), (200, 40, 40)).save(tmp_path / "red.png")
    chat.main(["--image", str(tmp_path / "red.png"), "--checkpoint", str(release), "--phi", str(tmp_path / "phi"),
               "--blip2", blip2, "--tokenizer", str(data.SHAPES_TOKENIZER), "--max-new-tokens", "4",
               "--lm-attention", "what is it?"])
    out = capsys.readouterr()
    assert out.out.strip()                                # answered, packed (as simulated above) where it can be
    table = lm_attention_rows(out.err)                # and looked inside
    assert [row.split()[0] for row in table] == ["0", "1"], out.err
    assert f"; {loaded.model.cfg.num_image_tokens} of them are the picture's" in out.err, out.err
    unnamed = tmp_path / "finetuned.pth"                  # the same file under a name that says no stage
    shutil.copy(release, unnamed)
    common = ["--image", str(tmp_path / "red.png"), "--phi", str(tmp_path / "phi"), "--tokenizer",
              str(data.SHAPES_TOKENIZER)]
    run, unnamed_run = command_lines.run_all(
        [("tinyvlm.py", [*common, "--checkpoint", str(release), "--blip2", blip2, "--max-new-tokens", "4",
                         "what colour is it?"]),
         ("tinyvlm.py", [*common, "--checkpoint", str(unnamed), "q"])], tmp_path)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]
    assert "stage 4" in run.stderr
    assert unnamed_run.returncode == 2 and "--blip2" in unnamed_run.stderr and "Traceback" not in unnamed_run.stderr


def test_before_any_training_the_shipped_stage4_model_answers(tmp_path):
    """A fresh clone, before `train.py` has run: `python tinyvlm.py --image scene.png "..."` asks the shipped stage-4
    model, says so, and answers the held-out scene's count right."""
    import subprocess
    import sys
    from pathlib import Path
    import data
    data.write_scene(tmp_path / "scene.png", seed=3)                     # four shapes
    run = subprocess.run([sys.executable, str(Path(chat.__file__).with_name("tinyvlm.py")), "--image", "scene.png",
                          "how many shapes are there?"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "shipped stage-4 model" in run.stderr and "stage 4" in run.stderr
    assert run.stdout.strip() == "4"


def test_lm_attention_shows_the_weights_each_layer_attends_with(tmp_path, capsys, monkeypatch):
    """--lm-attention: where the language model looks from the prompt's last position, or from a word of the
    question (--lm-attention-at). Each layer's weights times its v are its own attention output at that position
    (what SDPA gave, at the input of its dense), the table names the token the model then writes, and a --chat turn
    without the word is viewed from its answer. (test_siblings holds the weights against transformers' own.)"""
    import data
    data.write_scene(tmp_path / "scene.png", seed=3)                     # four shapes
    ask = ["--image", str(tmp_path / "scene.png"), "--checkpoint", str(train.ASSETS / "stage4.safetensors")]
    loaded = chat.load_model(chat.ChatConfig(checkpoint=ask[3]), torch.device("cpu"))
    question = "how many shapes are there?"
    ids = chat.prompt_ids(loaded, [], question, "[vqa]")
    pixels = data.preprocess(data.open_image(tmp_path / "scene.png"), loaded.image_size)[None]
    layers = loaded.model.phi.layers
    at_word = chat.word_position(loaded.tok, ids, question, "shapes")          # --lm-attention-at shapes
    assert loaded.tok.decode([ids[at_word]]) == " shapes" and at_word < len(ids) - 1
    for position in (len(ids) - 1, at_word):              # each layer's row there, over the positions it sees
        with attention_inputs_and_outputs(layers) as (inputs, outputs), torch.no_grad():
            rows, row_logits = chat.lm_attention(loaded.model, loaded.model.visual_features(pixels), ids, position)
            values = {i: layers[i].self_attn.queries_keys_values(*inputs[i])[2][0] for i in inputs}  # (nh, T, hs)
        assert len(rows) == len(layers) == 4
        for i, w in enumerate(rows):
            nh, seen = w.shape
            assert seen == position + 1 and torch.allclose(w.sum(-1), torch.ones(nh), atol=1e-5)
            own = outputs[i][0, position].view(nh, -1)                                            # (nh, hs)
            torch.testing.assert_close((w[:, None, :] @ values[i][:, :seen])[:, 0], own, atol=1e-5, rtol=1e-5)
        if position == len(ids) - 1:
            attention, logits = rows, row_logits
    chat.main(ask + ["--lm-attention", question])
    out = capsys.readouterr()
    assert out.out.strip() == "4" == loaded.tok.decode([int(logits.argmax())])
    assert "picks its answer's first token ('4' the most likely" in out.err, out.err
    table = lm_attention_rows(out.err)
    assert [row.split()[0] for row in table] == ["0", "1", "2", "3"], out.err
    image = torch.tensor(ids) == tv.IMAGE_TOKEN
    for row, w in zip(table, attention):                  # the heads' mean weight on the picture; the most decided head
        assert row.split()[1] == f"{float(w.mean(0)[image].sum()):.2f}" and f" {float(w.max()):.2f} " in row, row

    # --chat with --lm-attention-at: from the word where a question has it, else from the answer's first token
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{question}\nwhat color is the triangle?\n"))
    chat.main(ask + ["--chat", "--lm-attention-at", "shapes"])
    err = capsys.readouterr().err
    assert err.count("looks at the question's word 'shapes' (' shapes', position ") == 1, err
    assert "--lm-attention-at 'shapes': not a word of this question; the view is from the answer's first token" in err
    assert err.count("looks as it picks its answer's first token ('re' the most likely") == 1, err


def test_lm_attention_token_views_where_a_later_answer_token_is_picked(tmp_path, capsys):
    """--lm-attention-token K: the view from the position whose output is the answer's K-th token, the prompt and
    the answer's first K - 1 tokens read (a greedy answer's token there is the most likely one); past the answer's
    end, from where its last was picked, with a note."""
    import data
    data.write_scene(tmp_path / "scene.png", seed=3)
    ask = ["--image", str(tmp_path / "scene.png"), "--checkpoint", str(train.ASSETS / "stage4.safetensors"),
           "--task", "[refer]"]
    cfg = chat.ChatConfig(checkpoint=ask[3], task="[refer]")
    loaded = chat.load_model(cfg, torch.device("cpu"))
    question = "give me the location of the red triangle"
    ids = chat.prompt_ids(loaded, [], question, "[refer]")
    pixels = data.preprocess(data.open_image(tmp_path / "scene.png"), loaded.image_size)[None]
    answer, answer_ids = chat.ask(loaded, loaded.model.visual_features(pixels), [], question, "[refer]", cfg,
                                  torch.device("cpu"), torch.Generator())
    assert data.parse_boxes(answer) and len(answer_ids) > 4                   # {<x1><y1><x2><y2>}, in pieces
    for k in (1, 2, 4, len(answer_ids) + 3):
        capsys.readouterr()
        chat.main(ask + ["--lm-attention-token", str(k), question])
        out = capsys.readouterr()
        seen = min(k, len(answer_ids))
        which = "first token" if seen == 1 else f"token {seen}"
        assert out.out.strip() == answer
        assert f"picks its answer's {which} ({loaded.tok.decode([answer_ids[seen - 1]])!r} the most likely" in out.err
        assert f"over the {len(ids) + seen - 1} positions it sees" in out.err, out.err
        assert (f"the answer has {len(answer_ids)} tokens; the view is from where its last was picked" in out.err) \
            == (k > len(answer_ids))


def test_lm_attention_at_a_word_of_the_question():
    """--lm-attention-at WORD looks from the last token of the word's last whole-word occurrence in the question:
    not from the template after it, nor from a longer word that holds it, and from the last piece of a word the
    tokenizer splits."""
    import data
    tok = data.shapes_tokenizer()
    loaded = train.Loaded(tv.TinyVLM.from_preset("tiny"), tok, 4, 96, "tiny")
    question = "is INST the red circle left of the umbrella or of the red squares?"
    ids = chat.prompt_ids(loaded, [("what color is the circle?", "red")], question, "[vqa]")
    upto = lambda word: tok.decode([t for t in ids[:chat.word_position(tok, ids, question, word) + 1]
                                    if t != tv.IMAGE_TOKEN])
    assert upto("circle").endswith("is INST the red circle")
    assert upto("red").endswith("or of the red")                        # its last occurrence
    assert upto("INST").endswith("is INST")                             # not [/INST] after the question
    assert upto("umbrella").endswith("umbrella") and len(tok.encode(" umbrella")) > 1          # its last piece
    for missing in ("square", "triangle"):                                # part of a word; nowhere
        with pytest.raises(cli.UserError, match=f"--lm-attention-at '{missing}': no such word in the prompt"):
            chat.word_position(tok, ids, question, missing)
    assert chat.word_ends(question, "red") == [question.index("red") + 3, question.rindex("red") + 3]
    assert chat.word_ends(question, "squa") == [] == chat.word_ends(question, " ")


def test_a_question_in_unquoted_words_is_the_same_question(tmp_path, capsys):
    """`python tinyvlm.py --image scene.png how many shapes are there?`, the quotes forgotten, asks what the quoted
    question asks (its words rejoined with single spaces)."""
    import data
    data.write_scene(tmp_path / "scene.png", seed=3)                     # four shapes
    ask = ["--image", str(tmp_path / "scene.png"), "--checkpoint", str(train.ASSETS / "stage4.safetensors")]
    answers = []
    for words in (["how many shapes are there?"], ["how", "many", "shapes", "are", "there?"]):
        chat.main(ask + words)
        answers.append(capsys.readouterr().out.strip())
    assert answers == ["4", "4"]
    with pytest.raises(cli.UserError, match="--chat reads the questions from the terminal"):
        chat.main(ask + ["--chat", "how", "many"])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_command_line_that_hangs_costs_its_test_only(tmp_path, command_lines):
    """The command-line server (tests/cli_processes.py) stops a command line that runs over its batch's time, with the
    processes it started (as torchrun does, one in a session of its own that only the command itself can stop), and
    says so beside the command's own output; the server's next batch runs as usual, and a server that died is
    started again."""
    (tmp_path / "hang.py").write_text(
        "import signal, subprocess, sys, time\n"
        "sleep = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        "own, apart = subprocess.Popen(sleep), subprocess.Popen(sleep, start_new_session=True)\n"
        "signal.signal(signal.SIGTERM, lambda *_: (apart.kill(), apart.wait(), sys.exit(1)))\n"
        "print(own.pid, apart.pid, flush=True)\n"
        "time.sleep(600)\n")
    (tmp_path / "quick.py").write_text("print('done')\n")
    hung, quick = command_lines.run_all([(str(tmp_path / "hang.py"), []), (str(tmp_path / "quick.py"), [])],
                                        tmp_path, timeout=2)
    assert hung.returncode == -9 and "killed, still running after 2 s" in hung.stderr
    for pid in map(int, hung.stdout.split()):            # gone, or a zombie left to init
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", pid
    assert quick.returncode == 0 and quick.stdout == "done\n"
    again, = command_lines.run_all([(str(tmp_path / "quick.py"), [])], tmp_path)
    assert again.returncode == 0 and again.stdout == "done\n"
    command_lines.proc.kill()                  # a server that died is started again: one failure is not every test's
    command_lines.proc.wait()
    again, = command_lines.run_all([(str(tmp_path / "quick.py"), [])], tmp_path)
    assert again.returncode == 0 and again.stdout == "done\n"


def test_an_output_file_replaces_only_its_own_kind(tmp_path):
    """cli.writable_file: a picture, a safetensors file, a captions file or a bench report already at the path is
    an earlier output, replaced; any other file (a typo naming the README) is the user's, and refused; an empty file
    is nothing to lose."""
    import bench
    import data
    picture, safetensors, captions, report = data.PICTURE, weights.SAFETENSORS_FILE, data.CAPTIONS_FILE, bench.REPORT
    data.write_scene(tmp_path / "old.png")
    weights.write_safetensors({"x": torch.zeros(2)}, tmp_path / "old.safetensors", {})
    (tmp_path / "notes.md").write_text("# my notes\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "train.json").write_text('[{"image": "images/1f950.png", "caption": "a croissant"}]\n')
    (tmp_path / "bench.md").write_text(f"{bench.REPORT_TITLE}tiny, 2026-12-07\n")
    for name, kind in (("old.png", picture), ("old.safetensors", safetensors), ("empty.png", picture),
                       ("train.json", captions), ("bench.md", report)):
        assert cli.writable_file(tmp_path / name, "--out", kind) == tmp_path / name
    for name, kind in (("notes.md", picture), ("notes.md", safetensors), ("notes.md", report), ("notes.md", captions),
                       ("old.png", captions), ("old.png", safetensors), ("old.safetensors", picture)):
        with pytest.raises(cli.UserError, match=f"already holds something other than a {kind[0]}"):
            cli.writable_file(tmp_path / name, "--out", kind)
    assert (tmp_path / "notes.md").read_text() == "# my notes\n"
