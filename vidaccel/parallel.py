"""Scale out on a JAX device mesh: mesh specs, parameter sharding rules, sequence-parallel attention, and
what the samplers need to run under the mesh (`sample(..., mesh=)` and the AR runtimes' `mesh=` use
`compile_on_mesh`). Model-agnostic: a model supplies its parameter rules (e.g. `models.wan.sharding`).

The mesh has three named axes (any may be 1):

    data   independent samples; with CFG, the conditional and unconditional branch on its two halves
    fsdp   parameters sharded (ZeRO-3 / FSDP: gathered layer by layer inside the compiled scan), batch split
    seq    tokens split across devices (sequence parallel); self-attention runs as Ulysses or ring; or heads
           (`head_parallel_attention`: an AR KV cache kept per head group, tokens whole)

Parameters are sharded over `PARAM_AXES = ("fsdp", "seq")`, i.e. over every device that holds a slice of one
sample: the seq devices would otherwise each hold a full copy of the weights (14B in bf16 = 28.6 GB).
Activations are (batch over data/fsdp where the batch divides, tokens over seq). Everything else is left to
XLA's partitioner, so per-token work is split by tokens and global reductions (a cache method's indicator,
a token score) are all-reduced by the compiler: every device sees the same value and takes the same decision.

    mesh = make_mesh("data=2,seq=4")
    den = parallel_wan_denoiser(model, mesh, attention="ulysses")    # models.wan.sharding: the Wan dense
    params = shard_params(den.params, mesh, WAN_RULES)               # denoiser with ulysses_attention(mesh)
    den = teacache(den, cfg)                                         # methods wrap it as on one device
    out = sample(den, params, noise, ctx, mesh=mesh, solver=unipc(50), guidance=5.0, negative_context=neg)

Multi-host (TPU pods, multi-node GPU): call `initialize_distributed()` first in every process, then build
the mesh over `jax.devices()` (all processes' devices); see docs/parallel.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vidaccel.attention import AttentionInfo, SelfAttention, block_causal_mask, dense_attention
from vidaccel.blockwise_attention import softmax_merge
from vidaccel.transforms import CFGBranches, Denoiser, DenoiseSpec

AXES = ("data", "fsdp", "seq")
PARAM_AXES = ("fsdp", "seq")
FSDP = "__fsdp__"          # placeholder in a rule: "shard this dim over PARAM_AXES (as many as divide it)"
BATCH_AXES = ("data", "fsdp")


# ------------------------------------------------------------------------------------------------ meshes
def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """{"data": d, "fsdp": f, "seq": s} from "fsdp=4,seq=2" (missing axes are 1) or a mapping."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return dict.fromkeys(AXES, 1)
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            name, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not axis=size; write e.g. 'fsdp=4,seq=2' "
                                 f"with axes {AXES}")
            items.append((name.strip(), value.strip()))
    else:
        raise ValueError(f"mesh spec must be a string like 'fsdp=4,seq=2' or a mapping, got {spec!r}")
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for name, value in items:
        if name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {AXES}")
        if name in seen:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            size = int(value)
        except (TypeError, ValueError):
            size = 0
        if size < 1:
            raise ValueError(f"mesh spec {spec!r}: {name}={value!r} must be a positive int")
        sizes[name] = size
    return sizes


def mesh_options(num_devices: int) -> list[str]:
    """Every mesh spec over `num_devices` devices (for error messages)."""
    out = []
    for d in range(1, num_devices + 1):
        for f in range(1, num_devices // d + 1):
            if num_devices % (d * f) == 0:
                out.append(f"data={d},fsdp={f},seq={num_devices // (d * f)}")
    return out


def make_mesh(spec: str | Mapping[str, int] | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, seq) mesh over `devices` (default: all of `jax.devices()`, every host's under
    multi-host). The sizes' product must equal the device count. Axis types are Auto: XLA partitions what
    the sharding rules and the shard_map'ed attention leave open."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        sizes["seq"] = len(devices)
    n = math.prod(sizes.values())
    if n != len(devices):
        opts = mesh_options(len(devices))
        shown = ", ".join(repr(o) for o in opts[:8]) + (", ..." if len(opts) > 8 else "")
        raise ValueError(f"mesh spec {spec!r} asks for {n} devices (data*fsdp*seq) but there are {len(devices)}; "
                         f"allowed shapes multiply to {len(devices)}, e.g. {shown}")
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in AXES))
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def context_mesh(mesh: Mesh):
    """The mesh to hand to a nested shard_map: the tracing context's (which knows the axes already made
    manual, e.g. `data` under CFG-parallel) when there is one, else `mesh`."""
    am = jax.sharding.get_abstract_mesh()
    if not am.empty and tuple(am.axis_names) == tuple(mesh.axis_names):
        return am
    return mesh


