"""The PyTorch reference P2L step (tests/torch_reference.py) on the same weights, timed.

The diffusers UNet and VAE are built from the same ``config.json`` dicts as the JAX model and
filled with the JAX parameters (``p2l_jax.weights.state_to_torch``), so both sides run the same
network on the same numbers. One step is ``guided_step_reference`` at the first timestep
without projection: the K prompt iterations (forward and backward through UNet and decoder,
Adam) and the latent gradient (forward and backward). ``eager`` runs the modules as they are;
``compile`` wraps UNet and VAE in ``torch.compile`` (inductor) and reports its first-call time
as compile time, or the error if it does not work here.

torch is imported here only, lazily: runtime code under p2l_jax never imports it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

TORCH_MODES = ("eager", "compile")
_TESTS = Path(__file__).resolve().parents[1] / "tests"


def _reference():
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    import torch_reference

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


def time_torch_step(model, config_dicts: dict, solver_config, mask, y, z, C0, *, dtype: str,
                    modes: tuple[str, ...], repeats: int) -> dict:
    """``{mode: {"step_time_s", "samples_s", "compile_s"} | {"error": str}}`` for each mode.

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
    results = {"device": dev}
    for mode in modes:
        try:
            u, v = (unet, vae) if mode == "eager" else (torch.compile(unet), torch.compile(vae))

            def step():
                out = ref.guided_step_reference(u, v, scheduler, z_t, t, C, opt, y_t, A,
                                                tune=tune, K=K, project=False, lam=1.0)
                if dev == "cuda":
                    torch.cuda.synchronize()
                return out

            start = time.perf_counter()
            step()
            first = time.perf_counter() - start
            samples = []
            for _ in range(max(repeats, 1)):
                start = time.perf_counter()
                step()
                samples.append(time.perf_counter() - start)
            median = float(np.median(samples))
            results[mode] = {"step_time_s": median, "samples_s": samples,
                             "compile_s": max(first - median, 0.0)}
        except Exception as err:  # torch.compile needs a working toolchain; report, go on
            results[mode] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    return results
