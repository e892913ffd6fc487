"""Relaxed (differentiable) forms of the caching decisions, and a sampler that jax.grad can run through.

Every decision "compute this unit or reuse its cached value" becomes a gate g in [0, 1] and the output mixes
`g * fresh + (1 - g) * cached`; the cache is refreshed the same way (`g * fresh + (1 - g) * old`), so a gate
of exactly 1 or 0 is the hard rule's compute or reuse. Three modes (static):

- "soft": g = sigmoid(margin / temperature); both sides are computed (training, sensitivity);
- "straight_through": the forward value is the hard decision (exactly 0 or 1), the gradient the soft one's;
- "hard": the hard decision with `lax.cond`, so skipped work is really skipped (evaluation, counters).

As temperature -> 0 "soft" tends to "hard" (tests/test_relaxed.py checks decisions and outputs against
`vidaccel.residual_cache`). Rules (`ThresholdRule`, `ScheduleRule`, the policy network `PolicyNetRule`) gate
the whole block stack per call (`relaxed_cache`); `relaxed_layer_reuse` gates each layer's self-attention per
call (reusing its output). On AR rollouts, `relaxed_rollout` runs `relaxed_cache(chunk_denoiser(model), rule)`
chunk by chunk; a rule of scope "chunk" is FlowCache's per-chunk rule (tests/test_relaxed_ar.py).

Policy parameters travel with the model's: a relaxed denoiser's `params` is `RelaxedParams(model, policy,
temperature)`, so `jax.grad` of a loss of `relaxed_sample(den, params, ...)` with respect to `params.policy`
differentiates the whole sampler. `relaxed_sample` rematerialises each step (`jax.checkpoint`), so the
backward pass stores one step's carry per step, not every activation of the trajectory.

Expected compute is a differentiable output: each state accumulates `expected` = sum of g weighted by the
unit's share of a block-stack pass (FLOPs), next to `computed`, the count of hard decisions; see
`compute_fraction`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vidaccel.attention import dense_attention
from vidaccel.checks import choice_arg, float_arg, int_arg
from vidaccel.residual_cache import SCOPES, ResidualCacheConfig, indicator_value, relative_change, rescale
from vidaccel.sampling import check_guidance, guided_velocity, init_branches
from vidaccel.transforms import (
    CFGBranches,
    Denoiser,
    DenoiseSpec,
    abstract_embedding,
    add_work,
    branch_states,
    find_state,
    wrap_denoiser,
)

MODES = ("soft", "straight_through", "hard")


# ------------------------------------------------------------------------------------------------ gates
def gate(margin: jax.Array, temperature, mode: str, hard: jax.Array | None = None) -> jax.Array:
    """The relaxed decision for a margin (>= 0 computes): sigmoid(margin / temperature) ("soft"), the step
    (margin >= 0) ("hard"), or the step with the sigmoid's gradient ("straight_through"), as float32.
    `hard` (bool) overrides the step, for rules whose hard comparison is strict."""
    choice_arg("mode", mode, MODES)
    margin = jnp.asarray(margin, jnp.float32)
    hard = (margin >= 0) if hard is None else hard
    hard = hard.astype(jnp.float32)
    if mode == "hard":
        return hard
    soft = jax.nn.sigmoid(margin / temperature)
    if mode == "soft":
        return soft
    return hard + (soft - jax.lax.stop_gradient(soft))     # forward value exactly `hard`


def check_temperature(temperature) -> float:
    """A temperature as a float > 0 (ValueError otherwise)."""
    return float_arg("temperature", temperature, low=0.0, low_open=True)


def check_budget(budget) -> float:
    """A compute budget (fraction of the dense compute) in (0, 1] (ValueError otherwise)."""
    return float_arg("budget", budget, low=0.0, high=1.0, low_open=True)


@struct.dataclass
class RelaxedParams:
    """What a relaxed denoiser's `apply` takes as params: the model's, the policy's, and the temperature
    (a leaf, so annealing does not recompile; its gradient is stopped)."""

    model: Any
    policy: Any
    temperature: jax.Array
    rule: Any = struct.field(pytree_node=False, default=None)


def relaxed_params(den: Denoiser, policy=None, temperature: float = 1.0, model=None) -> RelaxedParams:
    """Params for relaxed denoiser `den`: its default model params and policy unless given; temperature > 0."""
    rule = _rule_of(den)
    policy = rule.init_policy() if policy is None else policy
    rule.check_policy(policy)
    return RelaxedParams(den.params.model if model is None else model, policy,
                         jnp.float32(check_temperature(temperature)), rule)


def _rule_of(den: Denoiser):
    if not isinstance(den, Denoiser) or not isinstance(den.params, RelaxedParams):
        raise ValueError(f"{getattr(den, 'name', den)!r} is not a relaxed denoiser (make one with relaxed_cache "
                         "or relaxed_layer_reuse)")
    return den.params.rule


def check_relaxed_params(params, rule) -> RelaxedParams:
    """`params` as a relaxed denoiser of `rule` needs them (RelaxedParams of this rule, a policy of the rule's
    shapes, temperature > 0), else a clear error; public for relaxed denoisers built elsewhere (e.g. the relaxed
    MotionCache of `experiments.cache_policy.token_rule`)."""
    if not isinstance(params, RelaxedParams):
        raise TypeError(f"a relaxed denoiser takes RelaxedParams (see relaxed_params), got {type(params).__name__}")
    if params.rule is not None and params.rule != rule:
        raise ValueError(f"these RelaxedParams are for {params.rule!r}, not this denoiser's {rule!r}: the policy "
                         "does not match the denoiser")
    rule.check_policy(params.policy)
    t = params.temperature
    if not isinstance(t, jax.core.Tracer):
        check_temperature(t)
    return params


# ------------------------------------------------------------------------------------------------ rules
class Call(NamedTuple):
    """Where a call sits, as a rule sees it: `count` (traced) its index in its scope (the whole run, or its
    chunk for scope="chunk"), `calls` the calls per scope, `index` (traced) its index in the run, `total`
    the calls of the run per CFG branch (chunks x steps)."""

    count: jax.Array
    calls: int
    index: jax.Array
    total: int


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
    """TeaCache/FlowCache's accumulated-change rule with a learnable threshold (policy {"log_thresh": ()}).

    Margin = (acc + delta - thresh) / thresh, a relative margin so that the temperature is scale-free; the
    relaxed accumulator after a call is (1 - g) * (acc + delta) (reset when computed). Warm-up, cut-off and
    changes above `max_change` force a computation (g = 1), as in `residual_cache`. `cfg.thresh` (> 0) is the
    initial threshold; `cfg.scope` "chunk" (FlowCache, AR rollouts) restarts the warm-up, cut-off and
    accumulator at every chunk.
    """

    cfg: ResidualCacheConfig

    def __post_init__(self):
        _check_accumulator_cfg(self.cfg, "ThresholdRule")

    def init_policy(self) -> dict:
        return {"log_thresh": jnp.float32(math.log(self.cfg.thresh))}

    def check_policy(self, policy) -> None:
        check_policy_shapes(policy, {"log_thresh": ()}, "ThresholdRule")

    @property
    def scope(self) -> str:
        return self.cfg.scope

    def gate(self, policy, rs, emb, call: Call, temperature, mode):
        ind, _, acc_next, forced = _accumulate(self.cfg, rs, emb, call.count, call.calls)
        thresh = jnp.exp(policy["log_thresh"])
        safe = jnp.where(forced, thresh, acc_next)          # keeps inf/NaN out of the gradient
        g = jnp.where(forced, 1.0, gate((safe - thresh) / thresh, temperature, mode))
        return g, rs.replace(acc=((1.0 - g) * safe).astype(jnp.float32), prev=ind)

    def rule_state(self, emb, total: int):
        return _acc_state(self.cfg, emb)

    def reset(self, rs):
        """The state at a new scope (chunk): the accumulator restarts, as FlowCache's at a chunk commit."""
        return rs.replace(acc=jnp.zeros_like(rs.acc))