def _manual_axes(m) -> set[str]:
    return set(getattr(m, "manual_axes", ()) or ())


def _free_axes(m) -> set[str]:
    """The axes a shard_map inside `m` makes manual: all those not manual already."""
    return set(m.axis_names) - _manual_axes(m)


def batch_axes(mesh, batch: int) -> tuple[str, ...] | None:
    """Mesh axes the batch dim is split over: those of (data, fsdp) that are not manual here, have size > 1
    and together divide `batch`; None when none do (the batch is then replicated)."""
    manual = _manual_axes(mesh)
    axes, prod = [], 1
    for a in BATCH_AXES:
        size = mesh.shape[a]
        if a in manual or size == 1:
            continue
        if batch % (prod * size) == 0:
            axes.append(a)
            prod *= size
    return tuple(axes) or None


def token_spec(mesh, batch: int, ndim: int, axis: str = "seq") -> P:
    """PartitionSpec of a (B, N, ...) token activation: batch over `batch_axes`, tokens over `axis`."""
    return P(batch_axes(mesh, batch), axis, *([None] * (ndim - 2)))


def check_tokens(n: int, mesh, axis: str = "seq", what: str = "sequence parallelism") -> None:
    """A clear error when `n` tokens cannot be split evenly over `axis`."""
    p = mesh.shape[axis]
    if n % p:
        ok = [d for d in range(1, n + 1) if n % d == 0 and d <= max(p, 64)]
        raise ValueError(f"{what} splits the {n} tokens into {p} equal blocks over the {axis!r} axis, but {n} "
                         f"is not divisible by {axis}={p}; allowed {axis} sizes for {n} tokens: {ok}")


def constrain_tokens(x: jax.Array, mesh: Mesh, axis: str = "seq") -> jax.Array:
    """`x` (B, N, ...) constrained to be split by tokens over `axis` (and batch over data/fsdp)."""
    m = context_mesh(mesh)
    check_tokens(x.shape[1], m, axis)
    return jax.lax.with_sharding_constraint(x, NamedSharding(m, token_spec(m, x.shape[0], x.ndim, axis)))


def constrain_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """`x` (B, ...) split by batch where possible, otherwise replicated (small per-sample tensors)."""
    m = context_mesh(mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(m, P(batch_axes(m, x.shape[0]))))


# ------------------------------------------------------------------------------------- parameter sharding
Rules = Sequence[tuple[str, tuple]]


def param_path(path) -> str:
    """'layers/attn1/to_q/kernel' for a pytree key path (a trailing nnx '/value' is dropped)."""
    s = jax.tree_util.keystr(path, simple=True, separator="/")
    return s[: -len("/value")] if s.endswith("/value") else s


def _resolve(entry, dim: int, mesh: Mesh, fsdp_axes: tuple[str, ...]):
    if entry is None:
        return None
    axes = fsdp_axes if entry == FSDP else ((entry,) if isinstance(entry, str) else tuple(entry))
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]                       # drop the innermost axis until the dim divides
    return axes or None


