"""DDIM sampling through the driver equals diffusers' ``StableDiffusionPipeline`` with a
``DDIMScheduler`` on the same checkpoint and the same starting noise z_T.

This pins the conventions a user comparing with other code meets: timestep spacing and the
final alpha, classifier-free guidance with the negative prompt, v-prediction, and the returned
image being the decoded *final latent* D(z_0) (not D of the last Tweedie estimate).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import p2l_jax
from p2l_jax.solvers import DDIMConfig, solve
from p2l_jax.solvers.common import initial_latents
from p2l_jax.solvers.driver import per_sample_keys

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

STEPS = 4
PROMPTS = ["a red square", "a blue circle"]


pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.mark.parametrize("layout, guidance, eta", [("sd1", 7.5, 0.0), ("sd2", 1.0, 0.0)])
def test_ddim_matches_diffusers_pipeline(layout, guidance, eta, tiny_sd1_dir, tiny_sd2_dir):
    directory = tiny_sd1_dir if layout == "sd1" else tiny_sd2_dir
    model = p2l_jax.load_model(directory)
    keys = per_sample_keys(jax.random.key(3), len(PROMPTS))  # one key per sample: the batch
    latent_shape = (model.sample_size, model.sample_size, model.latent_channels)
    z_T = np.asarray(initial_latents(keys, latent_shape))

    config = DDIMConfig(num_steps=STEPS, eta=eta, guidance_scale=guidance)
    ours = solve(model, None, None, keys, config, embedding=model.text_embeddings(PROMPTS))
    ours = np.clip(np.asarray(ours.images) / 2 + 0.5, 0.0, 1.0)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(directory, safety_checker=None,
                                                              requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = model.image_size
    with torch.no_grad():
        theirs = pipe(PROMPTS, height=size, width=size, num_inference_steps=STEPS,
                      guidance_scale=guidance, eta=eta, output_type="np",
                      latents=torch.from_numpy(z_T.transpose(0, 3, 1, 2).copy())).images
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)