def _check_accumulator_cfg(cfg, name: str) -> None:
    if not isinstance(cfg, ResidualCacheConfig):
        raise TypeError(f"{name} needs a ResidualCacheConfig, got {type(cfg).__name__}")
    if cfg.thresh <= 0:
        raise ValueError(f"{name} needs cfg.thresh > 0 (a learnable log-threshold / the feature scale), got "
                         f"{cfg.thresh}")
    if cfg.reuse != "hidden":
        raise ValueError(f"{name} supports reuse='hidden' (the block-stack residual), not {cfg.reuse!r}")


def _accumulate(cfg: ResidualCacheConfig, rs, emb, count, calls: int):
    """The accumulated-change rule's quantities for one call: (indicator, rescaled change delta, acc + delta,
    forced); forced = warm-up, cut-off, or a change outside the fitted range (acc + delta not finite)."""
    ind = indicator_value(cfg.indicator, emb)
    delta = rescale(cfg.coefficients, relative_change(ind, rs.prev), cfg.max_change)
    acc_next = rs.acc + delta
    forced = (count < cfg.warmup) | ~jnp.isfinite(acc_next)
    if cfg.cutoff is not None:
        forced = forced | (count >= (cfg.cutoff if cfg.cutoff >= 0 else calls + cfg.cutoff))
    return ind, delta, acc_next, forced


def _acc_state(cfg: ResidualCacheConfig, emb) -> _AccState:
    ind = jax.eval_shape(lambda e: indicator_value(cfg.indicator, e), emb)      # emb may be abstract
    return _AccState(jnp.zeros((), jnp.float32), jnp.zeros(ind.shape, ind.dtype))


NET_FEATURES = ("accumulator", "change", "step", "latent_change")


def policy_net_logits(policy: dict, features: jax.Array) -> jax.Array:
    """The policy network's gate logit for features (..., 4) (`NET_FEATURES`): a linear term plus one tanh
    hidden layer, f . linear + bias + tanh(f W_in + b_in) . w_out."""
    f = jnp.asarray(features, jnp.float32)
    hidden = jnp.tanh(f @ policy["w_in"] + policy["b_in"])
    return f @ policy["linear"] + policy["bias"] + hidden @ policy["w_out"]