def param_specs(tree, rules: Rules, mesh: Mesh, *, strict: bool = True, fsdp_axes: Sequence[str] = PARAM_AXES):
    """PartitionSpec per leaf of `tree` from `rules`: (path regex, per-dim entries) pairs, first full match
    wins. An entry is None (replicated), an axis name or tuple of names, or `FSDP` (over PARAM_AXES). Axes that
    do not divide a dim are dropped from it (innermost first), so one table serves every mesh. strict: a leaf
    no rule matches is a ValueError (so a rule table covers every parameter), else it is replicated.
    fsdp_axes: what `FSDP` means; () replicates the weights (no per-call gathers: where they fit in memory)."""
    fsdp_axes = tuple(fsdp_axes)
    bad = [a for a in fsdp_axes if a not in mesh.axis_names]
    if bad:
        raise ValueError(f"fsdp_axes {fsdp_axes} name axes {bad} the mesh lacks; its axes are {mesh.axis_names}")
    compiled = [(re.compile(rx), tuple(spec)) for rx, spec in rules]

    def one(path, leaf):
        name = param_path(path)
        shape = jnp.shape(leaf)
        for rx, spec in compiled:
            if rx.fullmatch(name):
                if len(spec) != len(shape):
                    raise ValueError(f"sharding rule {rx.pattern!r} has {len(spec)} entries but parameter {name} "
                                     f"has shape {shape}")
                return P(*(_resolve(e, d, mesh, fsdp_axes) for e, d in zip(spec, shape, strict=True)))
        if strict:
            raise ValueError(f"no sharding rule matches parameter {name} {shape}; add one (regex, spec) to the rules")
        return P()

    return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(tree, rules: Rules, mesh: Mesh, **kw):
    """NamedSharding per leaf of `tree` (see `param_specs` for the keywords)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, rules, mesh, **kw),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(tree, mesh: Mesh, rules: Rules, **kw):
    """`tree` placed on `mesh` by `rules` (with `jax.device_put`; keywords as `param_specs`)."""
    return jax.device_put(tree, param_shardings(tree, rules, mesh, **kw))


# ----------------------------------------------------------------------------- sequence-parallel attention
def _check_seq(mesh, axis: str) -> int:
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r}; axes are {tuple(mesh.axis_names)}")
    return mesh.shape[axis]


def ulysses_attention(mesh: Mesh, inner: SelfAttention = dense_attention, *, axis: str = "seq",
                      state_spec: Any = None, split_batch: bool = True) -> SelfAttention:
    """Ulysses sequence parallelism around any self-attention `inner`.

    Tokens arrive split over `axis`; an all-to-all turns (all heads, N/P tokens) into (H/P heads, all tokens)
    on each device, `inner` runs there unchanged (dense, block-causal, a sparse policy: it sees whole
    sequences for its own heads), and a second all-to-all turns the output back. Needs heads % P == 0 and
    tokens % P == 0. `state_spec`: PartitionSpec prefix of `inner`'s per-layer state inside the shard_map
    (e.g. P(None, "seq") for state kept per head on axis 1); default replicated. split_batch: split the batch
    over the free batch axes where it divides (each device then sees part of the batch); False keeps the whole
    batch on every device, for an `inner` whose state or decisions span the batch (a sparse policy).
    """
    _check_seq(mesh, axis)

    def attention(q, k, v, info: AttentionInfo, layer_state=None):
        m = context_mesh(mesh)
        p = m.shape[axis]
        heads = q.shape[2]
        if heads % p:
            ok = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ValueError(f"Ulysses attention splits the {heads} heads over {axis}={p}, but {heads} is not "
                             f"divisible by {p}; allowed {axis} sizes: {ok} (or use ring_attention)")
        check_tokens(q.shape[1], m, axis, "Ulysses attention")
        check_tokens(k.shape[1], m, axis, "Ulysses attention")
        b = batch_axes(m, q.shape[0]) if split_batch else None
        tok, frames = P(b, axis, None, None), P(b, None)

        def local(q, k, v, qf, kf, layer, ls):
            def heads_to_tokens(x):
                return jax.lax.all_to_all(x, axis, 2, 1, tiled=True)

            o, ls = inner(heads_to_tokens(q), heads_to_tokens(k), heads_to_tokens(v),
                          info.replace(q_frames=qf, kv_frames=kf, layer=layer), ls)
            return jax.lax.all_to_all(o, axis, 1, 2, tiled=True), ls

        sspec = P() if state_spec is None else state_spec
        fn = jax.shard_map(local, mesh=m, in_specs=(tok, tok, tok, frames, frames, P(), sspec),
                           out_specs=(tok, sspec), axis_names=_free_axes(m), check_vma=False)
        return fn(q, k, v, info.q_frames, info.kv_frames, info.layer, layer_state)

    return attention


@dataclasses.dataclass(frozen=True)
class UlyssesHeads:
    """Head parallelism by Ulysses for an attention with per-head state: `sparse_attention(den, policy,
    wrap=UlyssesHeads(mesh))`. `wrap(inner, state_spec)` is `ulysses_attention(mesh, inner, axis=axis,
    state_spec=state_spec, split_batch=False)`: after the all-to-all each device holds every token of
    heads/P heads and the whole batch, and runs `inner` (prediction, sparse attention, state update) for those
    heads with their slice of the per-layer state; `axis` tells `inner` where the other heads are (for the
    cross-device reductions its decisions need)."""

    mesh: Mesh
    axis: str = "seq"

    def __post_init__(self):
        _check_seq(self.mesh, self.axis)

    def __call__(self, inner: SelfAttention, state_spec: Any = None) -> SelfAttention:
        return ulysses_attention(self.mesh, inner, axis=self.axis, state_spec=state_spec, split_batch=False)


def ring_attention(mesh: Mesh, *, axis: str = "seq", q_chunk: int | None = None) -> SelfAttention:
    """Ring attention: each device keeps its query block and the K/V blocks travel round `axis` with
    `ppermute`, merged by an online softmax (running max, normaliser, output in fp32). Exact, block-causal
    too (the key frames travel with their block). Needs tokens % P == 0; any head count. `q_chunk`: score
    the local queries that many at a time (bounds the logits held at once, as a flash kernel would; must
    divide the local query count); None = all at once."""
    _check_seq(mesh, axis)
    if q_chunk is not None and int(q_chunk) < 1:
        raise ValueError(f"q_chunk={q_chunk!r} must be a positive int or None")

    def attention(q, k, v, info: AttentionInfo, layer_state=None):
        m = context_mesh(mesh)
        p = m.shape[axis]
        check_tokens(q.shape[1], m, axis, "ring attention")
        check_tokens(k.shape[1], m, axis, "ring attention")
        b = batch_axes(m, q.shape[0])
        tok, frames = P(b, axis, None, None), P(b, axis)
        fpb = info.frames_per_block
        scale = 1.0 / math.sqrt(q.shape[-1])
        perm = [(i, (i + 1) % p) for i in range(p)]
        tq = q.shape[1] // p
        c = tq if q_chunk is None else int(q_chunk)
        if tq % c:
            raise ValueError(f"ring attention: q_chunk={c} does not divide the {tq} queries per device")
        n = tq // c

        def update(stats, k, v, kf):
            mx, den, acc, qc, qfc = stats                       # one query chunk: (B, H, c), (B, c, H, D)...
            s = jnp.einsum("bqhd,bkhd->bhqk", qc, k.astype(jnp.float32))
            if fpb > 1:
                s = jnp.where(block_causal_mask(qfc, kf, fpb), s, -jnp.inf)
            return softmax_merge((mx, den, acc), s, v)

        def local(q, k, v, qf, kf):
            bq, _, h, _ = q.shape
            qs = jnp.moveaxis((q.astype(jnp.float32) * scale).reshape(bq, n, c, h, -1), 1, 0)   # (n, B, c, H, D)
            qfs = jnp.moveaxis(qf.reshape(bq, n, c), 1, 0)
            shape = (n, bq, h, c)

            def merge(stats, k, v, kf):
                return jax.lax.map(lambda st: update(st, k, v, kf), (*stats, qs, qfs))

            def step(carry, _):               # merge the block held now, pass it on (P - 1 times)
                stats, k, v, kf = carry
                stats = merge(stats, k, v, kf)
                k, v, kf = (jax.lax.ppermute(a, axis, perm) for a in (k, v, kf))
                return (stats, k, v, kf), None

            stats = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                     jnp.zeros(shape + (v.shape[-1],), jnp.float32))
            (stats, k, v, kf), _ = jax.lax.scan(step, (stats, k, v, kf), None, length=p - 1)
            _, den, acc = merge(stats, k, v, kf)
            out = acc / den[..., None]                           # (n, B, H, c, Dv)
            return jnp.moveaxis(out, 0, 2).transpose(0, 2, 3, 1, 4).reshape(bq, tq, h, -1).astype(q.dtype)

        fn = jax.shard_map(local, mesh=m, in_specs=(tok, tok, tok, frames, frames), out_specs=tok,
                           axis_names=_free_axes(m), check_vma=False)
        return fn(q, k, v, info.q_frames, info.kv_frames), layer_state

    return attention


# ------------------------------------------------------------------------------------- head parallelism
def check_heads(heads: int, mesh, axis: str = "seq", what: str = "head parallelism") -> None:
    """A clear error, naming the mesh shapes that work, when `heads` cannot be split evenly over `axis`."""
    p = _check_seq(mesh, axis)
    if heads % p:
        n = math.prod(mesh.shape.values())
        ok = [o for o in mesh_options(n) if heads % parse_mesh_spec(o)[axis] == 0]
        raise ValueError(f"{what} splits the {heads} heads over {axis}={p}, but {heads} is not divisible by {p}; "
                         f"allowed mesh shapes over {n} devices: {ok}")


def head_specs(tree, heads: int, heads_dim: int, axis: str = "seq", batch: tuple[str, ...] | None = None):
    """PartitionSpec per leaf of a head-major `tree`: a leaf with `heads` entries on dim `heads_dim` is split
    there over `axis` (and, with `batch`, its dim `heads_dim - 2` over those axes: the (.., B, T, H, ..)
    layout of attention tensors and KV caches); every other leaf (frames, lengths, counters) is replicated."""
    def one(x):
        shape = jnp.shape(x)
        if len(shape) <= heads_dim or shape[heads_dim] != heads:
            return P()
        dims = [None] * len(shape)
        dims[heads_dim] = axis
        if batch and heads_dim >= 2:
            dims[heads_dim - 2] = batch
        return P(*dims)

    return jax.tree.map(one, tree)


def constrain_heads(tree, mesh: Mesh, heads: int, heads_dim: int, axis: str = "seq"):
    """`tree` with its head-major leaves (see `head_specs`) split by heads over `axis` and by batch over the
    free batch axes where it divides; the other leaves replicated. Places a KV cache in a carried state."""
    m = context_mesh(mesh)

    def one(x):
        b = batch_axes(m, x.shape[heads_dim - 2]) if x.ndim > heads_dim >= 2 else None
        spec = head_specs(x, heads, heads_dim, axis, b)
        return jax.lax.with_sharding_constraint(x, NamedSharding(m, spec))

    return jax.tree.map(one, tree)


def head_parallel_attention(mesh: Mesh, inner: SelfAttention, *, axis: str = "seq") -> SelfAttention:
    """`inner` run per head group: q, k, v (B, T, H, D) and the per-layer state's head-major leaves (B, T, H,
    ...) are split over `axis` by heads in a `shard_map`; tokens stay whole on every device, so no all-to-all
    is needed (the split of replicated q/k/v is local). For attentions whose state is per head and read
    whole per token, e.g. an AR KV cache: each device keeps and reads the cache of its heads only. Needs
    heads % P == 0. The output's heads are gathered by XLA where the next projection needs them."""
    _check_seq(mesh, axis)

    def attention(q, k, v, info: AttentionInfo, layer_state=None):
        m = context_mesh(mesh)
        heads = q.shape[2]
        check_heads(heads, m, axis, "head-parallel attention")
        out_state = jax.eval_shape(inner, q, k, v, info, layer_state)[1]
        tok = P(None, None, axis, None)
        fn = jax.shard_map(inner, mesh=m, in_specs=(tok, tok, tok, P(), head_specs(layer_state, heads, 2, axis)),
                           out_specs=(tok, head_specs(out_state, heads, 2, axis)), axis_names={axis},
                           check_vma=False)
        return fn(q, k, v, info, layer_state)

    return attention


