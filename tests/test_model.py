"""The model core against the reference implementations (transformers, on the same weights, fp32) and against
independent straightforward computations where no reference exists (TinyGPT-V's post-attention RMSNorm)."""

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import tinyvlm as tv
import weights
from conftest import randomize_

TOL = 1e-4   # fp32, max abs difference of logits / features


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------- Phi-2 parity

@pytest.mark.parametrize("qk", [False, True], ids=["phi2", "phi2+qk_layernorm"])
def test_phi_matches_transformers(hf_phi_dirs, qk):
    ref, folder = hf_phi_dirs[qk]
    ours = weights.load_phi(folder).eval()
    assert ours.cfg.qk_norm == qk and ours.cfg.rotary_dim == 6        # 0.4 * 16, as Phi-2's 32 of 80
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = max_diff(ref(ids).logits, ours(ids))
    print(f"Phi parity (qk_layernorm={qk}): max |logit diff| = {diff:.2e}")
    assert diff <= TOL


def test_phi_matches_transformers_with_padding(hf_phi_dirs):
    ref, folder = hf_phi_dirs[True]
    ours = weights.load_phi(folder).eval()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])       # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, position_ids=pos).logits
        b = ours(ids, attention_mask=mask, position_ids=pos)
    assert max_diff(a[mask.bool()], b[mask.bool()]) <= TOL


def msft_layout(ref) -> dict:
    """The older phi-msft checkpoint layout of the same weights (Wqkv rows in q | k | v blocks)."""
    sd, out = ref.state_dict(), {}
    out["transformer.embd.wte.weight"] = sd["model.embed_tokens.weight"]
    for i in range(ref.config.num_hidden_layers):
        p = f"model.layers.{i}."
        q = f"transformer.h.{i}."
        for w in ("weight", "bias"):
            out[q + f"ln.{w}"] = sd[p + f"input_layernorm.{w}"]
            out[q + f"mixer.Wqkv.{w}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{w}"] for x in "qkv"])
            out[q + f"mixer.out_proj.{w}"] = sd[p + f"self_attn.dense.{w}"]
            out[q + f"mlp.fc1.{w}"] = sd[p + f"mlp.fc1.{w}"]
            out[q + f"mlp.fc2.{w}"] = sd[p + f"mlp.fc2.{w}"]
    for w in ("weight", "bias"):
        out[f"lm_head.ln.{w}"] = sd[f"model.final_layernorm.{w}"]
        out[f"lm_head.linear.{w}"] = sd[f"lm_head.{w}"]
    return {k: v.contiguous() for k, v in out.items()}


def test_phi_msft_format(hf_phi_dirs, tmp_path):
    ref, _ = hf_phi_dirs[False]
    c = ref.config
    save_file(msft_layout(ref), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "phi-msft", "vocab_size": c.vocab_size, "n_embd": c.hidden_size, "n_layer": c.num_hidden_layers,
        "n_head": c.num_attention_heads, "n_inner": c.intermediate_size, "rotary_dim": 6, "n_positions": 256,
        "layer_norm_epsilon": c.layer_norm_eps}))
    ours = weights.load_phi(tmp_path).eval()
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert max_diff(ref(ids).logits, ours(ids)) <= TOL


