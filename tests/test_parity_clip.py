"""CLIP text encoder parity with transformers (torch, float32) and the packaged tokenizer.

Tiny random transformers ``CLIPTextModel``s are saved with ``save_pretrained`` and loaded into
the Flax model from ``model.safetensors`` in both key styles (transformers 5, no prefix; SD
checkpoints, ``text_model.`` prefix). Parity bound: ||jax - torch|| / ||torch|| <= 1e-5.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from p2l_jax.errors import P2LError
from p2l_jax.models.clip import CLIPTextConfig, CLIPTextModel
from p2l_jax.tokenizer import default_tokenizer_dir, load_tokenizer, tokenize
from p2l_jax.weights import read_component_tensors, state_from_torch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    # SD-1-like: quick_gelu, 2 layers, 4 heads of 8.
    "sd1": dict(hidden_act="quick_gelu", num_hidden_layers=2, num_attention_heads=4,
                hidden_size=32, intermediate_size=64, max_position_embeddings=16),
    # SD-2-like: exact gelu, 3 layers, 3 heads of 8, a different eps.
    "sd2": dict(hidden_act="gelu", num_hidden_layers=3, num_attention_heads=3,
                hidden_size=24, intermediate_size=40, max_position_embeddings=16,
                layer_norm_eps=1e-6),
}
VOCAB = 97


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def load_clip(directory: Path, *, dtype=jnp.float32, attention_impl="einsum"):
    """config.json + model.safetensors -> jitted pure ``encode(input_ids)`` of CLIPTextModel.

    Shapes come from nnx.eval_shape; the parameters are an argument of the jitted function.
    """
    config = CLIPTextConfig.from_dict(json.loads((directory / "config.json").read_text()))
    abstract = nnx.eval_shape(lambda: CLIPTextModel(config, dtype=dtype, param_dtype=dtype,
                                                    attention_impl=attention_impl,
                                                    rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    tensors = read_component_tensors(directory)
    params = state_from_torch(state, tensors, component="text_encoder")
    apply = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
    return lambda ids: apply(params, ids)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def checkpoint(request, tmp_path_factory):
    """(directories by key style, input ids, torch last_hidden_state)."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=VOCAB, bos_token_id=VOCAB - 2,
                                         eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,
                                         **LAYOUTS[request.param])
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # move every parameter off its structured init (LN = 1/0, ...)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    plain = tmp_path_factory.mktemp(f"{request.param}_plain")
    model.save_pretrained(plain)
    tensors = load_file(plain / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in tensors)  # transformers 5 layout
    prefixed = tmp_path_factory.mktemp(f"{request.param}_prefixed")
    shutil.copy(plain / "config.json", prefixed / "config.json")
    positions = np.arange(config.max_position_embeddings)[None]
    sd_style = {"embeddings.position_ids": positions, **tensors}  # buffer old SD files carry
    save_file({f"text_model.{k}": v for k, v in sd_style.items()}, prefixed / "model.safetensors")

    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    return {"plain": plain, "prefixed": prefixed}, ids, ref


@pytest.mark.parametrize("key_style,impl", [("plain", "einsum"), ("prefixed", "einsum"),
                                            ("plain", "xla")])
def test_last_hidden_state_matches_torch(checkpoint, key_style, impl):
    directories, ids, ref = checkpoint
    encode = load_clip(directories[key_style], attention_impl=impl)
    with jax.default_matmul_precision("highest"):
        out = encode(jnp.asarray(ids, jnp.int32))
    err = rel_err(out, ref)
    print(f"{directories[key_style].name} {impl}: rel err {err:.3e}")
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert err <= 1e-5


def test_bfloat16_keeps_output_dtype_and_stays_close(checkpoint):
    directories, ids, ref = checkpoint
    encode = load_clip(directories["plain"], dtype=jnp.bfloat16)
    out = encode(jnp.asarray(ids, jnp.int32))
    err = rel_err(out.astype(jnp.float32), ref)
    print(f"{directories['plain'].name} bfloat16: rel err {err:.3e}")
    assert out.dtype == jnp.bfloat16
    assert err <= 3e-2


