"""Procedural captioned image dataset and its attribute checker (the embedded model's data).

``sample(index, image_size)`` draws one image, caption and attribute dict from the integer
``index`` alone; ``split_indices(split, n)`` gives disjoint train / validation / test indices;
``check_attributes(image, caption)`` reads back from pixels which caption attributes an image
shows. See :mod:`p2l_jax.data.shapes` for how images are drawn.
"""

from p2l_jax.data.checker import (CHECKER, CheckerConfig, attribute_accuracy, check_attributes,
                                  estimate_attributes)
from p2l_jax.data.shapes import (ATTRIBUTES, SPEC, DrawSpec, batch, caption_of, captions,
                                 parse_caption, sample)
from p2l_jax.data.splits import SPLITS, split_indices, split_of

__all__ = ["ATTRIBUTES", "CHECKER", "CheckerConfig", "DrawSpec", "SPEC", "SPLITS",
           "attribute_accuracy", "batch", "caption_of", "captions", "check_attributes",
           "estimate_attributes", "parse_caption", "sample", "split_indices", "split_of"]