def test_fused_per_head_qkv_equals_separate_qkv(hf_phi_dirs, tmp_path):
    """TinyGPT-V's query_key_value, rows interleaved per head, gives the same outputs as HF's q/k/v projections."""
    ref, folder = hf_phi_dirs[True]
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    nh = ref.config.num_attention_heads
    for i in range(ref.config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        for w in ("weight", "bias"):
            q, k, v = (sd.pop(p + f"{x}_proj.{w}") for x in "qkv")
            # the spec's formula: stack per head, then flatten: rows ordered (head, q/k/v, dim)
            sd[p + f"query_key_value.{w}"] = torch.stack(
                [q.view(nh, -1, *q.shape[1:]), k.view(nh, -1, *k.shape[1:]), v.view(nh, -1, *v.shape[1:])], 1
            ).reshape(3 * q.shape[0], *q.shape[1:])
            assert torch.equal(weights.qkv_to_per_head(torch.cat([q, k, v]), nh), sd[p + f"query_key_value.{w}"])
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ours = weights.load_phi(tmp_path).eval()
    ids = torch.randint(0, 101, (2, 15))
    with torch.no_grad():
        assert max_diff(ref(ids).logits, ours(ids)) <= TOL


def naive_phi(model: tv.Phi, ids: torch.Tensor) -> torch.Tensor:
    """A straightforward, loop-per-head Phi forward written from the paper's equations, independent of the
    model's code paths (no SDPA, no fused reshapes):  x = x + RMS(attn(LN(x))) + mlp(LN(x))."""
    cfg = model.cfg
    T, hs, rd = ids.shape[1], cfg.head_dim, cfg.rotary_dim
    x = model.embed_tokens.weight[ids[0]]                                     # (T, C)

    def layer_norm(v, w, b, eps):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + eps) * w + b

    def rope(v):      # v (T, hs): rotate pairs (j, j + rd/2) of the first rd dims by angle pos * theta^(-2j/rd)
        out = v.clone()
        for t in range(T):
            for j in range(rd // 2):
                a = t * cfg.rope_theta ** (-2 * j / rd)
                x1, x2 = v[t, j], v[t, j + rd // 2]
                out[t, j] = x1 * math.cos(a) - x2 * math.sin(a)
                out[t, j + rd // 2] = x2 * math.cos(a) + x1 * math.sin(a)
        return out

    for blk in model.layers:
        at = blk.self_attn
        h = layer_norm(x, blk.input_layernorm.weight, blk.input_layernorm.bias, cfg.eps)
        qkv = h @ at.qkv.weight.T + at.qkv.bias
        q, k, v = qkv.split(cfg.hidden, dim=-1)
        heads = []
        for n in range(cfg.num_heads):
            sl = slice(n * hs, (n + 1) * hs)
            qn = layer_norm(q[:, sl], at.q_layernorm.weight, at.q_layernorm.bias, cfg.eps)
            kn = layer_norm(k[:, sl], at.k_layernorm.weight, at.k_layernorm.bias, cfg.eps)
            scores = rope(qn) @ rope(kn).T / math.sqrt(hs)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, sl])
        attn = torch.cat(heads, -1) @ at.dense.weight.T + at.dense.bias
        rms = attn / torch.sqrt((attn ** 2).mean(-1, keepdim=True) + cfg.post_attn_norm_eps) * blk.post_attn_norm.weight
        mlp = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias, approximate="tanh") @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        x = x + rms + mlp
    x = layer_norm(x, model.final_layernorm.weight, model.final_layernorm.bias, cfg.eps)
    return (x @ model.lm_head.weight.T + model.lm_head.bias)[None]


def test_tinygptv_norms_match_independent_computation():
    cfg = tv.PhiConfig(vocab_size=53, hidden=48, num_layers=2, num_heads=3, mlp_dim=96, rotary_dim=6,
                       qk_norm=True, post_attn_norm=True)
    torch.manual_seed(0)
    model = randomize_(tv.Phi(cfg)).eval()
    ids = torch.randint(0, 53, (1, 12))
    with torch.no_grad():
        diff = max_diff(model(ids), naive_phi(model, ids))
    print(f"TinyGPT-V Phi (QK-norm + post-attention RMSNorm) vs naive computation: {diff:.2e}")
    assert diff <= TOL
    # and the RMSNorm does something: switching it off (weights kept) changes the logits
    off = tv.Phi(dataclasses.replace(cfg, post_attn_norm=False)).eval()
    off.load_state_dict({k: v for k, v in model.state_dict().items() if "post_attn_norm" not in k})
    with torch.no_grad():
        assert max_diff(model(ids), off(ids)) > 1e-2


def test_phi2_adds_tinygptv_norms_at_identity_init(hf_phi_dirs):
    """microsoft/phi-2 has no q/k/post norms: asked for them, the loader creates them at their init values
    (LayerNorm 1/0, RMSNorm 1) and says which parameters it did not find by leaving them there; every other key
    must still be present."""
    _, folder = hf_phi_dirs[False]
    m = weights.load_phi(folder, qk_norm=True, post_attn_norm=True)
    at = m.layers[0].self_attn
    assert torch.equal(at.q_layernorm.weight, torch.ones(16)) and torch.equal(at.k_layernorm.bias, torch.zeros(16))
    assert torch.equal(m.layers[2].post_attn_norm.weight, torch.ones(64))


