"""Tiny random pixel-space diffusion models (diffusers ``UNet2DModel``), written by diffusers.

``tiny_pixel_unet`` builds the torch module; ``make_tiny_pixel`` saves a real ``DDIMPipeline``
directory (``model_index.json``, ``unet/``, ``scheduler/``, safetensors), the layout a user's
DDPM/DDIM checkpoint has, at a size that compiles in seconds on a CPU.

Two layouts cover the options the JAX network implements:

* ``attn``: attention in the two deepest levels and the mid block, head size 4, one resnet
  per level, a separate attention group count.
* ``plain``: no attention anywhere (``add_attention=False``), two resnets per level, one head
  of full width in the config (unused), a non-zero ``freq_shift`` and sin-first embedding.
"""

from __future__ import annotations

from pathlib import Path

LAYOUTS = {
    "attn": dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                 attn_norm_num_groups=2, attention_head_dim=4,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "plain": dict(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4,
                  attention_head_dim=None, add_attention=False, freq_shift=1,
                  flip_sin_to_cos=False, down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D")),
}


def tiny_pixel_unet(layout: str = "attn", seed: int = 0, sample_size: int = 8):
    """A random torch ``UNet2DModel`` of ``layout`` (eval mode), norms' affine params jittered
    so that a mistaken scale/bias mapping cannot hide behind their 1/0 initialisation."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, **LAYOUTS[layout])
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return unet.eval()


def tiny_scheduler():
    """The embedded model's DDIM settings (SD's scaled_linear schedule)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def make_tiny_pixel(directory: str | Path, layout: str = "attn", seed: int = 0,
                    sample_size: int = 8) -> Path:
    """Write a tiny random ``DDIMPipeline`` (UNet2DModel + DDIMScheduler) to ``directory``."""
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline(unet=tiny_pixel_unet(layout, seed, sample_size),
                        scheduler=tiny_scheduler())
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
