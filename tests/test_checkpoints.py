"""Loading the whole model from public-layout folders plus TinyGPT-V stage checkpoints, our own checkpoints, and
every way a checkpoint can be wrong: each must fail loudly, naming the file, the key and the shapes."""

import copy
import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tinyvlm as tv
import weights

TOL = 1e-4


def vlm_config(post_attn_norm=True, lora=True) -> tv.TinyVLMConfig:
    """A config for the tiny reference folders of conftest.py (the loaders take the part sizes from the files)."""
    cfg = tv.PRESETS["tinygptv"]()
    return dataclasses.replace(cfg, proj_dim=24,
                               phi=dataclasses.replace(cfg.phi, post_attn_norm=post_attn_norm),
                               lora=tv.LoRAConfig(rank=4, alpha=1.0, dropout=0.0) if lora else None)


def stage_checkpoint(cfg: tv.TinyVLMConfig, phi_cfg: tv.PhiConfig, stage: int, seed=0) -> dict:
    """A TinyGPT-V_for_Stage{N}.pth 'model' dict with the original key names and the original fused,
    per-head-interleaved query_key_value rows for LoRA B."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    C, hs, L = phi_cfg.hidden, phi_cfg.head_dim, phi_cfg.num_layers
    llm = "llama_model.base_model.model.model." if stage > 1 else "llama_model.model."
    sd = {"llama_proj.weight": r(cfg.proj_dim, 32), "llama_proj.bias": r(cfg.proj_dim),
          "llama_proj2.weight": r(C, cfg.proj_dim), "llama_proj2.bias": r(C),
          llm + "final_layernorm.weight": 1 + r(C)}
    for i in range(L):
        p = f"{llm}layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(C)
        sd[p + "self_attn.q_layernorm.weight"] = 1 + r(hs)
        sd[p + "self_attn.k_layernorm.weight"] = 1 + r(hs)
        sd[p + "post_layernorm.weight"] = 1 + r(C)
        if stage > 1:
            rank = cfg.lora.rank
            sd[p + "self_attn.query_key_value.lora_A.weight"] = r(rank, C)
            sd[p + "self_attn.query_key_value.lora_B.weight"] = r(3 * C, rank)
            sd[p + "self_attn.dense.lora_A.weight"] = r(rank, C)
            sd[p + "self_attn.dense.lora_B.weight"] = r(C, rank)
    return sd


@pytest.fixture
def folders(hf_phi_dirs, hf_blip2_dir):
    return hf_phi_dirs[True], hf_blip2_dir


def test_whole_model_matches_reference_pipeline(folders, tmp_path):
    """weights.load_tinyvlm(phi, blip2, checkpoint) = HF's Blip2 vision + Q-Former -> the two projections ->
    HF's PhiForCausalLM (qk_layernorm) on inputs_embeds, with the stage-1 norms written into the HF model."""
    (ref_phi, phi_dir), (ref_blip2, blip2_dir) = folders
    cfg = vlm_config(post_attn_norm=False, lora=False)
    sd = stage_checkpoint(cfg, tv.PhiConfig(hidden=64, num_heads=4, num_layers=3), stage=1)
    sd = {k: v for k, v in sd.items() if "post_layernorm" not in k}     # HF's Phi has no post-attention RMSNorm
    torch.save({"model": sd, "optimizer": {}, "config": {"run": "stage1"}, "scaler": None, "epoch": 3},
               tmp_path / "stage1.pth")
    model = weights.load_tinyvlm(phi=phi_dir, blip2=blip2_dir, checkpoint=tmp_path / "stage1.pth", cfg=cfg).eval()

    ref_phi = copy.deepcopy(ref_phi)      # the session's reference stays untouched
    with torch.no_grad():
        for k, v in sd.items():
            if k.startswith("llama_model."):
                ref_phi.get_parameter(k.removeprefix("llama_model.")).copy_(v)
    px = torch.randn(2, 3, 56, 56)
    ids = torch.tensor([[5, 6] + [tv.IMAGE_TOKEN] * 8 + [7, 8, 9], [5] + [tv.IMAGE_TOKEN] * 8 + [10, 11, 12, 13]])
    with torch.no_grad():
        feats = ref_blip2.vision_model(px).last_hidden_state
        q = ref_blip2.qformer(query_embeds=ref_blip2.query_tokens.expand(2, -1, -1), encoder_hidden_states=feats).last_hidden_state
        img = (q @ sd["llama_proj.weight"].T + sd["llama_proj.bias"]) @ sd["llama_proj2.weight"].T + sd["llama_proj2.bias"]
        emb = ref_phi.get_input_embeddings()(ids.clamp(min=0))
        emb[ids == tv.IMAGE_TOKEN] = img.reshape(-1, 64)
        expected = ref_phi(inputs_embeds=emb).logits
        logits, _ = model(px, ids)
    diff = (expected - logits).abs().max().item()
    print(f"whole TinyVLM vs HF Blip2 + projections + PhiForCausalLM: {diff:.2e}")
    assert diff <= TOL