def test_phi2_real_size_parameter_count():
    with torch.device("meta"):
        phi = tv.Phi(tv.PhiConfig())
        vlm = tv.TinyVLM(tv.PRESETS["tinygptv"]())
    assert sum(p.numel() for p in phi.parameters()) == 2_779_683_840
    n_vit = sum(p.numel() for p in vlm.vit.parameters())
    n_qformer = sum(p.numel() for p in vlm.qformer.parameters())
    assert 0.98e9 < n_vit < 1.0e9 and 1.0e8 < n_qformer < 1.1e8, (n_vit, n_qformer)
    lora = sum(p.numel() for n, p in vlm.named_parameters() if "lora_" in n)
    assert lora == 31_457_280


# ---------------------------------------------------------------------------------------------------- BLIP-2 parity

def test_vit_matches_transformers(hf_blip2_dir):
    ref, folder = hf_blip2_dir
    vit = weights.load_vit(folder).eval()
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        diff = max_diff(ref.vision_model(px).last_hidden_state, vit(px))
    print(f"ViT + ln_vision parity: {diff:.2e}")
    assert diff <= TOL


def test_vit_interpolates_positions_like_transformers(hf_blip2_dir):
    ref, folder = hf_blip2_dir
    vit = weights.load_vit(folder).eval()
    px = torch.randn(1, 3, 112, 112)     # twice the trained size, as 448 px is for TinyGPT-V's stage 4
    with torch.no_grad():
        a = ref.vision_model(px, interpolate_pos_encoding=True).last_hidden_state
        b = vit(px)
    assert b.shape == (1, 65, 48) and max_diff(a, b) <= TOL


def test_qformer_matches_transformers(hf_blip2_dir):
    ref, folder = hf_blip2_dir
    qformer = weights.load_qformer(folder).eval()
    assert [layer.cross_attn is not None for layer in qformer.layers] == [True, False, True]
    image = torch.randn(2, 17, 48)
    with torch.no_grad():
        a = ref.qformer(query_embeds=ref.query_tokens.expand(2, -1, -1), encoder_hidden_states=image,
                        encoder_attention_mask=torch.ones(2, 17, dtype=torch.long)).last_hidden_state
        b = qformer(image)
    diff = max_diff(a, b)
    print(f"Q-Former parity: {diff:.2e}")
    assert b.shape == (2, 8, 32) and diff <= TOL


