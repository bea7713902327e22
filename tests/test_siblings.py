"""The sibling models (TinyLLaVA Factory, legacy TinyLLaVA, Imp old and new, llava-hf): a tiny random transformers
LlavaForConditionalGeneration (SigLIP without its head + Phi) is the oracle; its weights are saved in each family's
on-disk layout, keys renamed as the released files have them, and must load through weights.load_llava_family to the
same image features, connector outputs and logits (fp32)."""

import json

import pytest
import torch
from safetensors.torch import save_file

import data
import weights
from conftest import lm_attention_rows, randomize_
from test_model import msft_layout

TOL = 1e-4
IMAGE_ID = 100          # the oracle's image token; our IMAGE_TOKEN slots sit where it repeats


def tiny_llava(strategy: str):
    """The oracle: SigLIP (4 blocks, features of the 3rd: layer -2) -> MLP -> Phi, the first token dropped
    ("default") or not ("full")."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PhiConfig, SiglipVisionConfig
    vision = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                image_size=28, patch_size=7, vision_use_head=False)
    text = PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     partial_rotary_factor=0.4, max_position_embeddings=128, resid_pdrop=0.0, embd_pdrop=0.0)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy, projector_hidden_act="gelu")
    torch.manual_seed(0)
    return randomize_(LlavaForConditionalGeneration(cfg)).eval()


def parts(ref) -> tuple[dict, dict, dict, dict]:
    """The oracle's weights in the canonical names: SigLIP under vision_model., connector.{0,2}., Phi as
    PhiForCausalLM names it (model.*, lm_head.*)."""
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    vision = {"vision_model." + k[len("model.vision_tower."):]: v for k, v in sd.items() if k.startswith("model.vision_tower.")}
    connector = {k.replace("model.multi_modal_projector.linear_1.", "connector.0.")
                  .replace("model.multi_modal_projector.linear_2.", "connector.2."): v
                 for k, v in sd.items() if k.startswith("model.multi_modal_projector.")}
    phi = {"model." + k[len("model.language_model."):]: v for k, v in sd.items() if k.startswith("model.language_model.")}
    phi["lm_head.weight"] = sd["lm_head.weight"]
    return vision, connector, phi, sd


def write(folder, tensors: dict, config: dict, shards: int = 1, pickle: bool = False):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if pickle:
        torch.save(tensors, folder / "pytorch_model.bin")
        return folder
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
        return folder
    keys, weight_map = sorted(tensors), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: tensors[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def renamed(tensors: dict, old: str, new: str) -> dict:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}


TOWER = "tests/tiny-siglip"      # a tower name as legacy TinyLLaVA and Imp give it, with the tiny one's facts


def layouts(tmp_path, monkeypatch) -> dict:
    """{name: (folder, oracle)}: the same oracles' weights in each released layout."""
    monkeypatch.setitem(weights.VISION_TOWERS, TOWER, {"model_type": "siglip_vision_model", "hidden_size": 48,
                        "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 28,
                        "patch_size": 7, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6})
    default, full = tiny_llava("default"), tiny_llava("full")
    out = {}
    vision, connector, phi, sd = parts(default)
    text = default.config.text_config.to_dict()
    # TinyLLaVA Factory: PhiForCausalLM inside (its lm_head has a bias: the oracle's has none, so zeros), 2 shards
    tensors = {**{"vision_tower._vision_tower." + k: v for k, v in vision.items()},
               **{"connector._connector." + k[len("connector."):]: v for k, v in connector.items()},
               **{"language_model." + k: v for k, v in phi.items()},
               "language_model.lm_head.bias": torch.zeros(128)}
    out["tinyllava"] = (write(tmp_path / "factory", tensors, {
        "model_type": "tinyllava", "text_config": text, "vision_config": default.config.vision_config.to_dict(),
        "vision_feature_layer": -2, "vision_feature_select_strategy": "patch", "connector_type": "mlp2x_gelu",
        "image_aspect_ratio": "square"}, shards=2), default)
    # llava-hf as older transformers saved it
    tensors = {**{"vision_tower." + k: v for k, v in vision.items()},
               **renamed(renamed(connector, "connector.0.", "multi_modal_projector.linear_1."), "connector.2.",
                         "multi_modal_projector.linear_2."),
               **{"language_model." + k: v for k, v in phi.items()}}
    out["llava-hf"] = (write(tmp_path / "llava_hf", tensors, default.config.to_dict()), default)
    vision, connector, phi, sd = parts(full)
    phi_top = {**full.config.text_config.to_dict(), "model_type": None}
    # legacy TinyLLaVA: the tower cut after the selected layer (3 of 4 blocks kept), post_layernorm still stored
    kept = {k: v for k, v in vision.items() if "encoder.layers.3." not in k}
    tensors = {**{"model.vision_tower.vision_tower." + k: v for k, v in kept.items()},
               **{"model.mm_projector." + k[len("connector."):]: v for k, v in connector.items()}, **phi}
    out["tinyllava-legacy"] = (write(tmp_path / "legacy", tensors, {
        **phi_top, "model_type": "tiny_llava_phi", "mm_vision_tower": TOWER, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}), full)
    # Imp, newer revisions: HF Phi names, safetensors
    tensors = {**{"model.vision_tower.vision_tower." + k: v for k, v in vision.items()},
               **{"model.mm_projector." + k[len("connector."):]: v for k, v in connector.items()}, **phi,
               "lm_head.bias": torch.zeros(128)}
    out["imp"] = (write(tmp_path / "imp_new", tensors, {**phi_top, "model_type": "imp", "mm_vision_tower": TOWER,
                                                         "mm_vision_select_layer": -2}), full)
    # Imp, older revisions: phi-msft names (Wqkv fused as q | k | v), a .bin pickle, the vocabulary padded
    class Ref:             # test_model.msft_layout reads a PhiForCausalLM's state_dict and config
        config = full.config.text_config
        state_dict = staticmethod(lambda: {**phi, "lm_head.bias": torch.zeros(128)})
    tensors = {**msft_layout(Ref), **{"transformer.vision_tower.vision_tower." + k: v for k, v in vision.items()},
               **{"transformer.mm_projector." + k[len("connector."):]: v for k, v in connector.items()}}
    for key in ("transformer.embd.wte.weight", "lm_head.linear.weight", "lm_head.linear.bias"):   # 128 -> 192 rows
        tensors[key] = torch.cat([tensors[key], torch.randn(64, *tensors[key].shape[1:])])
    c = full.config.text_config          # its vocab_size (150) is not the weights' 192 rows: the weights decide
    out["imp-msft"] = (write(tmp_path / "imp_old", tensors, {
        "model_type": "imp", "vocab_size": 150, "n_embd": c.hidden_size, "n_layer": c.num_hidden_layers,
        "n_head": c.num_attention_heads, "n_inner": c.intermediate_size, "rotary_dim": 6, "n_positions": 128,
        "layer_norm_epsilon": c.layer_norm_eps, "mm_vision_tower": TOWER, "mm_vision_select_layer": -2},
        pickle=True), full)
    return out


