"""Tiny random Stable-Diffusion-layout checkpoints, written by diffusers/transformers themselves.

The directories these functions write are real diffusers pipelines (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, safetensors), so the
tests exercise exactly the loading path a user's SD checkpoint takes, at a size that compiles
in seconds on a CPU.

Two layouts cover the options SD 1.x and 2.x configure differently:

* ``sd1``: conv ``proj_in``/``proj_out``, one head count for every block, quick_gelu CLIP,
  epsilon prediction.
* ``sd2``: linear projections, a per-block head list, ``upcast_attention``, gelu CLIP,
  v-prediction (as SD 2.x 768 px).
"""

from __future__ import annotations

from pathlib import Path

TINY_VOCAB_SIZE = 514  # 256 byte tokens, their word-final forms, <|startoftext|>, <|endoftext|>


def tiny_clip_tokenizer():
    """A real ``CLIPTokenizer`` with a byte-level vocabulary and no merges (514 tokens)."""
    from transformers import CLIPTokenizer

    from p2l_jax.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_components(layout: str = "sd1", seed: int = 0, sample_size: int = 8):
    """Random torch modules ``(unet, vae, text_encoder, tokenizer, scheduler)`` of one layout."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if layout not in ("sd1", "sd2"):
        raise ValueError(f"unknown tiny layout {layout!r}")
    sd2 = layout == "sd2"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3 if sd2 else 2,
        num_attention_heads=4 if sd2 else 2,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=TINY_VOCAB_SIZE - 2,
        eos_token_id=TINY_VOCAB_SIZE - 1,
        pad_token_id=TINY_VOCAB_SIZE - 1,
    ))
    # Untrained random weights give latents of unit scale; jitter the norms' affine parameters so
    # a mistaken scale/bias mapping cannot hide behind their default 1/0 initialisation.
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for name, param in module.named_parameters():
                if "norm" in name:
                    param.add_(0.1 * torch.randn_like(param))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return unet, vae, text_encoder, tiny_clip_tokenizer(), scheduler


def make_tiny_sd(directory: str | Path, layout: str = "sd1", seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny random SD pipeline in diffusers layout to ``directory`` and return it."""
    from diffusers import StableDiffusionPipeline

    unet, vae, text_encoder, tokenizer, scheduler = tiny_components(layout, seed, sample_size)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def box_inpainting_problem(batch: int):
    """The solver tests' measurement on the tiny 64 px models: a 32x24 hole, and ``batch``
    smooth test images ``x`` (B, 64, 64, 3) in [-0.8, 0.8]. Returns (operator, x, y = A x)."""
    import jax.numpy as jnp
    import numpy as np

    from p2l_jax.operators import Inpainting

    mask = np.ones((64, 64), np.float32)
    mask[16:48, 20:44] = 0.0
    op = Inpainting(mask)
    u = np.linspace(-1, 1, 64, dtype=np.float32)
    x = np.stack([np.stack([np.sin(3 * (b + 1) * u)[None, :] * np.cos(2 * u)[:, None]] * 3, -1)
                  for b in range(batch)]) * 0.8
    return op, x, op.forward(jnp.asarray(x))


def inpainting_setup(model, batch: int, key_seed: int) -> dict:
    """The solver tests' problem on ``model``: :func:`box_inpainting_problem` (op, x, y), one
    PRNG key per sample (``split(key(key_seed), batch)``) and the null prompt's embedding C0."""
    import jax

    op, x, y = box_inpainting_problem(batch)
    return dict(model=model, op=op, x=x, y=y, keys=jax.random.split(jax.random.key(key_seed), batch),
                C0=model.text_embeddings([""]))
