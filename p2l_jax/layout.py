"""The model directory layout shared by loading (:mod:`p2l_jax.model`,
:mod:`p2l_jax.pixel_model`) and conversion (:mod:`p2l_jax.convert`): diffusers' component
folders and the converted-model marker."""

#: Folders of a diffusers Stable Diffusion directory.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: The components with parameters.
NETWORKS = ("unet", "vae", "text_encoder")
#: Present in a directory written by ``p2l-jax convert`` (orbax parameters, no safetensors).
CONVERTED_MARKER = "p2l_jax_converted.json"