def test_tinygptv_stage_checkpoints(folders, tmp_path):
    (_, phi_dir), (_, blip2_dir) = folders
    cfg = vlm_config()
    phi_cfg = tv.PhiConfig(hidden=64, num_heads=4, num_layers=3)
    for stage in (1, 2):
        sd = stage_checkpoint(cfg, phi_cfg, stage, seed=stage)
        torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 0}, tmp_path / f"stage{stage}.pth")
        model = weights.load_tinyvlm(phi_dir, blip2_dir, checkpoint=tmp_path / f"stage{stage}.pth", cfg=cfg)
        llm = "llama_model.base_model.model.model." if stage > 1 else "llama_model.model."
        blk = model.phi.layers[1]
        assert torch.equal(model.llama_proj2.weight, sd["llama_proj2.weight"])
        assert torch.equal(blk.post_attn_norm.weight, sd[llm + "layers.1.post_layernorm.weight"])
        assert torch.equal(blk.self_attn.k_layernorm.weight, sd[llm + "layers.1.self_attn.k_layernorm.weight"])
        if stage == 1:
            assert torch.count_nonzero(blk.self_attn.qkv.lora_B) == 0      # stage 1 has no LoRA: still identity
            continue
        # LoRA on TinyGPT-V's fused, per-head-interleaved query_key_value gives the same q, k, v as ours
        qkv = blk.self_attn.qkv
        A, B = sd[llm + "layers.1.self_attn.query_key_value.lora_A.weight"], sd[llm + "layers.1.self_attn.query_key_value.lora_B.weight"]
        W_il = weights.qkv_to_per_head(qkv.weight.detach(), 4)
        b_il = weights.qkv_to_per_head(qkv.bias.detach(), 4)
        x = torch.randn(3, 64)
        theirs = x @ W_il.T + b_il + (x @ A.T @ B.T) * cfg.lora.alpha / cfg.lora.rank       # rows (head, q/k/v, dim)
        with torch.no_grad():
            assert (weights.qkv_from_per_head(theirs.T, 4).T - qkv(x)).abs().max() <= 1e-5


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tv.TinyVLM.from_preset("tiny").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [model.llama_proj.weight, model.phi.layers[0].self_attn.qkv.lora_B, model.phi.final_layernorm.weight]
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p))
            p.requires_grad_(True)
    path = weights.save_checkpoint(model, tmp_path / "ckpt.safetensors", metadata={"stage": 2})
    assert set(load_file(path)) == {"llama_proj.weight", "phi.layers.0.self_attn.qkv.lora_B", "phi.final_layernorm.weight"}
    assert weights.read_checkpoint_config(path) == model.cfg
    torch.manual_seed(1)
    fresh = tv.TinyVLM(weights.read_checkpoint_config(path)).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()
                           if k not in load_file(path)}, strict=False)
    weights.load_checkpoint(fresh, path)
    px, ids = torch.randn(1, 3, 64, 64), torch.tensor([[1] + [tv.IMAGE_TOKEN] * 16 + [2, 3]])
    with torch.no_grad():
        assert torch.equal(model(px, ids)[0], fresh(px, ids)[0])
    assert list(tmp_path.iterdir()) == [path]          # no temp file left behind