@dataclasses.dataclass(frozen=True)
class PolicyNetRule:
    """A small policy network that reads what the accumulated-change rule reads and outputs the gate logit
    (`policy_net_logits`). Features per call (`NET_FEATURES`): the accumulator after the call acc + delta and
    the call's rescaled change delta, both in units of `cfg.thresh` (the calibrated threshold); the step
    fraction count / (calls - 1) (within the chunk for scope="chunk"); the relative change of the
    patch-embedded latent since the previous call (content-dependent, unlike TeaCache's e0 indicator). The
    relaxed accumulator is (1 - g)(acc + delta).

    Policy {"linear": (4,), "bias": (), "w_in": (4, hidden), "b_in": (hidden,), "w_out": (hidden,)},
    initialised at linear = (1, 0, 0, 0), bias = -1, w_out = 0 (W_in random with `seed`): the margin
    (acc + delta) / thresh - 1 of `ThresholdRule(cfg)`, so learning starts from the calibrated rule. Forced
    calls (g = 1, features recorded as 0): the first, warm-up, cut-off, changes above `max_change`. The state
    records every call's features, for replaying the network on a trajectory. The network's own FLOPs
    (~10 hidden) are not counted: a gate weighs one block-stack pass."""

    cfg: ResidualCacheConfig
    hidden: int = 8
    seed: int = 0

    def __post_init__(self):
        _check_accumulator_cfg(self.cfg, "PolicyNetRule")
        int_arg("PolicyNetRule.hidden", self.hidden, minimum=1)
        int_arg("PolicyNetRule.seed", self.seed, minimum=0)

    def init_policy(self) -> dict:
        nf = len(NET_FEATURES)
        w_in = np.random.default_rng(self.seed).normal(size=(nf, self.hidden)) / math.sqrt(nf)
        return {"linear": jnp.asarray(np.eye(nf, dtype=np.float32)[0]), "bias": jnp.float32(-1.0),
                "w_in": jnp.asarray(w_in, jnp.float32), "b_in": jnp.zeros((self.hidden,), jnp.float32),
                "w_out": jnp.zeros((self.hidden,), jnp.float32)}

    def check_policy(self, policy) -> None:
        nf = len(NET_FEATURES)
        check_policy_shapes(policy, {"linear": (nf,), "bias": (), "w_in": (nf, self.hidden), "b_in": (self.hidden,),
                             "w_out": (self.hidden,)}, "PolicyNetRule")

    @property
    def scope(self) -> str:
        return self.cfg.scope

    def gate(self, policy, rs, emb, call: Call, temperature, mode):
        count, calls = call.count, call.calls
        ind, delta, acc_next, forced = _accumulate(self.cfg, rs.acc_state, emb, count, calls)
        forced = forced | (count == 0)
        scale = jnp.float32(self.cfg.thresh)
        latent = relative_change(emb.tokens, rs.tokens)
        f = jnp.stack([acc_next / scale, delta / scale, count / max(calls - 1, 1), latent]).astype(jnp.float32)
        f = jnp.where(forced, 0.0, f)                         # safe values: keeps inf/NaN out of the gradient
        g = jnp.where(forced, 1.0, gate(policy_net_logits(policy, f), temperature, mode))
        safe = jnp.where(forced, 0.0, acc_next)
        acc = rs.acc_state.replace(acc=((1.0 - g) * safe).astype(jnp.float32), prev=ind)
        i = jnp.minimum(call.index, call.total - 1)
        return g, _NetState(acc, emb.tokens, rs.features.at[i].set(f))

    def rule_state(self, emb, total: int):
        return _NetState(_acc_state(self.cfg, emb), jnp.zeros(emb.tokens.shape, emb.tokens.dtype),
                         jnp.zeros((total, len(NET_FEATURES)), jnp.float32))

    def reset(self, rs):
        return rs.replace(acc_state=rs.acc_state.replace(acc=jnp.zeros_like(rs.acc_state.acc)))


@dataclasses.dataclass(frozen=True)
class ScheduleRule:
    """A free schedule: one gate per call (`calls` = steps, or chunks x steps flattened, chunk-major), the first
    call of each scope forced. scope "video" (one scope: the run) or "chunk" (AR rollouts: each chunk's first
    call is computed, as it has no residual of its own). parametrization "logits": policy {"logits": (calls,)},
    margin = logit; "gates": policy {"gates": (calls,)}, the gate values themselves (clipped to [0, 1] in the
    forward pass, with gradient 1 also at 0 and 1; hard = gate >= 0.5), for sensitivities d(loss)/d(gate).
    `init` (calls,) sets the initial policy (default: compute every call)."""

    calls: int
    parametrization: str = "logits"
    init: tuple[float, ...] | None = None
    scope: str = "video"

    def __post_init__(self):
        int_arg("ScheduleRule.calls", self.calls, minimum=1)
        choice_arg("ScheduleRule.parametrization", self.parametrization, ("logits", "gates"))
        choice_arg("ScheduleRule.scope", self.scope, SCOPES)
        if self.init is not None and len(self.init) != self.calls:
            raise ValueError(f"ScheduleRule.init has {len(self.init)} values for calls={self.calls}")

    def init_policy(self) -> dict:
        default = 1.0 if self.parametrization == "gates" else 3.0
        v = np.full((self.calls,), default, np.float32) if self.init is None else np.asarray(self.init, np.float32)
        return {self.parametrization: jnp.asarray(v)}

    def check_policy(self, policy) -> None:
        check_policy_shapes(policy, {self.parametrization: (self.calls,)}, "ScheduleRule")

    def gate(self, policy, rs, emb, call: Call, temperature, mode):
        if call.total != self.calls:
            raise ValueError(f"the schedule has {self.calls} gates but this sampler makes {call.total} calls per "
                             "branch; make the ScheduleRule with calls = steps (x chunks)")
        v = policy[self.parametrization][jnp.minimum(call.index, self.calls - 1)]
        if self.parametrization == "gates":
            g = v + jax.lax.stop_gradient(jnp.clip(v, 0.0, 1.0) - v)   # clipped, with gradient 1 at 0 and 1
            if mode != "soft":
                hard = (v >= 0.5).astype(jnp.float32)
                g = hard if mode == "hard" else hard + (g - jax.lax.stop_gradient(g))
        else:
            g = gate(v, temperature, mode)
        return jnp.where(call.count == 0, 1.0, g), rs

    def rule_state(self, emb, total: int):
        return None

    def reset(self, rs):
        return rs