def lavis_layout(ref):
    """The same weights in LAVIS's pickles: eva_vit_g.pth (+ one extra block, unused) and blip2_pretrained.pth."""
    sd = ref.state_dict()
    vit, blip2 = {}, {}
    v = "vision_model."
    vit["cls_token"] = sd[v + "embeddings.class_embedding"]
    vit["pos_embed"] = sd[v + "embeddings.position_embedding"]
    vit["patch_embed.proj.weight"] = sd[v + "embeddings.patch_embedding.weight"]
    vit["patch_embed.proj.bias"] = sd[v + "embeddings.patch_embedding.bias"]
    n = ref.config.vision_config.num_hidden_layers
    for i in range(n + 1):
        src = f"{v}encoder.layers.{min(i, n - 1)}."
        dst = f"blocks.{i}."
        qkv_bias = sd[src + "self_attn.qkv.bias"].chunk(3)
        vit[dst + "attn.qkv.weight"] = sd[src + "self_attn.qkv.weight"]
        vit[dst + "attn.q_bias"], vit[dst + "attn.v_bias"] = qkv_bias[0], qkv_bias[2]
        for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for w in ("weight", "bias"):
                vit[dst + f"{ours}.{w}"] = sd[src + f"{theirs}.{w}"]
    for w in ("weight", "bias"):
        blip2[f"ln_vision.{w}"] = sd[f"{v}post_layernorm.{w}"]
        blip2[f"Qformer.bert.embeddings.LayerNorm.{w}"] = sd[f"qformer.layernorm.{w}"]
    blip2["query_tokens"] = sd["query_tokens"]
    for k, t in sd.items():
        if k.startswith("qformer.encoder."):
            blip2[k.replace("qformer.encoder.", "Qformer.bert.encoder.").replace("attention.attention.", "attention.self.")
                  .replace("crossattention.attention.", "crossattention.self.")] = t
    # parts of the pickle that TinyGPT-V does not use
    blip2["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(10, 32)
    blip2["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(64, 32)
    blip2["t5_proj.weight"] = torch.zeros(4, 32)
    return vit, {"model": blip2}


def test_lavis_pickles(hf_blip2_dir, tmp_path):
    ref, _ = hf_blip2_dir
    vit_sd, blip2_sd = lavis_layout(ref)
    torch.save(vit_sd, tmp_path / "eva_vit_g.pth")
    torch.save(blip2_sd, tmp_path / "blip2_pretrained_flant5xxl.pth")
    vit = weights.load_vit(tmp_path / "eva_vit_g.pth", ln_vision=tmp_path / "blip2_pretrained_flant5xxl.pth",
                                 image_size=56, width=48, num_layers=3, num_heads=4, mlp_dim=96, ln_vision_eps=1e-6).eval()
    qformer = weights.load_qformer(tmp_path / "blip2_pretrained_flant5xxl.pth", cfg=tv.QFormerConfig(
        num_queries=8, hidden=32, num_layers=3, num_heads=4, mlp_dim=64, vision_width=48)).eval()
    px = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        feats = ref.vision_model(px).last_hidden_state
        assert max_diff(feats, vit(px)) <= TOL
        q = ref.qformer(query_embeds=ref.query_tokens, encoder_hidden_states=feats).last_hidden_state
        assert max_diff(q, qformer(feats)) <= TOL
    with pytest.raises(weights.CheckpointError, match="ln_vision"):
        weights.load_vit(tmp_path / "eva_vit_g.pth", width=48, num_layers=3, num_heads=4, mlp_dim=96)


def test_clip_and_siglip_vision_match_transformers(tmp_path):
    """CLIP as openai publishes it (a whole CLIPModel: vision_model.* beside text_model.*), SigLIP as a vision tower
    saved on its own (no prefix)."""
    from transformers import CLIPConfig, CLIPModel, SiglipVisionConfig, SiglipVisionModel
    common = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    clip_cfg = CLIPConfig(vision_config=common, text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32,
                                                                 num_hidden_layers=1, num_attention_heads=2))
    for name, ref in (("clip", CLIPModel(clip_cfg)), ("siglip", SiglipVisionModel(SiglipVisionConfig(**common)))):
        randomize_(ref).eval()
        ref.save_pretrained(tmp_path / name)
        vit = weights.load_vit(tmp_path / name).eval()
        px = torch.randn(2, 3, 32, 32)
        tower = ref.vision_model if name == "clip" else ref
        with torch.no_grad():
            diff = max_diff(tower(px).last_hidden_state, vit(px))
        print(f"{name} vision parity: {diff:.2e}")
        assert diff <= TOL, name


# ---------------------------------------------------------------------------------------------------- LoRA

def test_lora_starts_as_identity_and_merges_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48)
    x = torch.randn(4, 32)
    y0 = base(x)
    lora = tv.LoRALinear.wrap(base, tv.LoRAConfig(rank=4, alpha=8, dropout=0.0))
    assert lora.weight is base.weight and torch.count_nonzero(lora.lora_B) == 0
    assert torch.equal(lora(x), y0)                              # B = 0: exactly the base model
    with torch.no_grad():
        lora.lora_B.normal_()
    w0 = lora.weight.detach().clone()
    y = lora(x)
    assert max_diff(y, y0) > 1e-2
    assert max_diff(y, y0 + x @ (lora.lora_B @ lora.lora_A).T * 2.0) <= 1e-5    # scaling alpha / rank = 2
    lora.merge()
    assert lora.merged and max_diff(lora(x), y) <= 1e-5         # merged == unmerged output
    lora.unmerge()
    assert max_diff(lora.weight, w0) <= 1e-6                     # merge then unmerge restores W
    assert max_diff(lora(x), y) <= 1e-6


def test_lora_placement_and_gradients():
    model = tv.TinyVLM.from_preset("tiny")
    names = [n for n, m in model.named_modules() if isinstance(m, tv.LoRALinear)]
    assert len(names) == 2 * model.cfg.phi.num_layers
    assert all(n.endswith(("self_attn.qkv", "self_attn.dense")) and n.startswith("phi.") for n in names)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in tv.lora_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    ids = torch.randint(0, 100, (1, 8))
    model.phi(ids).sum().backward()
    assert all(layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0 for layer in tv.lora_layers(model))


# ---------------------------------------------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def small_phi():
    torch.manual_seed(0)
    cfg = tv.PhiConfig(vocab_size=61, hidden=64, num_layers=2, num_heads=4, mlp_dim=128, rotary_dim=8,
                       max_positions=128, qk_norm=True, post_attn_norm=True)
    return randomize_(tv.Phi(cfg), seed=3).eval()


