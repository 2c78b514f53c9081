"""Loading diffusers-format directories: strictness, error messages, formats, no torch at run time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import p2l_jax
from p2l_jax.errors import P2LError

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"
TEXT_FILE = Path("text_encoder") / "model.safetensors"


@pytest.fixture()
def sd1_copy(tiny_sd1_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, dst)
    return dst


def _edit_tensors(file: Path, edit) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def _probe(model):
    """A fixed set of outputs that any correct loading path must reproduce exactly."""
    key = jax.random.PRNGKey(0)
    z = jax.random.normal(key, (1, model.sample_size, model.sample_size, model.latent_channels))
    C = model.text_embeddings(["a red circle"])
    return np.asarray(C), np.asarray(model.eps(z, 500, C)), np.asarray(model.decode(z))


def test_model_api_shapes(tiny_sd1_dir):
    m = p2l_jax.load_model(tiny_sd1_dir)
    C = m.text_embeddings(["", "a photo"])
    assert C.shape == (2, 77, m.embedding_dim)
    z = jnp.zeros((2, 8, 6, 4))
    assert m.eps(z, jnp.array([10, 900]), C).shape == z.shape
    x = m.decode(z)
    assert x.shape == (2, 64, 48, 3)
    assert m.encode(x).shape == z.shape
    assert m.image_size == 64 and m.vae_scale_factor == 8
    assert m.scaling_factor == pytest.approx(0.18215)


def test_model_is_a_pytree_usable_under_jit(tiny_sd1_dir):
    m = p2l_jax.load_model(tiny_sd1_dir)
    leaves, treedef = jax.tree_util.tree_flatten(m)
    assert all(isinstance(x, jax.Array) for x in leaves)
    m2 = jax.tree_util.tree_unflatten(treedef, leaves)
    z = jnp.ones((1, 8, 8, 4))
    C = m.text_embeddings([""])
    f = jax.jit(lambda m, z: m.eps(z, 3, C))
    np.testing.assert_array_equal(f(m2, z), f(m, z))
    np.testing.assert_allclose(f(m, z), m.eps(z, 3, C), rtol=1e-4, atol=1e-5)


def test_text_encoder_with_and_without_prefix(sd1_copy):
    reference = _probe(p2l_jax.load_model(sd1_copy))
    _edit_tensors(sd1_copy / TEXT_FILE, lambda t: t.update(
        {("text_model." + k): t.pop(k) for k in list(t)}))
    assert all(k.startswith("text_model.") for k in load_file(str(sd1_copy / TEXT_FILE)))
    for a, b in zip(reference, _probe(p2l_jax.load_model(sd1_copy))):
        np.testing.assert_array_equal(a, b)


def test_missing_and_unexpected_keys_are_named(sd1_copy):
    def edit(t):
        t["extra.weight"] = np.zeros(3, np.float32)
        del t["conv_in.weight"]
    _edit_tensors(sd1_copy / UNET_FILE, edit)
    with pytest.raises(P2LError, match=r"missing keys 1: conv_in\.weight.*unexpected keys 1: extra\.weight"):
        p2l_jax.load_model(sd1_copy)


def test_shape_mismatch_names_key_and_shapes(sd1_copy):
    _edit_tensors(sd1_copy / UNET_FILE, lambda t: t.update({"conv_in.bias": np.zeros(7, np.float32)}))
    with pytest.raises(P2LError, match=r"conv_in\.bias: checkpoint \(7,\), model expects \(32,\)"):
        p2l_jax.load_model(sd1_copy)


def test_unknown_block_type_is_named(sd1_copy):
    cfg_file = sd1_copy / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["down_block_types"] = ["CrossAttnDownBlock2D", "FancyDownBlock9D"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(P2LError, match="FancyDownBlock9D"):
        p2l_jax.load_model(sd1_copy)


def test_not_a_diffusers_layout(tmp_path, sd1_copy):
    with pytest.raises(P2LError, match="model directory not found"):
        p2l_jax.load_model(tmp_path / "nope")
    with pytest.raises(P2LError, match="no model_index.json"):
        p2l_jax.load_model(tmp_path)
    shutil.rmtree(sd1_copy / "vae")
    with pytest.raises(P2LError, match="missing component folder.*vae"):
        p2l_jax.load_model(sd1_copy)


def test_pickles_refused_unless_allowed(sd1_copy):
    import torch

    reference = _probe(p2l_jax.load_model(sd1_copy))
    tensors = load_file(str(sd1_copy / UNET_FILE))
    (sd1_copy / UNET_FILE).unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
               sd1_copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(P2LError, match=r"diffusion_pytorch_model\.bin: pickled checkpoints .* refused"):
        p2l_jax.load_model(sd1_copy)
    for a, b in zip(reference, _probe(p2l_jax.load_model(sd1_copy, allow_pickle=True))):
        np.testing.assert_array_equal(a, b)


def test_convert_round_trip_and_refuses_existing_output(tiny_sd1_dir, tmp_path):
    from p2l_jax.cli import main

    out = tmp_path / "converted"
    assert main(["convert", "--model", str(tiny_sd1_dir), "--output", str(out)]) == 0
    assert (out / "p2l_jax_converted.json").is_file()
    assert not list((out / "unet").glob("*.safetensors"))
    for a, b in zip(_probe(p2l_jax.load_model(tiny_sd1_dir)), _probe(p2l_jax.load_model(out))):
        np.testing.assert_array_equal(a, b)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", "--model", str(tiny_sd1_dir), "--output", str(out)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing partial left behind


def test_bfloat16_casts_parameters(tiny_sd1_dir):
    m32 = p2l_jax.load_model(tiny_sd1_dir)
    m16 = p2l_jax.load_model(tiny_sd1_dir, dtype="bfloat16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(m16.params)} == {jnp.dtype(jnp.bfloat16)}
    z = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 4))
    C = m32.text_embeddings([""])
    e32, e16 = m32.eps(z, 400, C), m16.eps(z, 400, C)
    assert e16.dtype == jnp.float32  # solvers always see float32
    rel = float(jnp.linalg.norm(e16 - e32) / jnp.linalg.norm(e32))
    assert 0 < rel < 5e-2
    with pytest.raises(P2LError, match="dtype='float16'"):
        p2l_jax.load_model(tiny_sd1_dir, dtype="float16")


def test_import_and_load_do_not_import_torch(tiny_sd1_dir):
    code = (
        "import sys, p2l_jax\n"
        f"m = p2l_jax.load_model({str(tiny_sd1_dir)!r})\n"
        "m.text_embeddings(['x'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
