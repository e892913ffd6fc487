"""Per-layer attention reuse learned under a compute budget: the per-layer schedules of the cache-policy studies.

    python -m experiments.cache_policy.layers [--budgets 0.9 0.8] [--iters 6]
    -> results/cache_policy/layers.{json,md}

`relaxed_layer_reuse` gates each layer's self-attention per call (the layer reuses its last computed attention
output, as PAB does); a call then costs (1 - share) + share x (computed layers / layers) block-stack passes,
share = `attention_share` (the attention core's FLOP share of a block pass, 0.36 for the shapes model), so a
budget B lies in [1 - share + share / calls, 1]. The policy is one logit per (call, layer), learned on the
training prompts with the shared protocol (`study.learn_under_budget`) from the uniform schedule; its hard
version computes the top-k (call, layer) attentions that spend exactly B (`top_k_layers`). On held-out prompts,
with hard decisions, it is compared at equal compute with that uniform layer schedule (every layer computed at
the same evenly spaced calls) and with TeaCache calibrated to B (whole block-stack reuse). Compute is counted
in block-stack passes per call: TeaCache's from the transforms' counters, the layer schedules' from the relaxed
denoiser's hard counter (`compute_fraction(hard=True)`), the same unit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cache_policy.study import (
    BUDGET_TOLERANCE,
    LEARNING_RATES,
    calibrate,
    evaluate,
    evaluate_teacache,
    learn_under_budget,
    make_setup,
    rel_mse,
    relaxed_run,
    teacache_rule,
)
from experiments.harness import machine, markdown_table, write_results
from vidaccel.checks import int_arg
from vidaccel.relaxed import (
    LayerRule,
    RelaxedParams,
    attention_share,
    check_budget,
    compute_fraction,
    relaxed_layer_reuse,
    relaxed_params,
    top_k_layers,
)

OUT = Path("results/cache_policy")


def setup_share(setup) -> float:
    """The attention core's share of one block-stack pass at the setup's token and text lengths."""
    cfg = setup.model.cfg
    _, f, h, w, _ = setup.train.noise.shape
    pt, ph, pw = cfg.patch_size
    return attention_share(cfg, (f // pt) * (h // ph) * (w // pw), setup.train.context.shape[1])


def uniform_layers(rule: LayerRule, budget: float, share: float) -> dict:
    """Every layer computed at the same evenly spaced calls (the first included), as +-1 logits, spending the
    budget as closely as whole calls allow (`top_k_layers` of a call-ranked policy)."""
    per_call = np.zeros(rule.calls)
    m = max(1, round((budget - (1.0 - share)) / share * rule.calls))
    per_call[np.unique(np.round(np.linspace(0, rule.calls - 1, m)).astype(int))] = 1.0
    ranked = {"logits": jnp.asarray(np.repeat(per_call[:, None], rule.layers, axis=1), jnp.float32)}
    return top_k_layers(rule, ranked, budget, share)


def learn_layers(setup, budget: float, *, iters: int = 6, lr: float = LEARNING_RATES["schedule"],
                 temperature: float = 1.0, final_temperature: float = 0.05, log=print) -> dict:
    """A (calls, layers) reuse schedule learned on the training prompts under `budget` (from `uniform_layers`)."""
    budget = check_budget(budget)
    share = setup_share(setup)
    rule = LayerRule(setup.calls, setup.model.cfg.num_layers)
    den = relaxed_layer_reuse(setup.base, rule, mode="soft")
    den_hard = relaxed_layer_reuse(setup.base, rule, mode="hard")
    dense = setup.train.dense

    def objective(policy, lam, temp):
        out = relaxed_run(setup, den, RelaxedParams(den.params.model, policy, temp, rule))
        err, frac = rel_mse(out.latents, dense), compute_fraction(out.state)
        return jnp.log(err) + lam * (frac - budget), (err, frac)

    hard_fn = jax.jit(lambda p: relaxed_run(setup, den_hard, RelaxedParams(den.params.model, p, jnp.float32(1.0),
                                                                             rule)))

    def hard_eval(policy):
        out = hard_fn(top_k_layers(rule, policy, budget, share))
        return float(rel_mse(out.latents, dense)), float(compute_fraction(out.state, hard=True)), {}

    start = uniform_layers(rule, budget, share)
    best, best_iter, history, seconds = learn_under_budget(
        objective, hard_eval, start, budget, iters=iters, lr=lr, temperature=temperature,
        final_temperature=final_temperature, label="layers", log=log)
    return {"rule": rule, "den_hard": den_hard, "share": share, "start": start, "history": history,
            "best_iter": best_iter, "seconds": seconds,
            "policy": top_k_layers(rule, best, budget, share)}


def run_layers(out: Path = OUT, *, budgets=(0.9, 0.8), steps: int = 20, train_prompts: int = 2,
               heldout_prompts: int = 4, iters: int = 6, log=print) -> dict:
    """The study (module docstring); writes <out>/layers.{json,md} and returns the report."""
    budgets = [check_budget(b) for b in budgets]
    t0 = time.perf_counter()
    setup = make_setup(steps=steps, train_prompts=train_prompts, heldout_prompts=heldout_prompts)
    cal = calibrate(setup, log=log)
    rows, learned = [], {}
    for b in budgets:
        res = learn_layers(setup, b, iters=iters, log=log)
        learned[str(b)] = {"history": res["history"], "best_iter": res["best_iter"], "seconds": res["seconds"],
                           "schedule": (np.asarray(res["policy"]["logits"]) > 0).astype(int).tolist()}
        den = res["den_hard"]
        for name, policy in (("uniform layer schedule", res["start"]), ("learned layer schedule", res["policy"])):
            ev = evaluate(setup, den, relaxed_params(den, policy))
            rows.append({"method": name, "budget": b, "compute": ev["relaxed_compute"], **_fid(ev)})
        cfg, _ = teacache_rule(cal, b)
        ev = evaluate_teacache(setup, cfg)
        rows.append({"method": "TeaCache (calibrated)", "budget": b, "compute": ev["compute"], **_fid(ev)})
        for r in rows[-3:]:
            r["holds"] = bool(abs(r["compute"] - b) <= BUDGET_TOLERANCE)
            log(f"  B={b:.2f} {r['method']:<24} compute {r['compute']:.3f} PSNR {r['psnr']:.2f}")
    report = {"steps": steps, "guidance": setup.guidance, "share": setup_share(setup), "budgets": budgets,
              "iters": iters, "train_prompts": setup.train.prompts, "heldout_prompts": setup.heldout.prompts,
              "rows": rows, "learned": learned, "tolerance": BUDGET_TOLERANCE, "machine": machine(),
              "seconds": round(time.perf_counter() - t0, 1)}
    write_results(out, "layers", report, _markdown(report))
    return report


def _fid(ev: dict) -> dict:
    return {"psnr": round(ev["psnr"], 2), "ssim": round(ev["ssim"], 4), "rel_mse": ev["rel_mse"]}


def _markdown(r: dict) -> str:
    lines = ["# Per-layer attention reuse learned under a budget (shapes t2v, held-out prompts, hard decisions)", "",
             f"UniPC {r['steps']} steps, CFG {r['guidance']}; {len(r['train_prompts'])} training and "
             f"{len(r['heldout_prompts'])} held-out prompts; {r['iters']} updates per budget "
             "(`experiments.cache_policy.study.learn_under_budget`). Compute in block-stack passes per call; the "
             f"attention core is {r['share']:.3f} of a pass. Command: `python -m experiments.cache_policy.layers` "
             f"({r['seconds']:.0f} s on {r['machine']}).", "",
             markdown_table(r["rows"], {"method": "method", "budget": "budget",
                                        "compute": lambda x: f"{x['compute']:.3f}",
                                        "holds": lambda x: "yes" if x["holds"] else "no",
                                        "PSNR": "psnr", "SSIM": "ssim",
                                        "rel. MSE": lambda x: f"{x['rel_mse']:.2e}"}), "",
             "Hard training error (rel. MSE) per iterate: "]
    for b, ent in r["learned"].items():
        hist = ", ".join(f"{h['hard_rel_mse']:.3e}" + ("" if h["admissible"] else "*") for h in ent["history"])
        lines.append(f"- B={b}: {hist} (kept iterate {ent['best_iter']}; * outside the budget)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.cache_policy.layers", description=__doc__.split("\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--train-prompts", type=int, default=2)
    p.add_argument("--heldout-prompts", type=int, default=4)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    try:
        for b in a.budgets:
            check_budget(b)
        int_arg("--iters", a.iters, minimum=0)
        int_arg("--train-prompts", a.train_prompts, minimum=1)
        int_arg("--heldout-prompts", a.heldout_prompts, minimum=1)
    except ValueError as err:
        p.error(str(err))
    run_layers(a.out, budgets=a.budgets, steps=a.steps, train_prompts=a.train_prompts,
               heldout_prompts=a.heldout_prompts, iters=a.iters)


if __name__ == "__main__":
    main()
