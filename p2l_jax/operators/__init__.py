"""Forward operators ``A`` of the inverse problems, with adjoints, prox and noisy measurement.

See :mod:`p2l_jax.operators.base` for the interface and the math; one module per operator
family, masks and kernels in their own modules, task names in :mod:`.registry`.
"""

from p2l_jax.operators.base import (CG_ITERS, CG_TOL, OPERATOR_CLASSES, PINV_LAM, LinearOperator,
                                    from_dict, measurement_shape)
from p2l_jax.operators.blur import Blur, GaussianBlur, MotionBlur
from p2l_jax.operators.denoising import Denoising
from p2l_jax.operators.inpainting import Inpainting
from p2l_jax.operators.kernels import gaussian_kernel, motion_kernel
from p2l_jax.operators.masks import box_mask, freeform_mask, random_mask
from p2l_jax.operators.noise import NOISE_KEY_DERIVATION, noise_key
from p2l_jax.operators.registry import TASKS, TaskOptions, make_operator
from p2l_jax.operators.resize import SuperResolution

__all__ = [
    "CG_ITERS", "CG_TOL", "OPERATOR_CLASSES", "PINV_LAM", "LinearOperator", "from_dict",
    "measurement_shape",
    "Blur", "GaussianBlur", "MotionBlur", "Denoising", "Inpainting", "SuperResolution",
    "gaussian_kernel", "motion_kernel", "box_mask", "freeform_mask", "random_mask",
    "NOISE_KEY_DERIVATION", "noise_key", "TASKS", "TaskOptions", "make_operator",
]