@pytest.mark.parametrize("layout", ["tinyllava", "tinyllava-legacy", "imp", "imp-msft", "llava-hf"])
def test_each_released_layout_matches_the_reference(layout, tmp_path, monkeypatch):
    folder, ref = layouts(tmp_path, monkeypatch)[layout]
    ours, facts = weights.load_llava_family(folder)
    assert facts.family == layout.replace("-msft", "") and facts.image_size == 28
    assert facts.pad_to_square == (layout == "tinyllava-legacy")
    drop = ref.config.vision_feature_select_strategy == "default"
    n = 16 - drop                                        # 4 x 4 patches, the first dropped or not
    assert ours.cfg.num_image_tokens == n
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 28, 28)
    ids = torch.cat([torch.randint(0, 100, (2, 3)), torch.full((2, n), IMAGE_ID), torch.randint(0, 100, (2, 5))], 1)
    with torch.no_grad():
        hidden = ref.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        want_features = hidden[:, 1:] if drop else hidden
        assert (ours.visual_features(pixels) - want_features).abs().max() <= TOL
        assert (ours.connect(want_features) - ref.model.multi_modal_projector(want_features)).abs().max() <= TOL
        want = ref(input_ids=ids, pixel_values=pixels).logits
        got, _ = ours(pixels, ids.masked_fill(ids == IMAGE_ID, data.IMAGE_TOKEN))
    assert (got[..., :128] - want).abs().max() <= TOL
    if layout == "imp-msft":                              # the padded rows exist, and are the file's
        assert got.shape[-1] == 192