def hard_schedule(rule: ScheduleRule, policy, steps: int | None = None) -> np.ndarray:
    """(calls,) bool: the hard decisions of a schedule policy (the first call forced; with scope "chunk",
    the first of every `steps` calls)."""
    v = np.asarray(policy[rule.parametrization])
    return (v >= (0.5 if rule.parametrization == "gates" else 0.0)) | _forced_calls(rule, steps)


def _forced_calls(rule: ScheduleRule, steps: int | None) -> np.ndarray:
    """(calls,) bool: the calls a schedule always computes (each scope's first)."""
    out = np.zeros(rule.calls, bool)
    out[0] = True
    if rule.scope == "chunk":
        if steps is None:
            raise ValueError("a scope='chunk' schedule needs steps= (the calls per chunk) for its forced calls")
        steps = int_arg("steps", steps, minimum=1)
        if rule.calls % steps:
            raise ValueError(f"a scope='chunk' schedule of {rule.calls} calls is not a whole number of chunks of "
                             f"{steps} steps")
        out[::steps] = True
    return out


def top_k_schedule(rule: ScheduleRule, policy, budget: float, steps: int | None = None) -> dict:
    """A logits policy whose hard schedule computes the round(budget * calls) calls of highest logit (the
    forced calls always, see `hard_schedule`): the budget-exact hard version of a learned schedule."""
    check_budget(budget)
    if rule.parametrization != "logits":
        raise ValueError("top_k_schedule needs a logits ScheduleRule")
    v = np.asarray(policy["logits"], np.float64).copy()
    v[_forced_calls(rule, steps)] = np.inf
    k = max(1, int(round(budget * rule.calls)))
    keep = np.argsort(-v, kind="stable")[:k]
    out = np.full(v.shape, -1.0, np.float32)
    out[keep] = 1.0
    return {"logits": jnp.asarray(out)}


def resample_schedule(rule: ScheduleRule, policy, calls: int) -> tuple[ScheduleRule, dict]:
    """A logits schedule learned for `rule.calls` calls carried to `calls` calls (another step count): each
    new call j takes the logit linearly interpolated at its step fraction j / (calls - 1) between the old
    calls' fractions i / (rule.calls - 1) (the same shifted sigma schedule at both counts, so equal fractions
    are equal noise levels). Returns the new rule and policy; `top_k_schedule` then makes it budget-exact."""
    int_arg("calls", calls, minimum=1)
    if rule.parametrization != "logits" or rule.scope != "video":
        raise ValueError("resample_schedule needs a logits ScheduleRule of scope 'video'")
    rule.check_policy(policy)
    old = np.linspace(0.0, 1.0, rule.calls) if rule.calls > 1 else np.zeros(1)
    new = np.linspace(0.0, 1.0, calls) if calls > 1 else np.zeros(1)
    v = np.interp(new, old, np.asarray(policy["logits"], np.float64)).astype(np.float32)
    return ScheduleRule(calls), {"logits": jnp.asarray(v)}


def check_policy_shapes(policy, shapes: dict, name: str) -> None:
    """A policy dict with exactly the keys of `shapes` (key -> shape), each of that shape; else a ValueError
    naming rule `name`."""
    if not isinstance(policy, dict) or set(policy) != set(shapes):
        got = sorted(policy) if isinstance(policy, dict) else type(policy).__name__
        raise ValueError(f"{name} policy must be a dict with keys {sorted(shapes)}, got {got}: the policy does "
                         "not match this relaxed denoiser")
    for k, shape in shapes.items():
        if tuple(jnp.shape(policy[k])) != tuple(shape):
            raise ValueError(f"{name} policy[{k!r}] has shape {tuple(jnp.shape(policy[k]))}, this denoiser "
                             f"needs {tuple(shape)}: the policy does not match the denoiser")


# ------------------------------------------------------------------------------------------------ states
@struct.dataclass
class _AccState:
    acc: jax.Array
    prev: jax.Array


@struct.dataclass
class _NetState:
    acc_state: _AccState
    tokens: jax.Array          # the previous call's patch-embedded latent
    features: jax.Array        # (calls, 4) the features each call's network read


@struct.dataclass
class RelaxedState:
    """State of a relaxed denoiser (one CFG branch).

    expected: () float32, sum over calls of g x the unit's share of a block-stack pass (differentiable).
    computed: () float32, the same with hard decisions (g >= 0.5) counted. gates: (calls,) each call's gate
    (for `relaxed_layer_reuse`, the mean over layers). residual: cached block-stack residual, or per-layer
    attention outputs (layers, B, N, heads, head_dim). count: calls so far (in the run); calls: calls of the
    run; scope_calls: calls per scope (the steps of a chunk for a rule of scope "chunk", else `calls`).
    """

    inner: Any
    rule: Any
    residual: jax.Array
    count: jax.Array
    expected: jax.Array
    computed: jax.Array
    gates: jax.Array
    calls: int = struct.field(pytree_node=False, default=1)
    scope_calls: int = struct.field(pytree_node=False, default=1)

    def call(self) -> Call:
        """The current call as a rule sees it (calls run scope by scope, each with `scope_calls` of them)."""
        return Call(self.count % self.scope_calls, self.scope_calls, self.count, self.calls)


def _calls(spec: DenoiseSpec) -> int:
    return spec.num_steps * spec.num_chunks