SEQ_ATTENTION = {"ulysses": ulysses_attention, "ring": ring_attention}


def seq_parallel_attention(kind: str, mesh: Mesh, **kw) -> SelfAttention:
    """`ulysses_attention(mesh, **kw)` or `ring_attention(mesh, **kw)` by name."""
    if kind not in SEQ_ATTENTION:
        raise ValueError(f"sequence-parallel attention {kind!r} is unknown; choose one of {sorted(SEQ_ATTENTION)}")
    return SEQ_ATTENTION[kind](mesh, **kw)


# ------------------------------------------------------------------------------------------ CFG-parallel
@dataclasses.dataclass(frozen=True)
class CFGContext:
    """What the CFG-parallel denoiser takes as its context: both branches' contexts stacked (2, B, L, D)
    and the guidance scale."""

    contexts: jax.Array
    guidance: jax.Array


jax.tree_util.register_dataclass(CFGContext, data_fields=["contexts", "guidance"], meta_fields=[])


def cfg_parallel_denoiser(den: Denoiser, mesh: Mesh, *, axis: str = "data") -> Denoiser:
    """`den` with both CFG branches run at once, the conditional on the first and the unconditional on the
    second half of `axis` (size 2), each with its own state (so a caching method's decisions stay per branch
    and real work is skipped), the guided velocity combined with one all-gather per step.

    Its state is the branch states stacked on a leading axis of 2 (split over `axis`); its context a
    `CFGContext`. `unstack_branches` turns the state back into `CFGBranches`."""
    if mesh.shape[axis] != 2:
        raise ValueError(f"CFG-parallel puts the two CFG branches on the two halves of {axis!r}, so it needs "
                         f"{axis}=2; this mesh has {axis}={mesh.shape[axis]} (use e.g. 'data=2,seq=N', or "
                         f"cfg_parallel=False)")

    def init(spec: DenoiseSpec):
        s = den.init(spec)
        return jax.tree.map(lambda a: jnp.stack([a, a]), s)

    def apply(params, state, x, t, ctx: CFGContext):
        m = context_mesh(mesh)

        def local(params, state, x, t, contexts, g):
            s = jax.tree.map(lambda a: a[0], state)
            v, s = den.apply(params, s, x, t, contexts[0])
            both = jax.lax.all_gather(v, axis, tiled=False)        # (2, ...): cond, uncond
            vc, vu = both[0], both[1]
            return vu + g * (vc - vu), jax.tree.map(lambda a: a[None], s)

        fn = jax.shard_map(local, mesh=m, in_specs=(P(), P(axis), P(), P(), P(axis), P()),
                           out_specs=(P(), P(axis)), axis_names={axis}, check_vma=False)
        return fn(params, state, x, t, ctx.contexts, ctx.guidance)

    return dataclasses.replace(den, init=init, apply=apply, name=f"cfg_parallel({den.name})", stages=None)