def test_a_released_lm_head_bias_is_applied(tmp_path, monkeypatch):
    """TinyLLaVA Factory's PhiForCausalLM has an lm_head bias (the oracle's Llava head has none): a nonzero one
    shifts our logits by exactly it."""
    folder, ref = layouts(tmp_path, monkeypatch)["tinyllava"]
    base, _ = weights.load_llava_family(folder)
    tensors = weights.read_weights(folder)
    bias = torch.randn(128)
    tensors = {k: v.clone() for k, v in tensors.items()} | {"language_model.lm_head.bias": bias}
    config = json.loads((folder / "config.json").read_text())
    biased, _ = weights.load_llava_family(write(tmp_path / "biased", tensors, config))
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        assert (biased(None, ids)[0] - base(None, ids)[0] - bias).abs().max() <= TOL


def test_bad_family_files_are_named(tmp_path, monkeypatch):
    folder, _ = layouts(tmp_path, monkeypatch)["tinyllava"]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    with pytest.raises(weights.CheckpointError, match="model_type 'qwen2_vl' is none of the LLaVA-style families"):
        weights.load_llava_family(folder)
    with pytest.raises(weights.CheckpointError, match="unexpected key 'connector._connector.0.bias' .* of the imp family"):
        weights.load_llava_family(folder, family="imp")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(Exception, match="model-00002-of-00002.safetensors"):
        weights.load_llava_family(folder)


def test_family_prompts_are_the_released_token_ids(phi2_tokenizer_files):
    """TinyLLaVA's "phi" template and llava-hf's, built as their code builds them (the text split at <image>, each
    piece tokenized alone, the image's slots between), with transformers' tokenizer on Phi-2's files."""
    from tokenizers import AddedToken
    from transformers import CodeGenTokenizer
    folder, out = phi2_tokenizer_files
    ours = data.Tokenizer.from_file(out)
    ref = CodeGenTokenizer(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))
    ref.add_tokens([AddedToken(t, normalized=True, special=False) for t in data.phi2_whitespace_tokens()])
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
    q, n = "What is the cat doing?", 729
    for family, text in (("tinyllava", f"{system} USER: <image>\n{q} ASSISTANT:"),
                         ("imp", f"{system} USER: <image>\n{q} ASSISTANT:"),
                         ("llava-hf", f"USER: <image>\n{q} ASSISTANT:")):
        before, after = text.split("<image>")
        want = ref(before)["input_ids"] + [data.IMAGE_TOKEN] * n + ref(after)["input_ids"]
        assert data.family_prompt(family, q, ours, n) == want, family


def test_siglip_pictures_as_its_processor_prepares_them():
    from transformers import SiglipImageProcessor
    rng = torch.Generator().manual_seed(0)
    from PIL import Image
    img = Image.fromarray(torch.randint(0, 256, (50, 80, 3), generator=rng, dtype=torch.uint8).numpy())
    want = SiglipImageProcessor(size={"height": 28, "width": 28})(img, return_tensors="pt")["pixel_values"][0]
    got = data.preprocess(img, 28, data.SIGLIP_MEAN, data.SIGLIP_STD)
    assert (got - want).abs().max() <= 1e-5
    padded = data.preprocess(img, 28, data.SIGLIP_MEAN, data.SIGLIP_STD, pad=(127, 127, 127))
    grey = (127 / 255 - 0.5) / 0.5                      # legacy TinyLLaVA's bands above and below the 80 x 50 picture
    assert torch.allclose(padded[:, 0, 14], torch.full((3,), grey)) and torch.allclose(padded[:, 27, 14], torch.full((3,), grey))
    assert not torch.allclose(padded[:, 14, 14], torch.full((3,), grey))