# ------------------------------------------------------------------------------------------------ step level
def relaxed_cache(den: Denoiser, rule, *, mode: str = "straight_through") -> Denoiser:
    """`den` (staged) with its whole block stack gated per call by `rule` (`ThresholdRule`, `ScheduleRule`,
    `PolicyNetRule`): tokens = x + g * (blocks(x) - x) + (1 - g) * cached residual. Its params are
    `RelaxedParams`.

    On an AR chunk denoiser (`models.ar.rollout.chunk_denoiser`, run by `relaxed_rollout`) a rule of scope
    "chunk" works as FlowCache's per-chunk rule: at each chunk commit the accumulator restarts, and the warm-up,
    cut-off (and a schedule's forced first call) count from the chunk's first call; the residual is that of
    the chunk's last computed call (the forced first call refreshes it). Scope "video" runs one scope over
    the whole rollout (TeaCache's)."""
    choice_arg("mode", mode, MODES)
    if not isinstance(rule, ThresholdRule | ScheduleRule | PolicyNetRule):
        raise TypeError(f"relaxed_cache needs a ThresholdRule, ScheduleRule or PolicyNetRule, got "
                        f"{type(rule).__name__}")
    if den.stages is None:
        raise ValueError(f"relaxed_cache needs a staged denoiser; {den.name!r} has none")
    if rule.scope == "chunk" and den.commit is None:
        raise ValueError(f"a {type(rule).__name__} of scope 'chunk' needs an AR chunk denoiser (one with `commit`, "
                         "e.g. chunk_denoiser(model)); use scope='video' for text-to-video sampling")
    st = den.stages

    def init(spec: DenoiseSpec) -> RelaxedState:
        inner = den.init(spec)
        emb = abstract_embedding(den, inner, spec)
        z = jnp.zeros((), jnp.float32)
        calls = _calls(spec)
        return RelaxedState(inner, rule.rule_state(emb, calls), jnp.zeros(emb.tokens.shape, emb.tokens.dtype),
                            jnp.zeros((), jnp.int32), z, z, jnp.zeros((calls,), jnp.float32), calls,
                            spec.num_steps if rule.scope == "chunk" else calls)

    def apply(params, state: RelaxedState, x, t, context):
        params = check_relaxed_params(params, rule)
        temp = jax.lax.stop_gradient(params.temperature)
        emb, inner = st.embed(params.model, state.inner, x, t, context)
        g, rs = rule.gate(params.policy, state.rule, emb, state.call(), temp, mode)
        if mode == "hard":
            def run(inner):
                tokens, inner = st.blocks(params.model, inner, emb)
                return tokens - emb.tokens, inner

            residual, inner = jax.lax.cond(g > 0.5, run, lambda inner: (state.residual, inner), inner)
        else:
            tokens, inner = st.blocks(params.model, inner, emb)
            gd = g.astype(tokens.dtype)
            residual = gd * (tokens - emb.tokens) + (1 - gd) * state.residual
        out = st.head(params.model, emb.tokens + residual, emb)
        i = jnp.minimum(state.count, state.calls - 1)
        state = state.replace(inner=inner, rule=rs, residual=residual, count=state.count + 1,
                              expected=state.expected + g,
                              computed=state.computed + jax.lax.stop_gradient((g >= 0.5).astype(jnp.float32)),
                              gates=state.gates.at[i].set(g))
        return out, state

    commit = None
    if den.commit is not None:
        def commit(params, state: RelaxedState, x0, context):
            inner = den.commit(check_relaxed_params(params, rule).model, state.inner, x0, context)
            return state.replace(inner=inner, rule=rule.reset(state.rule) if rule.scope == "chunk" else state.rule)

    out = wrap_denoiser(den, init=init, apply=apply, name=f"relaxed[{type(rule).__name__}]", commit=commit)
    return dataclasses.replace(out, params=RelaxedParams(den.params, rule.init_policy(), jnp.float32(1.0), rule))


# ------------------------------------------------------------------------------------------------ layer level
@dataclasses.dataclass(frozen=True)
class LayerRule:
    """Per-layer self-attention reuse: one gate per (call, layer), policy {"logits": (calls, layers)}; the
    first call is forced. A reused layer takes its self-attention output from its last computed call."""

    calls: int
    layers: int

    def __post_init__(self):
        int_arg("LayerRule.calls", self.calls, minimum=1)
        int_arg("LayerRule.layers", self.layers, minimum=1)

    def init_policy(self) -> dict:
        return {"logits": jnp.full((self.calls, self.layers), 3.0, jnp.float32)}

    def check_policy(self, policy) -> None:
        check_policy_shapes(policy, {"logits": (self.calls, self.layers)}, "LayerRule")


def top_k_layers(rule: LayerRule, policy, budget: float, share: float) -> dict:
    """A logits policy whose hard version spends `budget` block-stack passes per call: it computes the k
    (call, layer) self-attentions of highest logit (the first call's always), k = round((budget - (1 - share)) /
    share x calls x layers), since a call costs (1 - share) + share x (its computed layers / layers) passes
    (`relaxed_layer_reuse`; `share` = `attention_share`). A budget the rule cannot spend is a ValueError."""
    check_budget(budget)
    float_arg("share", share, low=0.0, high=1.0, low_open=True)
    rule.check_policy(policy)
    n = rule.calls * rule.layers
    lo = 1.0 - share + share * rule.layers / n
    if not lo - 1e-9 <= budget <= 1.0:
        raise ValueError(f"budget={budget} cannot be spent by per-layer attention reuse: with attention {share:.3f} "
                         f"of a block pass and the first call forced, a budget lies in [{lo:.4f}, 1]")
    k = min(n, max(rule.layers, int(round((budget - (1.0 - share)) / share * n))))
    v = np.asarray(policy["logits"], np.float64).copy()
    v[0] = np.inf
    keep = np.argsort(-v.reshape(-1), kind="stable")[:k]
    out = np.full(n, -1.0, np.float32)
    out[keep] = 1.0
    return {"logits": jnp.asarray(out.reshape(rule.calls, rule.layers))}


