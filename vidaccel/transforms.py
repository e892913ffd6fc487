"""The Denoiser type: an (init, apply) pair over explicit state, and the dense Wan baseline.

    den = wan_denoiser(model)                   # dense baseline; den.params holds the model's parameters
    den = some_method(den, cfg)                 # a method maps a Denoiser to a Denoiser, so methods compose
    state = den.init(spec)
    velocity, state = den.apply(params, state, x, t, context)

`apply` is pure and jittable; all a method needs between calls lives in `state` (a pytree with static
shapes), including counters of the work actually done, so saved compute is measured, not inferred.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models.wan.transformer import WanTransformer


@dataclasses.dataclass(frozen=True)
class DenoiseSpec:
    """What `init` may size its state by: one CFG branch's latents and context, and the step count.

    For AR rollouts `latents` is one chunk and `num_chunks` the number of chunks in the video.
    """

    latents: jax.ShapeDtypeStruct
    context: jax.ShapeDtypeStruct
    num_steps: int
    num_chunks: int = 1


@struct.dataclass
class Work:
    """Work counters every denoiser keeps: model calls, block-stack passes, and token-layers computed."""

    calls: jax.Array
    block_passes: jax.Array
    token_layers: jax.Array

    @classmethod
    def zero(cls) -> Work:
        z = jnp.zeros((), jnp.int32)
        return cls(z, z, z)

    def add(self, *, calls=0, block_passes=0, token_layers=0) -> Work:
        return Work(self.calls + calls, self.block_passes + block_passes, self.token_layers + token_layers)


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
    """A pure denoiser: `init(spec) -> state`, `apply(params, state, x, t, context) -> (velocity, state)`.

    `graphdef` is the underlying transformer graph (for methods that need its stages), `params` the default
    parameters to sample with. Hashable by identity, so it can be a static argument of `jax.jit`.
    """

    init: Callable[[DenoiseSpec], Any]
    apply: Callable[..., tuple[jax.Array, Any]]
    graphdef: Any = None
    params: Any = None
    name: str = "denoiser"
    # AR chunk denoisers only: `commit(params, state, x0, context) -> state` finishes a chunk whose clean
    # latents are x0 (stores its K/V) and moves on to the next; methods wrapping a Denoiser pass it through.
    commit: Callable[..., Any] | None = None


@struct.dataclass
class DenseState:
    work: Work


def wan_denoiser(model: WanTransformer, *, attention=None) -> Denoiser:
    """The dense baseline: every call runs the whole model. `attention` replaces dense self-attention."""
    graphdef, params = nnx.split(model)

    def init(spec: DenoiseSpec) -> DenseState:
        return DenseState(Work.zero())

    def apply(params, state: DenseState, x, t, context):
        m = nnx.merge(graphdef, params)
        emb = m.embed(x, t, context)
        tokens, _ = m.blocks(emb, attention=attention)
        n_layers = m.cfg.num_layers
        work = state.work.add(calls=1, block_passes=1, token_layers=emb.tokens.shape[1] * n_layers)
        return m.head(tokens, emb), DenseState(work)

    return Denoiser(init=init, apply=apply, graphdef=graphdef, params=params, name="dense")
