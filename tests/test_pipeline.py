"""P2LPipeline serves the harnesses: per-image prompts / embeddings, datasets in padded
batches of one compiled program, and the one identity -> key rule (bit-identical to the rule
the benchmark tables were made with)."""

from __future__ import annotations

import hashlib
import zlib

import jax
import numpy as np
import pytest

from p2l_jax.errors import P2LError
from p2l_jax.operators import Inpainting, noise_key
from p2l_jax.parallel import image_key, image_keys, index_identities, map_batches
from p2l_jax.pipeline import Example, P2LPipeline, measure
from p2l_jax.solvers import LDPSConfig

STEPS = 2
PROMPTS = ["a red square", "a blue circle on grey", "", "stripes", "a green star"]


@pytest.fixture(scope="module")
def setup(tiny_sd1_dir):
    from sd_fixtures import box_inpainting_problem

    pipe = P2LPipeline.from_pretrained(tiny_sd1_dir)
    op, x, _ = box_inpainting_problem(5)
    return pipe, op, np.asarray(x)


def test_per_image_prompts_equal_separate_runs(setup):
    """prompts=[p_0, p_1] restores each image as a run of that image alone with
    config.prompt = p_i; embeddings=(B, L, d) of the same texts gives the same images."""
    pipe, op, x = setup
    config = LDPSConfig(num_steps=STEPS)
    kw = dict(operator=op, seed=1, sigma=0.05)
    both = pipe(images=x[:2], identities=["a", "b"], config=config, prompts=PROMPTS[:2], **kw)
    for i, ident in enumerate("ab"):
        alone = pipe(images=x[i:i + 1], identities=[ident],
                     config=LDPSConfig(num_steps=STEPS, prompt=PROMPTS[i]), **kw)
        np.testing.assert_allclose(both.images[i], alone.images[0], atol=1e-5)
        assert both.records[i]["prompt"] == PROMPTS[i]
    C = pipe.model.text_embeddings(PROMPTS[:2])
    given = pipe(images=x[:2], identities=["a", "b"], config=config, embeddings=C, **kw)
    np.testing.assert_array_equal(given.images, both.images)
    # the prompts matter: other texts give other images
    other = pipe(images=x[:2], identities=["a", "b"], config=config, prompts=PROMPTS[2:4], **kw)
    assert np.abs(other.images - both.images).max() > 1e-4
    with pytest.raises(P2LError, match="one text per image"):
        pipe(images=x[:2], identities=["a", "b"], config=config, prompts=["one"], **kw)
    with pytest.raises(P2LError, match=r"embeddings: expected shape \(1 or 2, L, d\)"):
        pipe(images=x[:2], identities=["a", "b"], config=config, embeddings=C[0], **kw)


def test_dataset_of_5_at_batch_4_compiles_one_program_and_equals_unpadded_runs(setup):
    pipe, op, x = setup
    config = LDPSConfig(num_steps=STEPS)
    dataset = [{"identity": str(i), "image": x[i], "prompt": PROMPTS[i]} for i in range(5)]
    before = pipe.compiled_programs()
    out = pipe.run_dataset(dataset, batch_size=4, operator=op, config=config, seed=2,
                           sigma=0.05)
    assert pipe.compiled_programs() - before == 1   # 4 images, then 1 padded to 4: one program
    assert out.images.shape == (5, *x.shape[1:]) and len(out.records) == 5
    assert [r["identity"] for r in out.records] == [str(i) for i in range(5)]
    for i in range(5):   # each image alone, unpadded, its prompt the config's: the same result
        alone = pipe(images=x[i:i + 1], identities=[str(i)], seed=2, sigma=0.05, operator=op,
                     config=LDPSConfig(num_steps=STEPS, prompt=PROMPTS[i]))
        np.testing.assert_allclose(out.images[i], alone.images[0], atol=1e-5)
        np.testing.assert_array_equal(out.measurements[i], alone.measurements[0])
    again = pipe.run_dataset([Example(**d) for d in dataset][::-1], batch_size=4,
                             operator=op, config=config, seed=2, sigma=0.05)
    np.testing.assert_allclose(again.images[::-1], out.images, atol=1e-5)
    with pytest.raises(P2LError, match="dataset item 1: has no prompt"):
        pipe.run_dataset([dataset[0], {"identity": "1", "image": x[1]}], batch_size=2,
                         operator=op, config=config)
    with pytest.raises(P2LError, match="identity '0' appears twice"):
        pipe.run_dataset([dataset[0], dataset[0]], batch_size=2, operator=op, config=config)


def test_key_rule_is_bit_identical_to_the_benchmarks_rule():
    """Sampler key of dataset item i = fold_in(PRNGKey(seed), first 4 bytes (LE) of
    SHA-256(str(i))), noise key = fold_in(key(seed), crc32(str(i))): the rule the tables of
    docs/RESULTS.md were made with, written out here independently of the library."""
    indices = np.array([0, 7, 123, 4999])
    ids = index_identities(indices)
    assert ids == ["0", "7", "123", "4999"]
    for seed in (0, 3):
        old = [jax.random.fold_in(jax.random.PRNGKey(seed), np.uint32(int.from_bytes(
            hashlib.sha256(s.encode()).digest()[:4], "little"))) for s in ids]
        np.testing.assert_array_equal(np.asarray(image_keys(seed, ids)), np.stack(old))
        assert all((np.asarray(image_key(seed, s)) == np.asarray(k)).all()
                   for s, k in zip(ids, old))
        noise = [jax.random.key_data(jax.random.fold_in(jax.random.key(seed),
                                                        np.uint32(zlib.crc32(s.encode()))))
                 for s in ids]
        np.testing.assert_array_equal(
            np.stack([jax.random.key_data(noise_key(seed, s)) for s in ids]), np.stack(noise))


def test_measure_draws_each_images_noise_from_its_identity():
    op = Inpainting(np.ones((8, 8), np.float32))
    x = np.zeros((3, 8, 8, 3), np.float32)
    y = np.asarray(measure(op, x, ["a", "b", "c"], seed=0, sigma=1.0))
    y_ca = np.asarray(measure(op, x[:2], ["c", "a"], seed=0, sigma=1.0))
    np.testing.assert_array_equal(y_ca, y[[2, 0]])
    np.testing.assert_allclose(y[1], np.asarray(op.measure(x[1:2], noise_key(0, "b"), 1.0))[0])
    assert np.abs(y[1] - y[0]).max() > 0.1      # other identities, other noise


def test_map_batches_pads_the_last_batch_and_drops_the_padding():
    calls = []

    def fn(a, b):
        calls.append(a.shape)
        return {"sum": a + b, "first": a[:, 0]}

    a = np.arange(10.0).reshape(5, 2)
    out, timing = map_batches(fn, 2, a, 10 * a)
    assert calls == [(2, 2)] * 3                     # one shape: 2 + 2 + (1 padded to 2)
    np.testing.assert_array_equal(out["sum"], 11 * a)
    np.testing.assert_array_equal(out["first"], a[:, 0])
    assert timing["batches"] == 3 and timing["batch_size"] == 2
    assert timing["steady_s_per_item"] is not None
