"""Quick check of the latent step size rho on the embedded model (validation split).

    python -m benchmarks.rho_check sr        # or: inpaint

Prints mean / min PSNR and final residual of LDPS and P2L at a few rho values on 8 validation
images (64 px, sigma_y 0.01, 50 steps), and the pseudo-inverse as a no-prior reference.
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import p2l_jax
from p2l_jax.data import batch, split_indices
from p2l_jax.operators import SuperResolution, Inpainting, box_mask
from p2l_jax.solvers import P2LConfig, LDPSConfig, solve
from p2l_jax.metrics import psnr
m = p2l_jax.load_model()
idx = split_indices("validation", 8)
x, caps, _ = batch(idx, 64)
x = jnp.asarray(x)
task = sys.argv[1]
op = SuperResolution(scale=4) if task == "sr" else Inpainting(box_mask((64, 64), box_size=32))
y = jax.vmap(lambda xi, k: op.measure(xi[None], k, 0.01)[0])(x, jax.random.split(jax.random.key(0), 8))
pinv = op.pseudo_inverse(y)
print(task, "pinv psnr", float(jnp.mean(psnr(pinv, x))), flush=True)
for name, cfg in [
        ("ldps rho=0.3", LDPSConfig(num_steps=50, rho=0.3)),
        ("ldps rho=1", LDPSConfig(num_steps=50, rho=1.0)),
        ("p2l rho=0.1", P2LConfig(num_steps=50, rho=0.1)),
        ("p2l rho=0.3", P2LConfig(num_steps=50, rho=0.3)),
        ("p2l rho=1", P2LConfig(num_steps=50, rho=1.0)),
]:
    t = time.time()
    r = solve(m, op, y, jax.random.key(1), cfg)
    p = np.asarray(psnr(r.images, x))
    print(f"{name}: psnr {p.mean():.2f} (min {p.min():.2f}) residual {float(np.mean(r.residual[:, -1])):.3f} [{time.time()-t:.0f}s]", flush=True)