def greedy_without_cache(phi, ids, n):
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = phi(ids)[:, -1].argmax(-1)
        out.append(int(nxt))
        ids = torch.cat([ids, nxt[:, None]], 1)
    return out


def test_kv_cache_generation_equals_no_cache(small_phi):
    ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(4))
    assert tv.generate(small_phi, ids, max_new_tokens=25)[0] == greedy_without_cache(small_phi, ids, 25)
    with torch.no_grad():                                 # prefill's shortcut: the output layer on the last position
        torch.testing.assert_close(small_phi(ids, last_only=True), small_phi(ids)[:, -1:], rtol=1e-6, atol=1e-6)


def test_attention_bias_masks_only_what_needs_masking():
    """No mask where nothing is padded and the queries need none (causal from position 0 is SDPA's is_causal; one
    query after the cache sees every key); one after a cache or with padding; a padding mask of the wrong length is
    refused."""
    ones = torch.ones(2, 5, dtype=torch.long)
    assert tv.attention_bias(ones, 0, 5, "cpu") is None and tv.attention_bias(ones, 4, 1, "cpu") is None
    assert tv.attention_bias(None, 0, 5, "cpu") is None and tv.attention_bias(None, 4, 1, "cpu") is None
    after_cache = tv.attention_bias(None, 3, 2, "cpu")                      # two queries after three cached keys
    assert after_cache.tolist() == [[[[True, True, True, True, False], [True] * 5]]]
    padded = ones.clone()
    padded[0, 0] = 0                                                        # row 0's first key is padding
    mask = tv.attention_bias(padded, 4, 1, "cpu")
    assert mask.shape == (2, 1, 1, 5) and mask[0, 0, 0].tolist() == [False, True, True, True, True] and mask[1].all()
    with pytest.raises(ValueError, match="covers 5 positions, expected 6"):
        tv.attention_bias(ones, 5, 1, "cpu")


def test_a_prompt_attends_in_the_model_dtype_and_is_cached_in_fp32(small_phi):
    """On a CPU the cache is fp32 (one query's attention is far faster so); the prompt, with nothing cached before
    it, attends over its own keys and values in the model's dtype: a bf16 prefill through the cache computes
    exactly the pass without one, and what it cached is those keys and values, widened."""
    phi = copy.deepcopy(small_phi).to(torch.bfloat16)
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = phi.embed_tokens(ids)
        cache = tv.KVCache(phi.cfg, 1, 16, "cpu", x.dtype)
        logits = tv.prefill(phi, x, torch.ones_like(ids), cache)
        assert cache.k.dtype == torch.float32
        torch.testing.assert_close(logits, phi(ids)[:, -1], rtol=0, atol=0)
        first = phi.layers[0]
        v = first.self_attn.qkv(first.input_layernorm(x)).view(1, 9, 3, 4, 16)[:, :, 2].transpose(1, 2)  # (B, nh, T, hs)
        assert torch.equal(cache.v[0, :, :, :9], v.float())       # the values as computed, widened exactly


def test_generation_matches_transformers_greedy(hf_phi_dirs):
    ref, folder = hf_phi_dirs[True]
    ours = weights.load_phi(folder).eval()
    ids = torch.randint(0, 101, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = ref.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:]
    assert tv.generate(ours, ids, max_new_tokens=20)[0] == theirs.tolist()


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padded_generation_equals_one_by_one(small_phi, side):
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 61, (n,), generator=g) for n in (3, 9, 6)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        ids[b, sl], mask[b, sl] = p, 1
    batched = tv.generate(small_phi, ids, mask, max_new_tokens=12)
    single = [tv.generate(small_phi, p[None], max_new_tokens=12)[0] for p in prompts]
    assert batched == single


def test_streaming_eos_and_stop_strings(small_phi):
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(7))
    full = tv.generate(small_phi, ids, max_new_tokens=15)
    streamed = [[], []]
    for token, active in tv.generate_stream(small_phi, small_phi.embed_tokens(ids), max_new_tokens=15):
        for b in range(2):
            if active[b]:
                streamed[b].append(int(token[b]))
    assert streamed == full
    # eos: the row stops before the eos token
    eos = full[0][4]
    cut = tv.generate(small_phi, ids[:1], max_new_tokens=15, eos_token_id=eos)[0]
    assert cut == full[0][:full[0].index(eos)]
    # stop strings: decoded text; the row stops at the token that completes the stop string
    decode = lambda toks: "".join(chr(65 + t % 26) for t in toks)
    text = decode(full[1])
    stop = text[6:8]
    out = tv.generate(small_phi, ids[1:], max_new_tokens=15, stop_strings=(stop,), decode=decode)[0]
    assert decode(out).endswith(stop) and stop not in decode(out[:-1]) and full[1][:len(out)] == out


