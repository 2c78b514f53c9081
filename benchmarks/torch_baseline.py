"""The PyTorch reference P2L step (benchmarks/torch_reference.py) on the same weights, timed.

The diffusers UNet and VAE are built from the same ``config.json`` dicts as the JAX model and
filled with the JAX parameters (``p2l_jax.weights.state_to_torch``), so both sides run the same
network on the same numbers. One step is ``guided_step_reference`` at the first timestep
without projection: the K prompt iterations (forward and backward through UNet and decoder,
Adam) and the latent gradient (forward and backward); with projection it adds a decode, the
operator's prox and an encode. ``eager`` runs the modules as they are; ``compile`` wraps UNet
and VAE in ``torch.compile`` (inductor). The benchmark times these steps interleaved with the
JAX programs (:func:`benchmarks.measure.interleaved_times`).

torch is imported here only, lazily: runtime code under p2l_jax never imports it.
"""

from __future__ import annotations

import numpy as np

TORCH_MODES = ("eager", "compile")


def _reference():
    from benchmarks import torch_reference  # torch is imported only when a torch row runs

    return torch_reference


def torch_device() -> str:
    """``cuda`` when this torch build sees a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_modules(model, config_dicts: dict, dtype: str):
    """(unet, vae, scheduler): diffusers modules carrying the JAX model's parameters."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from p2l_jax.weights import state_to_torch

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    nets = {"unet": UNet2DConditionModel.from_config(config_dicts["unet"]),
            "vae": AutoencoderKL.from_config(config_dicts["vae"])}
    for name, net in nets.items():
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_to_torch(model.params[name]).items()}
        net.load_state_dict(tensors, strict=True)
        net.eval().requires_grad_(False)
        net.to(device=torch_device(), dtype=tdtype)
    scheduler = DDIMScheduler.from_config(config_dicts["scheduler"])
    return nets["unet"], nets["vae"], scheduler


def torch_step_fns(model, config_dicts: dict, solver_config, mask, y, z, C0, *, dtype: str,
                   modes: tuple[str, ...]) -> dict:
    """``{(mode, projected): step()}``: the reference step without projection and, for a
    solver that projects, with it (``projected`` True), for each mode; ``step()`` runs one
    step (and waits for the GPU). ``compile`` wraps UNet and VAE in ``torch.compile``: its
    first call compiles, so callers time the first call apart.

    ``mask`` (1, H, W, C), ``y`` (B, H, W, 3), ``z`` (B, h, w, c), ``C0`` (1, 77, d) are the
    JAX benchmark's arrays (NHWC), converted to torch's NCHW here.
    """
    import torch

    ref = _reference()
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    dev = torch_device()
    nchw = lambda a: torch.from_numpy(np.array(a, np.float32)).permute(0, 3, 1, 2).to(dev)
    unet, vae, scheduler = torch_modules(model, config_dicts, dtype)
    scheduler.set_timesteps(solver_config.num_steps)
    t = int(scheduler.timesteps[0])
    A = ref.TorchInpainting(nchw(mask).to(tdtype))
    y_t, z_t = nchw(y).to(tdtype), nchw(z).to(tdtype)
    C = torch.from_numpy(np.array(C0, np.float32)).to(dev).expand(z_t.shape[0], -1, -1).clone()
    C = C.to(tdtype).requires_grad_(True)
    tune = getattr(solver_config, "tune_prompt", False)
    opt = torch.optim.Adam([C], lr=1e-4) if tune else None
    K = getattr(solver_config, "K", 1)
    projection = getattr(solver_config, "projection", "none")
    lam = getattr(solver_config, "lam", 1.0)
    fns = {}
    for mode in modes:
        u, v = (unet, vae) if mode == "eager" else (torch.compile(unet), torch.compile(vae))
        for projected in (False, True) if projection != "none" else (False,):
            def step(u=u, v=v, projected=projected):
                out = ref.guided_step_reference(u, v, scheduler, z_t, t, C, opt, y_t, A,
                                                tune=tune, K=K, project=projected, lam=lam,
                                                projection=projection)
                if dev == "cuda":
                    torch.cuda.synchronize()
                return out

            fns[(mode, projected)] = step
    return fns
