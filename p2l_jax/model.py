"""The latent diffusion model object: load a diffusers-format directory, expose eps/encode/decode.

``load_model(path)`` reads a Stable-Diffusion-layout directory (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), builds the Flax NNX networks
under ``nnx.eval_shape`` (no random initialisation: shapes only) and fills them from the
safetensors files through :mod:`p2l_jax.weights`. A directory written by ``p2l-jax convert``
(orbax-checkpoint parameters instead of safetensors) loads the same way.

The returned :class:`LatentDiffusionModel` is a JAX pytree: its parameter arrays are the leaves,
everything else (graph definitions, configs, tokenizer) is static. Pass it as an ordinary
argument to jitted functions and call its methods inside them:

    m = load_model("path/to/sd15")
    C = m.text_embeddings([""])                   # (1, 77, d)
    eps = jax.jit(lambda m, z, t, C: m.eps(z, t, C))(m, z, 999, C)

Symbols follow docs/algorithm.md: s is the VAE ``scaling_factor``,
D(z) = vae.decode(z / s) and E(x) = s * mean(vae.encode(x)).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2l_jax.convert import restore_params
from p2l_jax.errors import P2LError
from p2l_jax.layout import COMPONENTS, CONVERTED_MARKER
from p2l_jax.model_base import DiffusionModelBase
from p2l_jax.schedule import ScheduleConfig, model_output_to_eps

if TYPE_CHECKING:  # loaded lazily by load_model
    from p2l_jax.pixel_model import PixelDiffusionModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(eq=False, frozen=True)
class _Static:
    """Everything about a model that is not an array. Hashed by identity: one per loaded model."""

    graphdefs: dict
    unet_config: Any
    vae_config: Any
    text_config: Any
    schedule: ScheduleConfig
    scheduler_config: dict
    tokenizer: Any
    dtype: Any
    attention: str
    path: str | None


@jax.tree_util.register_pytree_node_class
class LatentDiffusionModel(DiffusionModelBase):
    """A Stable-Diffusion-class latent diffusion model with pure, jit-able network calls.

    Attributes:
      params: ``{"unet": State, "vae": State, "text_encoder": State}`` parameter states.
      alphas_cumprod: alpha_bar_t for t = 0..T-1 (float32), from the checkpoint's scheduler.
    """

    # -- static facts beyond DiffusionModelBase's
    vae_config = property(lambda self: self._static.vae_config)
    text_config = property(lambda self: self._static.text_config)
    tokenizer = property(lambda self: self._static.tokenizer)

    @property
    def scaling_factor(self) -> float:
        return float(self._static.vae_config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self._static.vae_config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each axis: 2 ** (number of VAE blocks - 1)."""
        return 2 ** (len(self._static.vae_config.block_out_channels) - 1)

    @property
    def sample_size(self) -> int:
        """Native latent side length (the UNet config's ``sample_size``)."""
        return int(self._static.unet_config.sample_size)

    @property
    def image_size(self) -> int:
        """Native image side length in pixels."""
        return self.sample_size * self.vae_scale_factor

    @property
    def embedding_dim(self) -> int:
        return int(self._static.text_config.hidden_size)

    # -- networks
    def _net(self, name: str):
        return nnx.merge(self._static.graphdefs[name], self.params[name])

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids (B, 77) int32, padded with the tokenizer's pad token (host-side)."""
        from p2l_jax.tokenizer import tokenize

        return tokenize(self.tokenizer, prompts, max_length=self._static.text_config.max_position_embeddings)

    def encode_text(self, input_ids: jax.Array) -> jax.Array:
        """C = final-layer-normed hidden states of the text encoder, (B, L, d), float32."""
        return self._net("text_encoder")(jnp.asarray(input_ids, jnp.int32)).astype(jnp.float32)

    def text_embeddings(self, prompts: str | Sequence[str]) -> jax.Array:
        """C for a list of prompts (``""`` is the null prompt P2L starts from), (B, 77, d)."""
        return _encode_text_jit(self, self.tokenize(prompts))

    def token_embeddings(self, prompts: str | Sequence[str]) -> jax.Array:
        """e = E_tok[w], the text encoder's input token embeddings of a list of prompts
        (before positions are added), (B, 77, d) float32:
        ``encode_token_embeddings(token_embeddings(p))`` is ``text_embeddings(p)``."""
        return _token_embeddings_jit(self, self.tokenize(prompts))

    def encode_token_embeddings(self, e: jax.Array) -> jax.Array:
        """C = the text encoder applied to token embeddings e (B, L, d) in place of E_tok[w]
        (textual-inversion style; differentiable in e), (B, L, d) float32."""
        net = self._net("text_encoder")
        return net.encode_token_embeddings(jnp.asarray(e).astype(self.dtype)).astype(jnp.float32)

    def eps(self, z_t: jax.Array, t, C: jax.Array) -> jax.Array:
        """eps_theta(z_t, t, C), NHWC float32, whatever the checkpoint's ``prediction_type``.

        A v-prediction network output v is converted as eps = sqrt(ab_t) v + sqrt(1 - ab_t) z_t.
        ``t`` is an int scalar or a (B,) vector of train-schedule timesteps.
        """
        z_t = jnp.asarray(z_t, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), z_t.shape[:1])
        out = self._net("unet")(z_t.astype(self.dtype), t, jnp.asarray(C).astype(self.dtype))
        out = out.astype(jnp.float32)
        if self.schedule.prediction_type == "epsilon":
            return out
        ab_t = self.alphas_cumprod[t][:, None, None, None]
        return model_output_to_eps(out, z_t, ab_t, self.schedule.prediction_type)

    def decode(self, z: jax.Array) -> jax.Array:
        """D(z) = vae.decode(z / s): scaled latents -> images (B, H, W, 3), unclipped, float32."""
        z = jnp.asarray(z, jnp.float32) / self.scaling_factor
        return self._net("vae").decode(z.astype(self.dtype)).astype(jnp.float32)

    def encode(self, x: jax.Array) -> jax.Array:
        """E(x) = s * posterior mean of vae.encode(x) (never a sample), float32."""
        mean, _ = self._net("vae").encode(jnp.asarray(x).astype(self.dtype))
        return self.scaling_factor * mean.astype(jnp.float32)

    def encode_distribution(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Unscaled posterior (mean, logvar) of the VAE encoder, float32 (used for training)."""
        mean, logvar = self._net("vae").encode(jnp.asarray(x).astype(self.dtype))
        return mean.astype(jnp.float32), logvar.astype(jnp.float32)

    def __repr__(self) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))
        return (f"LatentDiffusionModel(path={self.path!r}, params={n / 1e6:.2f}M, "
                f"dtype={jnp.dtype(self.dtype).name}, image_size={self.image_size})")


@jax.jit
def _encode_text_jit(model: LatentDiffusionModel, ids: jax.Array) -> jax.Array:
    return model.encode_text(ids)


@jax.jit
def _token_embeddings_jit(model: LatentDiffusionModel, ids: jax.Array) -> jax.Array:
    net = model._net("text_encoder")
    return net.embeddings.token_embedding(jnp.asarray(ids, jnp.int32)).astype(jnp.float32)


# ----------------------------------------------------------------------------- loading
def embedded_model_dir() -> Path:
    """Where the package's embedded default model lives (diffusers layout)."""
    return Path(__file__).resolve().parent / "assets" / "embedded_model"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise P2LError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise P2LError(f"{path}: invalid JSON ({err})") from None


def check_layout(path: Path) -> None:
    """Raise P2LError unless ``path`` is a diffusers-layout SD directory."""
    if not path.exists():
        raise P2LError(f"model directory not found: {path}")
    if not path.is_dir():
        raise P2LError(f"model path is not a directory: {path}")
    if not (path / "model_index.json").is_file():
        raise P2LError(f"{path} is not a diffusers-format model directory (no model_index.json)")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise P2LError(f"{path} is missing component folder(s): {', '.join(missing)}")


def network_configs(path: Path) -> dict:
    """Parse the three network configs of a model directory into frozen dataclasses."""
    from p2l_jax.models.clip import CLIPTextConfig
    from p2l_jax.models.unet import UNetConfig
    from p2l_jax.models.vae import VAEConfig

    return {
        "unet": UNetConfig.from_dict(_read_json(path / "unet" / "config.json"),
                                     source=str(path / "unet" / "config.json")),
        "vae": VAEConfig.from_dict(_read_json(path / "vae" / "config.json"),
                                   source=str(path / "vae" / "config.json")),
        "text_encoder": CLIPTextConfig.from_dict(_read_json(path / "text_encoder" / "config.json"),
                                               source=str(path / "text_encoder" / "config.json")),
    }


def abstract_networks(configs: dict, dtype, attention: str) -> dict:
    """``{name: (graphdef, abstract_state)}`` built with ``nnx.eval_shape`` (no initialisation)."""
    from p2l_jax.models.clip import CLIPTextModel
    from p2l_jax.models.unet import UNet2DConditionModel
    from p2l_jax.models.vae import AutoencoderKL

    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    out = {}
    for name, cls in classes.items():
        module = nnx.eval_shape(lambda cls=cls, cfg=configs[name]: cls(
            cfg, dtype=dtype, param_dtype=dtype, attention_impl=attention, rngs=nnx.Rngs(0)))
        out[name] = nnx.split(module)
    return out


def load_model(path: str | Path | None = None, dtype: str = "float32", *, attention: str = "einsum",
               allow_pickle: bool = False) -> LatentDiffusionModel | PixelDiffusionModel:
    """Load a Stable Diffusion 1.x/2.x directory in diffusers layout (or a converted one).

    A directory whose ``unet/`` is a pixel-space ``UNet2DModel`` (a DDPM/DDIM pipeline) loads
    as a :class:`p2l_jax.pixel_model.PixelDiffusionModel` (identity autoencoder, no text).

    Args:
      path: model directory; ``None`` loads the embedded default model shipped in the package.
      dtype: ``"float32"`` or ``"bfloat16"``: parameters and activations (norms, softmax and
        attention logits stay float32 inside the networks).
      attention: attention implementation name (see :mod:`p2l_jax.models.attention`).
      allow_pickle: accept ``.bin``/``.ckpt`` pickles (read with ``torch.load(weights_only=True)``).
    """
    if dtype not in DTYPES:
        raise P2LError(f"option dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if path is None:
        path = embedded_model_dir()
        if not (path / "model_index.json").is_file():
            raise P2LError("the embedded default model is not shipped in this build; "
                           "pass a model directory (path=... / --model DIR)")
    path = Path(path)
    from p2l_jax.pixel_model import is_pixel_model, load_pixel_model

    if path.is_dir() and is_pixel_model(path, _read_json):  # UNet2DModel: D = E = identity
        return load_pixel_model(path, DTYPES[dtype], attention, _read_json,
                                _scheduler_config_file, allow_pickle)
    check_layout(path)
    jdtype = DTYPES[dtype]
    from p2l_jax.models.attention import check_attention_impl

    check_attention_impl(attention)
    configs = network_configs(path)
    abstract = abstract_networks(configs, jdtype, attention)
    if (path / CONVERTED_MARKER).is_file():
        params = restore_params(path, {k: s for k, (_, s) in abstract.items()}, jdtype)
    else:
        from p2l_jax.weights import read_component_tensors, state_from_torch

        params = {}
        for name, (_, state) in abstract.items():
            tensors = read_component_tensors(path / name, allow_pickle=allow_pickle)
            params[name] = state_from_torch(state, tensors, name, dtype=jdtype, source=str(path / name))
    scheduler_config = _read_json(_scheduler_config_file(path))
    schedule = ScheduleConfig.from_dict(scheduler_config)
    from p2l_jax.tokenizer import load_tokenizer

    static = _Static(
        graphdefs={k: g for k, (g, _) in abstract.items()},
        unet_config=configs["unet"], vae_config=configs["vae"], text_config=configs["text_encoder"],
        schedule=schedule, scheduler_config=scheduler_config,
        tokenizer=load_tokenizer(path / "tokenizer"), dtype=jdtype, attention=attention,
        path=str(path),
    )
    return LatentDiffusionModel(params, jnp.asarray(schedule.alphas_cumprod()), static)


def _scheduler_config_file(path: Path) -> Path:
    candidates = [path / "scheduler" / "scheduler_config.json", path / "scheduler" / "config.json"]
    for file in candidates:
        if file.is_file():
            return file
    raise P2LError(f"{path / 'scheduler'}: no scheduler_config.json")
