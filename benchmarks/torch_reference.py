"""Plain PyTorch reference of the P2L and LDPS steps, written with the diffusers / transformers
modules of a checkpoint: the independent check of p2l_jax.solvers, and the throughput baseline.

Layouts are torch's: latents and images NCHW. Operators are objects with ``forward``,
``adjoint`` and ``prox(z, y, lam)`` on NCHW tensors (see :class:`TorchInpainting`).
The math is docs/algorithm.md's, written independently of the JAX code: diffusers'
``DDIMScheduler`` gives the timesteps and the DDIM update, ``torch.optim.Adam`` tunes C.

    out = p2l_reference(unet, vae, scheduler, C0, y, A, z_T, noises, cfg)
    out = ldps_reference(unet, vae, scheduler, C0, y, A, z_T, noises, cfg)

``cfg`` is a p2l_jax.solvers P2LConfig / LDPSConfig (only its numbers are read); ``noises``
(N, B, C, h, w) are the per-step DDIM noises (used when eta > 0).
"""

from __future__ import annotations

import torch


class TorchInpainting:
    """A x = m x, A^T y = m y, prox(z, y, lam) = (m y + lam z) / (m^2 + lam); NCHW."""

    def __init__(self, mask_nchw: torch.Tensor):
        self.mask = mask_nchw

    def forward(self, x):
        return self.mask * x

    def adjoint(self, y):
        return self.mask * y

    def prox(self, z, y, lam):
        return (self.mask * y + lam * z) / (self.mask * self.mask + lam)


def _eps(unet, scheduler, z, t, C):
    out = unet(z, t, encoder_hidden_states=C).sample
    if scheduler.config.prediction_type == "v_prediction":
        ab = scheduler.alphas_cumprod[t]
        out = ab.sqrt() * out + (1 - ab).sqrt() * z
    return out


def _decode(vae, z):
    return vae.decode(z / vae.config.scaling_factor).sample


def _encode(vae, x):
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


def _residual(A, y, x):
    d = y - A.forward(x)
    return d.flatten(1).pow(2).sum(1).sqrt()


def _tweedie(z, eps, ab):
    return (z - (1 - ab).sqrt() * eps) / ab.sqrt()


def guided_step_reference(unet, vae, scheduler, z, t, C, opt, y, A, *, tune, K, project, lam,
                          projection="prox"):
    """One reverse step's gradients and projection; returns a dict of the intermediates."""
    ab = scheduler.alphas_cumprod[t]
    n = y[0].numel()
    out = {"prompt_loss": None, "g_C": None}
    if tune:  # C is the optimizer's parameter tensor, updated in place
        for k in range(K):
            opt.zero_grad()
            eps = _eps(unet, scheduler, z.detach(), t, C)
            loss = _residual(A, y, _decode(vae, _tweedie(z.detach(), eps, ab))).pow(2) / n
            loss.sum().backward()
            if k == 0:
                out["prompt_loss"] = loss.detach()
            out["g_C"] = C.grad.detach().clone()
            opt.step()
    C_star = C.detach().clone()
    z_req = z.detach().requires_grad_(True)
    eps = _eps(unet, scheduler, z_req, t, C_star)
    z0 = _tweedie(z_req, eps, ab)
    r = _residual(A, y, _decode(vae, z0))
    (g_z,) = torch.autograd.grad(r.sum(), z_req)
    eps, z0 = eps.detach(), z0.detach()
    if project:
        with torch.no_grad():
            x = _decode(vae, z0)
            if projection == "prox":
                x_star = A.prox(x, y, lam)
            else:
                x_star = A.adjoint(y) + x - A.adjoint(A.forward(x))
            z0 = _encode(vae, x_star)
            eps = (z - ab.sqrt() * z0) / (1 - ab).sqrt()
    out.update(C=C_star, eps=eps, z0hat=z0, g_z=g_z, residual=r.detach())
    return out


def _run(unet, vae, scheduler, C0, y, A, z_T, noises, cfg, *, tune, K, projection, project_every,
         lam, lr=None, b1=0.9, b2=0.999, adam_eps=1e-8):
    N = cfg.num_steps
    scheduler.set_timesteps(N)
    B = z_T.shape[0]
    C = C0.expand(B, *C0.shape[1:]).clone().requires_grad_(True)
    opt = torch.optim.Adam([C], lr=lr, betas=(b1, b2), eps=adam_eps) if tune else None
    rho = cfg.rho if isinstance(cfg.rho, tuple) else (cfg.rho,) * N
    z = z_T.clone()
    residuals, prompt_losses = [], []
    for i, t in enumerate(scheduler.timesteps):
        t = int(t)
        project = projection != "none" and (i + 1) % project_every == 0
        s = guided_step_reference(unet, vae, scheduler, z, t, C, opt, y, A, tune=tune, K=K,
                                  project=project, lam=lam, projection=projection)
        with torch.no_grad():
            z = scheduler.step(s["eps"], t, z, eta=cfg.eta, variance_noise=noises[i]).prev_sample
            z = z - rho[i] * s["g_z"]
        residuals.append(s["residual"])
        prompt_losses.append(s["prompt_loss"])
    return {"latents": z, "z0hat": s["z0hat"], "embedding": C.detach(),
            "residual": torch.stack(residuals, 1),
            "prompt_loss": torch.stack(prompt_losses, 1) if tune else None}


def p2l_reference(unet, vae, scheduler, C0, y, A, z_T, noises, cfg):
    """P2L with Adam prompt tuning (cfg.optimizer must be an OptimizerConfig named adam)."""
    o = cfg.optimizer
    return _run(unet, vae, scheduler, C0, y, A, z_T, noises, cfg, tune=cfg.tune_prompt, K=cfg.K,
                projection=cfg.projection, project_every=cfg.project_every, lam=cfg.lam,
                lr=o.learning_rate / (cfg.num_steps * cfg.K) if o.per_run else o.learning_rate,
                b1=o.b1, b2=o.b2, adam_eps=o.eps)


def ldps_reference(unet, vae, scheduler, C0, y, A, z_T, noises, cfg):
    """Latent DPS: no tuning, no projection."""
    return _run(unet, vae, scheduler, C0, y, A, z_T, noises, cfg, tune=False, K=1,
                projection="none", project_every=1, lam=1.0)