def test_written_safetensors_are_aligned_and_standard(tmp_path):
    """Our writer: every tensor whose size is a multiple of 64 bytes starts on a 64-byte boundary of the file (so
    of a memory map too), and safetensors' own reader reads the file back exactly."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    tensors = {"odd": torch.randn(3), "int8": torch.randint(-9, 9, (64, 48), dtype=torch.int8),
               "bf16": torch.randn(5, 7).bfloat16(), "b": torch.arange(128, dtype=torch.uint8), "empty": torch.ones(0)}
    weights.write_safetensors(tensors, tmp_path / "t.safetensors", {"note": "x"})
    back = load_file(tmp_path / "t.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "x"}
    mapped = weights.read_safetensors(tmp_path / "t.safetensors")
    assert all(mapped[k].data_ptr() % weights.ALIGNMENT == 0 for k in ("int8", "b"))


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = tv.TinyVLM.from_preset("tiny")
    path = weights.save_checkpoint(model, tmp_path / "ckpt.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata):
        open(filename, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        weights.save_checkpoint(model, path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------------------------------------- bad input

def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def single_file_phi(hf_phi_dirs, tmp_path, edit=None):
    """The qk_layernorm Phi reference as one model.safetensors, after edit(state dict)."""
    ref, folder = hf_phi_dirs[True]
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    if edit:
        edit(sd)
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(sd, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    return tmp_path


def test_truncated_safetensors(hf_phi_dirs, tmp_path):
    folder = single_file_phi(hf_phi_dirs, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(weights.CheckpointError, match=r"model\.safetensors: tensor '.*' .* truncated"):
        weights.load_phi(folder)
    (folder / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(weights.CheckpointError, match="not a safetensors file"):
        weights.load_phi(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(weights.CheckpointError, match="corrupt safetensors header"):
        weights.load_phi(folder)


def test_wrong_shape_names_key_and_both_shapes(hf_phi_dirs, tmp_path):
    def edit(sd):
        sd["model.layers.1.mlp.fc1.weight"] = torch.zeros(150, 64)
    folder = single_file_phi(hf_phi_dirs, tmp_path, edit)
    with pytest.raises(weights.CheckpointError, match=r"'model\.layers\.1\.mlp\.fc1\.weight' has shape \(150, 64\) "
                                                 r"but layers\.1\.mlp\.fc1\.weight expects \(160, 64\)"):
        weights.load_phi(folder)


def test_missing_and_unexpected_keys(hf_phi_dirs, tmp_path):
    folder = single_file_phi(hf_phi_dirs, tmp_path / "a", lambda sd: sd.pop("model.layers.2.self_attn.k_proj.bias"))
    with pytest.raises(weights.CheckpointError, match=r"missing key 'model\.layers\.2\.self_attn\.k_proj\.bias'"):
        weights.load_phi(folder)
    folder = single_file_phi(hf_phi_dirs, tmp_path / "b", lambda sd: sd.update({"model.layers.3.mlp.fc1.weight": torch.zeros(2)}))
    with pytest.raises(weights.CheckpointError, match=r"unexpected key 'model\.layers\.3\.mlp\.fc1\.weight' \(2,\)"):
        weights.load_phi(folder)
    # a shard listed in the index but missing the key it promises
    ref, sharded = hf_phi_dirs[False]
    folder = copy_folder(sharded, tmp_path / "c")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra"] = next(iter(index["weight_map"].values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(weights.CheckpointError, match="model.layers.0.extra' is listed in the index but missing"):
        weights.load_phi(folder)


def test_unknown_formats(hf_phi_dirs, hf_blip2_dir, tmp_path):
    (tmp_path / "weights.onnx").write_bytes(b"\0")
    with pytest.raises(weights.CheckpointError, match="unknown format"):
        weights.read_weights(tmp_path / "weights.onnx")
    with pytest.raises(weights.CheckpointError, match="no such file"):
        weights.read_weights(tmp_path / "nothing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(weights.CheckpointError, match="no model.safetensors"):
        weights.read_weights(tmp_path / "empty")
    with pytest.raises(weights.CheckpointError, match="is not Phi"):
        weights.load_phi(hf_blip2_dir[1])
    with pytest.raises(weights.CheckpointError, match="expected a BLIP-2"):
        weights.load_vit(hf_phi_dirs[False][1])
    (tmp_path / "garbage.pth").write_bytes(b"this is not a pickle")
    with pytest.raises(weights.CheckpointError, match="cannot read as a torch checkpoint"):
        weights.read_weights(tmp_path / "garbage.pth")


class Exploit:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")       # torch's note on the raw pickle itself
def test_pickle_never_runs_code(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": {"w": Exploit()}}, f)
    with pytest.raises(weights.CheckpointError):
        weights.read_weights(tmp_path / "evil.pth")
    assert "ran code" not in capsys.readouterr().out


def test_checkpoint_that_does_not_fit_the_model(folders, tmp_path):
    (_, phi_dir), (_, blip2_dir) = folders
    cfg = vlm_config(lora=False)
    sd = stage_checkpoint(vlm_config(), tv.PhiConfig(hidden=64, num_heads=4, num_layers=3), stage=2)
    torch.save({"model": sd}, tmp_path / "stage2.pth")
    with pytest.raises(weights.CheckpointError, match="lora_A.weight' maps to .* which this model does not have"):
        weights.load_tinyvlm(phi_dir, blip2_dir, checkpoint=tmp_path / "stage2.pth", cfg=cfg)
    sd["llama_proj.weight"] = torch.zeros(24, 31)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(weights.CheckpointError, match=r"'llama_proj.weight' has shape \(24, 31\) but llama_proj.weight expects \(24, 32\)"):
        weights.load_tinyvlm(phi_dir, blip2_dir, checkpoint=tmp_path / "bad.pth", cfg=vlm_config())
    sd["something.else"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "odd.pth")
    with pytest.raises(weights.CheckpointError, match="unexpected key 'something.else'"):
        weights.load_tinyvlm(phi_dir, blip2_dir, checkpoint=tmp_path / "odd.pth", cfg=vlm_config())


def test_safetensors_are_memory_mapped_not_copied(hf_phi_dirs):
    """Tensors kept in the file's dtype are views of the file's mapping: loading needs no second copy."""
    _, folder = hf_phi_dirs[False]
    model = weights.load_phi(folder)
    tensors = weights.read_weights(folder)
    w = model.layers[0].mlp.fc1.weight
    assert not w.untyped_storage().resizable()       # storage from torch.frombuffer(mmap), not a fresh allocation
    assert torch.equal(w, tensors["model.layers.0.mlp.fc1.weight"])


@pytest.mark.skipif(weights._LIBC is None or not hasattr(weights._LIBC, "mallopt"), reason="glibc's malloc only")
def test_freed_activations_are_kept_for_reuse():
    """After reuse_freed_memory (which the full-size loaders call), a chain of temporaries like a layer's reuses the
    memory the last one freed rather than faulting in fresh pages (in a fresh interpreter, whose glibc still gives
    the top of its heap back: 7,456 page faults for the same work before the call, on this project's machines)."""
    import subprocess
    import sys
    code = ("import resource, torch, weights\n"
            "def faults():\n"
            "    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    for _ in range(10):\n"
            "        x = torch.ones(1 << 18)                           # 1 MB, then 1.25, 1.5, ... 2.5 MB\n"
            "        for _ in range(6):\n"
            "            x = torch.cat((x, x[: 1 << 16]))              # each freed once the next exists\n"
            "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start\n"
            "faults()\n"
            "before = faults()\n"
            "weights.reuse_freed_memory()\n"
            "faults()\n"
            "print(before, faults())\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    print(f"page faults for the same temporaries: {before} before the call, {after} after it")
    assert after < 100
