"""The Denoiser type: an (init, apply) pair over explicit state, and the plumbing every method shares.

    den = wan_denoiser(model)                   # dense baseline (models.wan); den.params holds the parameters
    den = some_method(den, cfg)                 # a method maps a Denoiser to a Denoiser, so methods compose
    state = den.init(spec)
    velocity, state = den.apply(params, state, x, t, context)

`apply` is pure and jittable; all a method needs between calls lives in `state` (a pytree with static
shapes), including counters of the work actually done, so saved compute is measured, not inferred.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


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
class Stages:
    """A denoiser's model call in three parts, for methods that recombine them (skip or subset the blocks).

    embed(params, state, x, t, context) -> (Embedded, state)   counts the call (once per apply)
    blocks(params, state, emb) -> (tokens, state)     the block stack; counts block passes and token-layers
    head(params, tokens, emb) -> velocity
    """

    embed: Callable[..., Any]
    blocks: Callable[..., tuple[jax.Array, Any]]
    head: Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
    """A pure denoiser: `init(spec) -> state`, `apply(params, state, x, t, context) -> (velocity, state)`.

    `graphdef` is the underlying transformer graph, `params` the default parameters to sample with, `config`
    the model's config (read it here instead of rebuilding the model), `stages` the model call split for
    methods. Hashable by identity, so it can be a static argument of `jax.jit`. Every state has a `work`
    field (wrappers keep the wrapped state in `inner`; see `work_of`). Methods build theirs with
    `wrap_denoiser`, which carries everything they do not replace.
    """

    init: Callable[[DenoiseSpec], Any]
    apply: Callable[..., tuple[jax.Array, Any]]
    graphdef: Any = None
    params: Any = None
    name: str = "denoiser"
    stages: Stages | None = None
    config: Any = None
    # AR chunk denoisers only: `commit(params, state, x0, context) -> state` finishes a chunk whose clean
    # latents are x0 (stores its K/V) and moves on to the next; methods wrapping a Denoiser pass it through.
    commit: Callable[..., Any] | None = None


def find_state(state, cls: type, hint: str = ""):
    """The `cls` instance inside a denoiser state, following `inner` through method wrappers."""
    while not isinstance(state, cls):
        if not hasattr(state, "inner"):
            raise ValueError(f"no {cls.__name__} inside {type(state).__name__}{hint}")
        state = state.inner
    return state


def replace_state(state, cls: type, fn: Callable[[Any], Any], hint: str = ""):
    """`state` with its `cls` instance (found as `find_state` does) replaced by `fn(instance)`, the method
    wrappers around it rebuilt."""
    if isinstance(state, cls):
        return fn(state)
    if not hasattr(state, "inner"):
        raise ValueError(f"no {cls.__name__} inside {type(state).__name__}{hint}")
    return state.replace(inner=replace_state(state.inner, cls, fn, hint))


def work_of(state) -> Work:
    """The work counters of a denoiser state (following `inner` through method wrappers)."""
    while not hasattr(state, "work") and hasattr(state, "inner"):
        state = state.inner
    return state.work


def add_work(state, **counts):
    """`state` with its work counters advanced (through method wrappers)."""
    if hasattr(state, "work"):
        return state.replace(work=state.work.add(**counts))
    return state.replace(inner=add_work(state.inner, **counts))


def total_work(state) -> dict[str, int]:
    """Counters summed over CFG branches as ints."""
    works = [work_of(s) for s in branch_states(state)]
    return {f: int(sum(int(getattr(w, f)) for w in works)) for f in ("calls", "block_passes", "token_layers")}


def staged_apply(stages: Stages):
    """The plain `apply` of a staged denoiser: embed, every block, head; one call counted."""

    def apply(params, state, x, t, context):
        emb, state = stages.embed(params, state, x, t, context)
        tokens, state = stages.blocks(params, state, emb)
        return stages.head(params, tokens, emb), state

    return apply


@struct.dataclass
class CFGBranches:
    """Per-branch denoiser state under classifier-free guidance: the conditional and unconditional calls
    keep separate states, so each branch's skip decisions stay its own (as the diffusers pipeline runs them)."""

    cond: Any
    uncond: Any

    def map(self, fn: Callable[[Any], Any]) -> CFGBranches:
        return CFGBranches(fn(self.cond), fn(self.uncond))


def branch_states(state) -> list:
    """The denoiser states of a sampler's output state: both CFG branches, or the one state without guidance."""
    return [state.cond, state.uncond] if isinstance(state, CFGBranches) else [state]


def wrap_denoiser(den: Denoiser, *, init, apply, name: str, stages: Stages | None = None, commit=None) -> Denoiser:
    """A method's Denoiser around `den`: new `init`/`apply` (and `stages` when the method keeps the split),
    with the model, parameters and config carried over. An AR chunk denoiser's `commit` is passed through to
    the wrapped state (`state.inner`) unless the method gives its own."""
    if commit is None and den.commit is not None:
        inner_commit = den.commit

        def commit(params, state, x0, context):
            return state.replace(inner=inner_commit(params, state.inner, x0, context))

    return dataclasses.replace(den, init=init, apply=apply, name=name, stages=stages, commit=commit)


def abstract_embedding(den: Denoiser, state, spec: DenoiseSpec):
    """The shapes of `den.stages.embed`'s output for one call on `spec`'s latents and context (no compute):
    what a method sizes its per-token or per-layer state by."""
    if den.stages is None:
        raise ValueError(f"denoiser {den.name!r} has no stages (embed/blocks/head); wrap the staged denoiser "
                         "(e.g. wan_denoiser or chunk_denoiser) before methods that replace the model call")
    x = jnp.zeros(spec.latents.shape, spec.latents.dtype)
    ctx = jnp.zeros(spec.context.shape, spec.context.dtype)
    t = jnp.zeros((x.shape[0],), jnp.float32)
    return jax.eval_shape(lambda: den.stages.embed(den.params, state, x, t, ctx)[0])