def test_config_from_dict_ignores_unknown_keys_and_names_bad_ones():
    cfg = CLIPTextConfig.from_dict({"hidden_act": "gelu", "num_hidden_layers": 23,
                                    "layer_norm_eps": 1, "architectures": ["CLIPTextModel"]})
    assert (cfg.hidden_act, cfg.num_hidden_layers, cfg.layer_norm_eps) == ("gelu", 23, 1.0)
    with pytest.raises(P2LError, match="hidden_act='relu'"):
        CLIPTextConfig.from_dict({"hidden_act": "relu"}, source="te/config.json")
    with pytest.raises(P2LError, match="te/config.json: key 'hidden_size'"):
        CLIPTextConfig.from_dict({"hidden_size": "512"}, source="te/config.json")
    with pytest.raises(P2LError, match="num_attention_heads=5"):
        CLIPTextConfig.from_dict({"hidden_size": 32, "num_attention_heads": 5})


def test_sequence_longer_than_position_table_and_unknown_kernel_are_refused():
    cfg = CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=4)
    model = nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(P2LError, match="sequence length 5 exceeds max_position_embeddings=4"):
        nnx.eval_shape(lambda m: m(jnp.zeros((1, 5), jnp.int32)), model)
    with pytest.raises(P2LError, match="'flash'"):
        CLIPTextModel(cfg, attention_impl="flash", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------
# Tokenizer


def simple_tokenizer_encode(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]):
    """CLIP SimpleTokenizer's encode (lower-cased, whitespace-collapsed ASCII text)."""
    byte_symbols = {b: s for s, b in zip(list(vocab)[:256], _byte_order())}
    ranks = {m: r for r, m in enumerate(merges)}
    ids = [vocab["<|startoftext|>"]]
    for token in re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
        word = [byte_symbols[b] for b in token.encode()]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[s] for s in word]
    return ids + [vocab["<|endoftext|>"]]


def _byte_order():
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    return printable + [b for b in range(256) if b not in printable]


@pytest.fixture(scope="module")
def packaged():
    directory = default_tokenizer_dir()
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    return load_tokenizer(directory), vocab, [tuple(line.split()) for line in lines[1:]]


def test_packaged_vocab_has_simple_tokenizer_layout(packaged):
    _, vocab, merges = packaged
    tokens = sorted(vocab, key=vocab.get)
    assert len(merges) == 49152 - 256 - 2 and len(tokens) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert [tokens[i] + "</w>" for i in range(256)] == tokens[256:512]
    assert [ord(t) for t in tokens[:3]] == [ord("!"), ord('"'), ord("#")]
    assert tokens[512:-2] == ["".join(m) for m in merges]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]


@pytest.mark.parametrize("prompt", ["a photo of a red striped circle",
                                    "An oil painting, 3 dogs' heads!"])
def test_tokenizer_matches_simple_tokenizer_bpe(packaged, prompt):
    tokenizer, vocab, merges = packaged
    assert tokenizer(prompt).input_ids == simple_tokenizer_encode(prompt, vocab, merges)


def test_tokenize_known_clip_ids_padding_and_truncation(packaged):
    tokenizer = packaged[0]
    ids = tokenize(tokenizer, ["a photo of a cat", "word " * 100])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()  # SD 1.x pads with <|endoftext|>
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and len(set(ids[1, 1:-1])) == 1
    assert tokenize(tokenizer, "a cat", max_length=8).shape == (1, 8)
    with pytest.raises(P2LError, match="no prompts"):
        tokenize(tokenizer, [])


def test_load_tokenizer_names_directory_and_missing_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(P2LError, match=rf"{re.escape(str(tmp_path))} is missing merges.txt"):
        load_tokenizer(tmp_path)


def test_loading_tokenizer_and_clip_imports_no_torch():
    code = ("import sys; from p2l_jax.tokenizer import *; import p2l_jax.models.clip;"
            "t = load_tokenizer(default_tokenizer_dir()); tokenize(t, 'a cat');"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_make_clip_tokenizer_script_on_a_small_merge_list(tmp_path):
    spec = importlib.util.spec_from_file_location("mct", REPO / "scripts/make_clip_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress(b'"bpe.txt#version: 0.2\nh e\nl l</w>\nhe ll</w>\nx y\n'))
    script.convert(bpe, tmp_path / "tok", num_merges=3)  # "x y" lies past the merge count
    tokenizer = load_tokenizer(tmp_path / "tok")
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 512 + 3 + 2
    assert [vocab["he"], vocab["ll</w>"], vocab["hell</w>"]] == [512, 513, 514]
    assert "xy" not in vocab
    assert tokenizer("hell").input_ids == [515, 514, 516]