def attention_share(cfg, tokens: int, text_len: int) -> float:
    """The self-attention core's (QK^T and PV) share of a Wan block's FLOPs at `tokens` video tokens and
    `text_len` text tokens (projections, cross-attention and FFN make the rest); `cfg` a WanConfig."""
    d, f = cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim
    core = 4.0 * tokens * tokens * d
    rest = tokens * (8.0 * d * d + 4.0 * d * d + 4.0 * d * f + 4.0 * text_len * d) + text_len * 4.0 * d * d
    return core / (core + rest)


def relaxed_layer_reuse(den: Denoiser, rule: LayerRule, *, mode: str = "straight_through") -> Denoiser:
    """The dense Wan denoiser (`wan_denoiser(model)`) with each layer's self-attention output gated per call:
    o = g * attention(q, k, v) + (1 - g) * cached o of that layer. `expected` counts a call as
    (1 - share) + share * mean_l(g_l) block-stack passes, share = `attention_share`."""
    choice_arg("mode", mode, MODES)
    if den.stages is None or den.graphdef is None or den.name != "dense":
        raise ValueError(f"relaxed_layer_reuse needs the dense staged Wan denoiser (wan_denoiser(model)); got "
                         f"{den.name!r}")
    cfg = den.config
    if rule.layers != cfg.num_layers:
        raise ValueError(f"LayerRule has {rule.layers} layers but the model has {cfg.num_layers}: the policy "
                         "does not match the denoiser")
    heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
    st = den.stages

    def init(spec: DenoiseSpec) -> RelaxedState:
        inner = den.init(spec)
        emb = abstract_embedding(den, inner, spec)
        b, n, _ = emb.tokens.shape
        z = jnp.zeros((), jnp.float32)
        cache = jnp.zeros((cfg.num_layers, b, n, heads, hd), emb.tokens.dtype)
        share = attention_share(cfg, n, emb.context.shape[1])
        return RelaxedState(inner, jnp.float32(share), cache, jnp.zeros((), jnp.int32), z, z,
                            jnp.zeros((_calls(spec),), jnp.float32), _calls(spec), _calls(spec))

    def apply(params, state: RelaxedState, x, t, context):
        params = check_relaxed_params(params, rule)
        if state.calls != rule.calls:
            raise ValueError(f"the LayerRule has {rule.calls} calls but this sampler makes {state.calls} per branch")
        temp = jax.lax.stop_gradient(params.temperature)
        emb, inner = st.embed(params.model, state.inner, x, t, context)
        i = jnp.minimum(state.count, rule.calls - 1)
        gl = gate(params.policy["logits"][i], temp, mode)
        gl = jnp.where(state.count == 0, 1.0, gl)

        def attention(q, k, v, info, ls):
            cached, g = ls
            if mode == "hard":
                o = jax.lax.cond(g > 0.5, lambda: dense_attention(q, k, v, info)[0].astype(q.dtype), lambda: cached)
            else:
                gd = g.astype(q.dtype)
                o = gd * dense_attention(q, k, v, info)[0].astype(q.dtype) + (1 - gd) * cached
            return o, (o, g)

        model = nnx.merge(den.graphdef, params.model)
        tokens, (cache, _) = model.blocks(emb, attention=attention, layer_state=(state.residual, gl))
        inner = add_work(inner, block_passes=1, token_layers=emb.tokens.shape[1] * cfg.num_layers)
        share = state.rule
        cost = (1.0 - share) + share * jnp.mean(gl)
        hard_cost = jax.lax.stop_gradient((1.0 - share) + share * jnp.mean((gl >= 0.5) * 1.0))
        state = state.replace(inner=inner, residual=cache, count=state.count + 1, expected=state.expected + cost,
                              computed=state.computed + hard_cost,
                              gates=state.gates.at[i].set(jnp.mean(gl)))
        return st.head(params.model, tokens, emb), state

    out = wrap_denoiser(den, init=init, apply=apply, name="relaxed[LayerRule]")
    return dataclasses.replace(out, params=RelaxedParams(den.params, rule.init_policy(), jnp.float32(1.0), rule))