def unstack_branches(state) -> CFGBranches:
    """CFGBranches(cond, uncond) from a CFG-parallel (stacked) denoiser state."""
    return CFGBranches(jax.tree.map(lambda a: a[0], state), jax.tree.map(lambda a: a[1], state))


# -------------------------------------------------------------------------------------- sampling on a mesh
UNSHARDED_STATES = {
    "ChunkState": "the AR chunk denoiser's KV-cached attention runs on a mesh as a whole rollout, not as one "
                  "sample() call: use models.ar.rollout.rollout(..., mesh=) (MotionCache and FlowCache included)",
}


def check_shardable(den: Denoiser, spec: DenoiseSpec) -> None:
    """A clear error for a method stack that `sample(..., mesh=)` cannot run: its state (followed through
    `inner`) holds a state type listed in UNSHARDED_STATES (which says where such a stack runs instead)."""
    state = jax.eval_shape(lambda: den.init(spec))
    while True:
        name = type(state).__name__
        if name in UNSHARDED_STATES:
            raise ValueError(f"{den.name!r} cannot run on a mesh: {UNSHARDED_STATES[name]}. sample(mesh=) "
                             "supports dense, Ulysses/ring attention, sparse attention, TeaCache-style residual "
                             "caches and CFG-parallel")
        if not hasattr(state, "inner"):
            return
        state = state.inner