def test_a_tinyllava_folder_answers_through_the_command_line(tmp_path, capsys, monkeypatch):
    """python tinyvlm.py --model DIR --image X "question": the answer printed is the reference model's own greedy
    answer to the same prompt (here with the shapes tokenizer, in a model whose vocabulary covers it)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PhiConfig, SiglipVisionConfig
    import chat
    tok = data.shapes_tokenizer()
    vocab = len(tok) + 1
    vision = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                image_size=28, patch_size=7, vision_use_head=False)
    text = PhiConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     partial_rotary_factor=0.4, max_position_embeddings=256, eos_token_id=tok.eos_id,
                     bos_token_id=tok.eos_id)
    torch.manual_seed(0)
    ref = randomize_(LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=vocab - 1,
        vision_feature_layer=-2, vision_feature_select_strategy="default"))).eval()
    vision_w, connector, phi, _ = parts(ref)
    folder = write(tmp_path / "tinyllava", {
        **{"vision_tower._vision_tower." + k: v for k, v in vision_w.items()},
        **{"connector._connector." + k[len("connector."):]: v for k, v in connector.items()},
        **{"language_model." + k: v for k, v in phi.items()}, "language_model.lm_head.bias": torch.zeros(vocab)},
        {"model_type": "tinyllava", "text_config": text.to_dict(), "vision_config": vision.to_dict(),
         "vision_feature_layer": -2, "image_aspect_ratio": "square"})
    (folder / "tokenizer.json").write_text(tok.to_str())
    data.write_scene(tmp_path / "scene.png")
    chat.main(["--model", str(folder), "--image", str(tmp_path / "scene.png"), "--max-new-tokens", "8",
               "what is it?"])
    printed = capsys.readouterr().out.strip()
    ids = data.family_prompt("tinyllava", "what is it?", tok, 15)
    ids = torch.tensor([[vocab - 1 if t == data.IMAGE_TOKEN else t for t in ids]])
    pixels = data.preprocess(data.open_image(tmp_path / "scene.png"), 28, data.SIGLIP_MEAN, data.SIGLIP_STD)[None]
    with torch.no_grad():
        out = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False)
    assert printed == tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()
    chat.main(["--model", str(folder), "--image", str(tmp_path / "scene.png"), "--max-new-tokens", "8",
               "--quantize", "int8", "what is it?"])                       # int8 weights: it still answers
    assert capsys.readouterr().out.strip()

    # --lm-attention: the weights it reads are the reference's own (its eager attention returns them)
    ours, _ = weights.load_llava_family(folder)
    prompt = data.family_prompt("tinyllava", "what is it?", tok, 15)
    with torch.no_grad():
        attention, logits = chat.lm_attention(ours, ours.visual_features(pixels), prompt)
        ref.set_attn_implementation("eager")
        want = ref(input_ids=ids, pixel_values=pixels, output_attentions=True)
    assert len(attention) == len(want.attentions) == 2
    for got, reference in zip(attention, want.attentions):
        torch.testing.assert_close(got, reference[0, :, -1], atol=1e-5, rtol=1e-5)       # (nh, T): the last position
    torch.testing.assert_close(logits, want.logits[0, -1], atol=1e-4, rtol=1e-4)
    chat.main(["--model", str(folder), "--image", str(tmp_path / "scene.png"), "--max-new-tokens", "8",
               "--lm-attention", "what is it?"])
    err = capsys.readouterr().err
    table = lm_attention_rows(err)
    assert [row.split()[0] for row in table] == ["0", "1"] and "image token k: the ViT's output token k" in err, err


def test_fp16_files_load_and_compute_in_fp32(tmp_path, monkeypatch):
    """TinyLLaVA's released weights are fp16: they load as they are (no fp32 copy), products in fp32 on a CPU and
    activations in fp16, so the logits are the reference's (its weights rounded to fp16 the same way) up to fp16's
    rounding of the activations (measured 4e-3 here on logits of about 2)."""
    folder, ref = layouts(tmp_path, monkeypatch)["tinyllava"]
    tensors = {k: v.half() for k, v in weights.read_weights(folder).items()}
    config = json.loads((folder / "config.json").read_text())
    ours, _ = weights.load_llava_family(write(tmp_path / "fp16", tensors, config))
    assert ours.phi.layers[0].mlp.fc1.weight.dtype == torch.float16
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
        pixels = torch.randn(1, 3, 28, 28)
        ids = torch.cat([torch.randint(0, 100, (1, 3)), torch.full((1, 15), IMAGE_ID)], 1)
        want = ref(input_ids=ids, pixel_values=pixels).logits
        got, _ = ours(pixels, ids.masked_fill(ids == IMAGE_ID, data.IMAGE_TOKEN))
    assert (got.float()[..., :128] - want).abs().max() <= 1e-2