# ------------------------------------------------------------------------------------------------ token level
def soft_token_gates(acc, weights, delta, thresh, temperature, mode: str, *, forced=False, frames: int = 1,
                     temporal_vote: float | None = None, min_update_ratio: float = 0.0):
    """MotionCache's per-token decision, relaxed: acc, weights (B, N) (the motion weights in effect, frame-major
    tokens over `frames` frames), delta () the call's rescaled change, thresh > 0. Returns (gates (B, N),
    accumulators after the call (1 - g)(acc + delta w)).

    Margins: (acc + delta w - thresh) / thresh per token; the temporal vote keeps a spatial column when the
    mean gate over frames exceeds `temporal_vote`; `min_update_ratio` drops a row whose mean gate is below
    it; `forced` gates every token. The hard decisions are `experiments.motioncache.decide_tokens`'s."""
    b, n = acc.shape
    acc_next = acc + delta * weights
    g = gate((acc_next - thresh) / thresh, temperature, mode)
    # the vote and the ratio compare counts: their soft margins are taken from the midpoint between the last
    # count that fails and the first that passes, so no count sits on a tie (sigmoid(0) = 1/2)
    if temporal_vote is not None:
        col = g.reshape(b, frames, n // frames).mean(axis=1)
        mid = (math.floor(temporal_vote * frames) + 0.5) / frames
        cg = gate(col - mid, temperature, mode, hard=col > temporal_vote)
        g = jnp.broadcast_to(cg[:, None, :], (b, frames, n // frames)).reshape(b, n)
    if min_update_ratio > 0:
        ratio = g.mean(axis=1, keepdims=True)
        mid = (math.ceil(min_update_ratio * n) - 0.5) / n
        g = g * gate(ratio - mid, temperature, mode, hard=ratio >= min_update_ratio)
    g = jnp.where(forced, 1.0, g)
    return g, ((1.0 - g) * acc_next).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ attention
def soft_block_mask(importance: jax.Array, threshold, temperature, mode: str, *,
                    keep_first_block: bool = True) -> jax.Array:
    """Relaxed per-row cumulative (top-p) block selection, XAttention's rule with per-head thresholds:
    importance (B, H, nq, nk), threshold tau (H,) -> block weights (B, H, nq, nk) in [0, 1].

    Each row is sorted descending (ties by block index, as `experiments.xattention.select_blocks`); a block is
    kept when the mass sorted before it is below tau x the row total: hard = (before < tau total), margin =
    tau - before / total. tau >= 1 keeps every block; `keep_first_block` keeps key block 0 in every row.
    The order does not depend on tau, so the weights are differentiable in tau."""
    choice_arg("mode", mode, MODES)
    a = importance.astype(jnp.float32)
    tau = jnp.asarray(threshold, jnp.float32).reshape(1, -1, 1, 1)
    total = jnp.maximum(a.sum(-1, keepdims=True), 1e-30)
    order = jnp.argsort(-a, axis=-1, stable=True)
    sorted_a = jnp.take_along_axis(a, order, axis=-1)
    before = jnp.cumsum(sorted_a, axis=-1) - sorted_a
    hard = ((before < total * tau) | (tau >= 1.0)).astype(jnp.float32)
    if mode == "hard":
        w = hard
    else:
        soft = jax.nn.sigmoid((tau - before / total) / temperature)
        soft = jnp.where(tau >= 1.0, 1.0, soft)
        w = soft if mode == "soft" else hard + (soft - jax.lax.stop_gradient(soft))
    w = jnp.take_along_axis(w, jnp.argsort(order, axis=-1), axis=-1)
    return w.at[..., 0].set(1.0) if keep_first_block else w


def block_weighted_attention(q, k, v, weights: jax.Array, block_size: int) -> jax.Array:
    """Attention with block weights (B, H, nq, nk) in [0, 1] (q, k, v (B, N, H, D)): each key's softmax weight
    is multiplied by its block's weight and renormalised (logits + log w); w in {0, 1} is the block-sparse
    attention of that mask, computed densely (a reference, for differentiable studies)."""
    b, n, h, d = q.shape
    idx = jnp.arange(n) // block_size
    w = weights[:, :, idx][:, :, :, idx]                                   # (B, H, N, N)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(d)
    s = jnp.where(w > 0, s + jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)


# ------------------------------------------------------------------------------------------------ sampler
@struct.dataclass
class RelaxedOutput:
    """`relaxed_sample`'s result: final latents, denoiser state(s), and the latents before every step
    (steps, ...) when asked for (else None)."""

    latents: jax.Array
    state: Any
    trajectory: Any = None


REMATS = (False, True, "step", "nested")


def relaxed_sample(den: Denoiser, params: RelaxedParams, noise: jax.Array, context: jax.Array, *, solver,
                   guidance: float | None = None, negative_context=None, remat: bool | str = "nested",
                   trajectory: bool = False) -> RelaxedOutput:
    """The sampling loop of `vidaccel.sampling.sample` (a `lax.scan` over steps, CFG branches as separate
    calls), not jitted and without progress bar, so that it can be differentiated: wrap it in `jax.grad` /
    `jax.jit`.

    remat: False keeps every step's activations for the backward pass. True / "step" rematerialises each step
    (`jax.checkpoint`): the backward pass stores one carry (latents, solver and denoiser state) per step.
    "nested" (default) also checkpoints segments of ceil(sqrt(steps)) steps, so about 2 sqrt(steps) carries
    are stored at a time, for one more forward pass.
    """
    guided, negative, scale = _check_relaxed_run(den, noise, context, guidance, negative_context, remat)
    spec = DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype),
                       jax.ShapeDtypeStruct(context.shape, context.dtype), solver.num_steps)
    x, dstate, xs = _relaxed_steps(den, params, solver, guided, scale, context, negative, remat, trajectory,
                                   noise, init_branches(den, spec, guided))
    return RelaxedOutput(x, dstate, xs)


def relaxed_rollout(den: Denoiser, params: RelaxedParams, noise: jax.Array, context: jax.Array, *, solver,
                    guidance: float | None = None, negative_context=None, remat: bool | str = "nested",
                    trajectory: bool = False) -> RelaxedOutput:
    """`relaxed_sample` for an AR rollout, differentiable: the chunk loop of `models.ar.rollout.rollout` (a
    `lax.scan` over chunks, each denoised with every solver step against the KV cache, then committed) for
    `den` = `relaxed_cache(chunk_denoiser(model, ...), rule)`. noise (B, F, H, W, C), F a multiple of the chunk
    length. remat as in `relaxed_sample` within each chunk; with remat each chunk is also checkpointed (the
    backward pass stores one carry, mainly the KV cache, per chunk). `trajectory`: the latents before every
    call, (chunks, steps, B, frames of a chunk, H, W, C)."""
    guided, negative, scale = _check_relaxed_run(den, noise, context, guidance, negative_context, remat)
    if den.commit is None:
        raise ValueError(f"relaxed_rollout needs a relaxed AR chunk denoiser (relaxed_cache(chunk_denoiser(model), "
                         f"rule)); {den.name!r} has no commit")
    cfg = den.config
    fpb = cfg.num_frame_per_block * cfg.patch_size[0]
    b, f = noise.shape[:2]
    if f % fpb:
        raise ValueError(f"noise has {f} latent frames; relaxed_rollout needs a multiple of the chunk length {fpb} "
                         "(num_frame_per_block x temporal patch)")
    chunks = noise.reshape(b, f // fpb, fpb, *noise.shape[2:]).swapaxes(0, 1)
    spec = DenoiseSpec(jax.ShapeDtypeStruct(chunks.shape[1:], noise.dtype),
                       jax.ShapeDtypeStruct(context.shape, context.dtype), solver.num_steps, f // fpb)

    def per_chunk(dstate, x_noise):
        x0, dstate, xs = _relaxed_steps(den, params, solver, guided, scale, context, negative, remat, trajectory,
                                        x_noise, dstate)
        if guided:
            dstate = CFGBranches(den.commit(params, dstate.cond, x0, context),
                                 den.commit(params, dstate.uncond, x0, negative))
        else:
            dstate = den.commit(params, dstate, x0, context)
        return dstate, (x0, xs)

    if remat:
        per_chunk = jax.checkpoint(per_chunk)
    dstate, (out, xs) = jax.lax.scan(per_chunk, init_branches(den, spec, guided), chunks)
    return RelaxedOutput(out.swapaxes(0, 1).reshape(noise.shape), dstate, xs if trajectory else None)


def _check_relaxed_run(den, noise, context, guidance, negative_context, remat):
    """Checks shared by the relaxed samplers; returns (guided, negative context, guidance scale)."""
    _rule_of(den)
    if remat not in REMATS:
        raise ValueError(f"remat={remat!r} is not allowed; choose one of {REMATS}")
    if getattr(noise, "ndim", None) != 5:
        raise ValueError(f"noise must be channels-last latents (B, F, H, W, C); got shape {jnp.shape(noise)}")
    guided, negative = check_guidance(guidance, context, negative_context, noise, False)
    return guided, negative, jnp.float32(guidance if guided else 1.0)


def _relaxed_steps(den, params, solver, guided, scale, context, negative, remat, trajectory, noise, dstate):
    """Every solver step from `noise` with denoiser state `dstate` (remat as `relaxed_sample`'s); returns
    (latents, dstate, latents before every step or None)."""
    n = solver.num_steps
    timesteps = jnp.asarray(solver.timesteps, jnp.float32)

    def step(carry, i):
        x, sstate, dstate = carry
        t = jnp.broadcast_to(timesteps[jnp.minimum(i, n - 1)], (x.shape[0],))
        v, dstate = guided_velocity(den, guided, params, dstate, x, t, context, negative, scale)
        x_next, sstate = solver.step(sstate, i, x, v)
        return (x_next, sstate, dstate), (x if trajectory else None)

    if remat:
        step = jax.checkpoint(step)
    carry = (noise, solver.init(noise), dstate)
    if remat == "nested":
        k = math.isqrt(n - 1) + 1
        segments = -(-n // k)

        def padded(c, i):       # the steps past n (padding to segments x k) leave the carry as it is
            return jax.lax.cond(i < n, step, lambda c, i: (c, c[0] if trajectory else None), c, i)

        @jax.checkpoint
        def segment(c, ids):
            return jax.lax.scan(padded, c, ids)

        ids = jnp.arange(segments * k, dtype=jnp.int32).reshape(segments, k)
        (x, _, dstate), xs = jax.lax.scan(segment, carry, ids)
        xs = None if not trajectory else xs.reshape(segments * k, *xs.shape[2:])[:n]
    else:
        (x, _, dstate), xs = jax.lax.scan(step, carry, jnp.arange(n, dtype=jnp.int32))
    return x, dstate, (xs if trajectory else None)


def compute_fraction(state, *, hard: bool = False) -> jax.Array:
    """Expected (or, with `hard`, counted) compute of a relaxed run as a fraction of the dense run's block
    stack passes, over every CFG branch; differentiable when not `hard`."""
    states = [_find(s) for s in branch_states(state)]
    total = sum((s.computed if hard else s.expected) for s in states)
    return total / float(sum(s.calls for s in states))


def gates_of(state) -> jax.Array:
    """(branches, calls) gate of every call (the conditional branch first)."""
    return jnp.stack([_find(s).gates for s in branch_states(state)])


def _find(state) -> RelaxedState:
    return find_state(state, RelaxedState, ": not a relaxed denoiser's state")


__all__ = ["MODES", "gate", "check_temperature", "check_budget", "RelaxedParams", "relaxed_params", "ThresholdRule",
           "NET_FEATURES", "policy_net_logits", "PolicyNetRule", "ScheduleRule", "LayerRule", "hard_schedule",
           "top_k_schedule", "resample_schedule", "Call", "RelaxedState", "relaxed_cache",
           "top_k_layers", "attention_share", "relaxed_layer_reuse", "soft_token_gates", "check_relaxed_params",
           "check_policy_shapes", "soft_block_mask",
           "block_weighted_attention", "RelaxedOutput", "REMATS", "relaxed_sample", "relaxed_rollout",
           "compute_fraction", "gates_of"]