def check_mesh(mesh) -> None:
    """A clear error unless `mesh` is a (data, fsdp, seq) Mesh as `make_mesh` builds."""
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh must be a jax Mesh with axes {AXES} (vidaccel.parallel.make_mesh); got {mesh!r}")


def heads_wrap(mesh: Mesh, heads: int, *, axis: str = "seq"):
    """A `wrap_attention` (attention -> attention) that runs an attention function by heads over `axis` in
    `head_parallel_attention`, as the AR chunk denoisers take it; a ValueError naming the mesh shapes that
    work when `heads` does not divide."""
    check_mesh(mesh)
    check_heads(heads, mesh, axis, "the AR KV cache's head split")
    return lambda attention: head_parallel_attention(mesh, attention, axis=axis)


def as_mesh(mesh: Mesh | str) -> Mesh:
    """`mesh` itself when it is a (data, fsdp, seq) Mesh; a spec string ("fsdp=4,seq=2") gives `make_mesh(spec)`
    over all devices (whose error names the shapes that fit the device count)."""
    if isinstance(mesh, str):
        return make_mesh(mesh)
    check_mesh(mesh)
    return mesh


def placement(tree, mesh: Mesh) -> tuple:
    """(treedef, shardings per leaf) of `tree` as placed: a leaf's NamedSharding on `mesh` (see
    `shard_params`), replicated for a leaf not placed on it. Hashable, for `compile_on_mesh`."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(a.sharding if isinstance(getattr(a, "sharding", None), NamedSharding)
                          and a.sharding.mesh == mesh else NamedSharding(mesh, P()) for a in leaves)


def batch_sharding(mesh: Mesh, batch: int) -> NamedSharding:
    """Latents / contexts (B, ...) split by batch over the batch axes that divide it, else replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh, batch)))