def test_sampling_options():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(tv.sample_next(logits, None, temperature=1.0, top_k=1), greedy)
    assert torch.equal(tv.sample_next(logits, None, temperature=1.0, top_p=1e-6), greedy)
    a = tv.sample_next(logits, None, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(1))
    b = tv.sample_next(logits, None, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert all(int(a[i]) in logits[i].topk(10).indices.tolist() for i in range(4))
    # repetition penalty, checked against transformers' logits processor
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    history = torch.randint(0, 50, (4, 6), generator=g)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone()).argmax(-1)
    assert torch.equal(tv.sample_next(logits, history, repetition_penalty=1.3), expected)
    # top-p keeps the smallest set whose mass reaches p (a token outside it is never drawn)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = {int(tv.sample_next(probs.log(), None, temperature=1.0, top_p=0.75,
                                generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}


# ---------------------------------------------------------------------------------------------------- the whole VLM

def tiny_vlm(**overrides):
    torch.manual_seed(0)
    return randomize_(tv.TinyVLM.from_preset("tiny", **overrides)).eval()


def test_image_splice_and_answer_only_loss():
    model = tiny_vlm()
    n = model.cfg.num_image_tokens
    px = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([[1, 2] + [tv.IMAGE_TOKEN] * n + [3, 4, 5, 6],
                        [1] + [tv.IMAGE_TOKEN] * n + [7, 8, 9, 10, 11]])
    labels = torch.full_like(ids, tv.IGNORE_INDEX)
    labels[:, -3:] = ids[:, -3:]
    with torch.no_grad():
        img = model.encode_image(px)
        x = model.embed(ids, img)
        logits, loss = model(px, ids, labels=labels)
    assert img.shape == (2, n, model.cfg.phi.hidden)
    assert torch.equal(x[0, 2:2 + n], img[0]) and torch.equal(x[1, 1:1 + n], img[1])
    assert torch.equal(x[0, -1], model.phi.embed_tokens.weight[6])
    # the loss is the cross-entropy of the answer tokens only
    logp = logits.log_softmax(-1)
    manual = -torch.stack([logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(ids.shape[1] - 3, ids.shape[1])]).mean()
    assert abs(loss.item() - manual.item()) < 1e-5
    with pytest.raises(ValueError, match="image slots"):
        model.embed(ids[:, :-n], img)


def test_vlm_generation_with_cache_equals_without():
    model = tiny_vlm()
    n = model.cfg.num_image_tokens
    px = torch.randn(1, 3, 64, 64)
    ids = torch.tensor([[1] + [tv.IMAGE_TOKEN] * n + [5, 6, 7]])
    out = model.generate(px, ids, max_new_tokens=10)[0]
    with torch.no_grad():
        x = model.embed(ids, model.encode_image(px))
        ref = []
        for _ in range(10):
            nxt = model.phi(inputs_embeds=x)[:, -1].argmax(-1)
            ref.append(int(nxt))
            x = torch.cat([x, model.phi.embed_tokens(nxt)[:, None]], 1)
    assert out == ref


def test_mlp_connector():
    model = tiny_vlm(connector="mlp")
    n = (64 // model.cfg.vit.patch_size) ** 2 + 1                  # every ViT token, CLS included
    assert not hasattr(model, "qformer") and model.cfg.num_image_tokens == n
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, n, model.cfg.phi.hidden)