@functools.lru_cache(maxsize=64)
def compile_on_mesh(impl, static: tuple, params: tuple, in_shardings: tuple, out_shardings):
    """`jax.jit(partial(impl, *static))` with the params placed as `params` (a `placement`) followed by
    `in_shardings` (None = as the argument is placed), and `out_shardings` (a None leaf = XLA's choice).
    Cached, so a sampler called again with the same denoiser, mesh and placement reuses its compilation."""
    return jax.jit(functools.partial(impl, *static), in_shardings=(jax.tree.unflatten(*params), *in_shardings),
                   out_shardings=out_shardings)


# -------------------------------------------------------------------------------------------- multi-host
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kw) -> None:
    """`jax.distributed.initialize` for multi-host runs, a no-op when already initialised or single-process.

    On TPU pods and SLURM / Open MPI GPU clusters JAX finds the coordinator by itself (call with no
    arguments); elsewhere pass the coordinator "host:port", the process count and this process's id (or set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). Then `make_mesh` spans every process's
    devices and `sample(..., mesh=)` runs the same program on all of them (see docs/parallel.md)."""
    if jax.distributed.is_initialized():
        return
    if coordinator_address is None and num_processes is None and process_id is None and not kw:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kw)


__all__ = ["as_mesh", "AXES", "batch_axes", "batch_sharding", "cfg_parallel_denoiser", "CFGContext", "check_heads",
           "check_mesh", "check_shardable", "check_tokens", "compile_on_mesh", "constrain_batch", "constrain_heads",
           "constrain_tokens", "context_mesh", "FSDP", "head_parallel_attention", "head_specs", "heads_wrap",
           "initialize_distributed", "make_mesh", "mesh_options", "PARAM_AXES", "param_path", "param_shardings",
           "param_specs", "parse_mesh_spec", "placement", "ring_attention", "Rules", "seq_parallel_attention",
           "shard_params", "token_spec", "ulysses_attention", "UlyssesHeads", "UNSHARDED_STATES", "unstack_branches"]