@pytest.mark.parametrize("fastest", ["mv", "linear"])
def test_one_bf16_row_takes_the_fastest_kernel_on_cpu(monkeypatch, fastest):
    """Decoding multiplies one row by each frozen bf16 weight: that goes to torch.mv's kernel or F.linear, whichever
    this CPU streams faster (weights.bf16_row_kernel; each simulated here), equal to F.linear to two bf16 roundings,
    with the input's leading shape kept. Two rows, a weight being trained, autocast and fp16 weights keep F.linear."""
    monkeypatch.setattr(weights, "BF16_ROW_SECONDS", {"mv": 1.0, "linear": 2.0, "packed": 0.5} if fastest == "mv"
                        else {"mv": 2.0, "linear": 1.0})
    calls, mv = [], weights.bf16_matrix_vector
    monkeypatch.setattr(weights, "bf16_matrix_vector", lambda *a: calls.append(1) or mv(*a))
    torch.manual_seed(0)
    layer = weights.CPUHalfLinear(256, 96).to(torch.bfloat16)

    def product(x):
        calls.clear()
        y = layer(x)
        return bool(calls), y

    for shape in ((1, 256), (1, 1, 256), (256,)):
        x = torch.randn(shape).bfloat16()
        with torch.inference_mode():
            was, y = product(x)
        assert was == (fastest == "mv") and y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 96)
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=2 ** -7, atol=1e-2)
    one, two = torch.randn(1, 256).bfloat16(), torch.randn(2, 256).bfloat16()
    with torch.inference_mode():
        assert not product(two)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not product(one)[0]
    assert not product(one)[0]                                   # the weight is being trained
    with torch.inference_mode():
        layer.half()
        assert not product(one.half())[0]


def test_half_precision_linear_widens_many_rows_on_cpu(monkeypatch):
    """On a CPU without bf16 instructions a frozen bf16 weight x many rows is computed in fp32 (faster there, and
    more exact), forward and backward, with or without autocast, a block of rows at a time; a few rows, and a weight
    being trained, keep the ordinary half-precision product. On a CPU with them bf16 is multiplied as it is, fp16
    still widened. (The numbers alone cannot tell the paths apart: the native bf16 product also sums in fp32. So
    the widened calls are counted.) Both kinds of CPU are simulated, whichever this one is."""
    monkeypatch.setattr(weights, "NATIVE_BF16", False)
    monkeypatch.setattr(weights.WidenedLinear, "BLOCK_NUMEL", 64 * 10)       # blocks of 10 rows: 5 for 48 rows
    calls, apply = [], weights.WidenedLinear.apply
    monkeypatch.setattr(weights.WidenedLinear, "apply", lambda *args: calls.append(1) or apply(*args))

    def widened(fn):
        calls.clear()
        out = fn()
        return bool(calls), out

    torch.manual_seed(0)
    layer = weights.CPUHalfLinear(64, 48).to(torch.bfloat16)               # parameters require grad, as a loaded model's do
    w, b = layer.weight.float(), layer.bias.float()
    many, few = torch.randn(40, 64).bfloat16(), torch.randn(2, 64).bfloat16()
    with torch.inference_mode():                               # inference: no gradient is computed
        was, y = widened(lambda: layer(many))
        assert was and torch.equal(y, F.linear(many.float(), w, b).bfloat16())
        was, y = widened(lambda: layer(few))
        assert not was and torch.equal(y, F.linear(few, layer.weight, layer.bias))

    was, y = widened(lambda: layer(many))                      # the weight is being trained: the native product
    assert not was and torch.equal(y, F.linear(many, layer.weight, layer.bias))
    y.sum().backward()
    assert layer.weight.grad is not None

    layer.requires_grad_(False)                                # training through a frozen layer: grad @ W in fp32
    x = many.clone().requires_grad_()
    was, y = widened(lambda: layer(x))
    assert was and torch.equal(y, F.linear(many.float(), w, b).bfloat16())
    grad = torch.randn(40, 48).bfloat16()
    y.backward(grad)
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, (grad.float() @ w).bfloat16())

    x32 = many.float().requires_grad_()                        # under autocast: autocast's output dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        was, y = widened(lambda: layer(x32))
    assert was and y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x32.detach(), w, b).bfloat16())
    y.backward(grad)
    assert x32.grad.dtype == torch.float32
    torch.testing.assert_close(x32.grad, grad.float() @ w, rtol=1e-6, atol=1e-6)   # blocks summed in their order

    trained = weights.CPUHalfLinear(64, 48)                           # an fp32 trained weight under autocast: not cast down
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = trained(many)
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(many.float(), trained.weight, trained.bias).bfloat16())
    y.float().sum().backward()
    assert trained.weight.grad.dtype == torch.float32

    monkeypatch.setattr(weights, "NATIVE_BF16", True)          # avx512_bf16 / AMX: bf16 as it is, fp16 still widened
    with torch.inference_mode():
        was, y = widened(lambda: layer(many))
        assert not was and torch.equal(y, F.linear(many, layer.weight, layer.bias))
        was, _ = widened(lambda: layer.half()(many.half()))
        assert was
