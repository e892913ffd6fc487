"""Train the shapes world's two tiny Wan models with flow matching (optax AdamW + EMA), resumably.

    python -m models.shapes.train t2v --steps 4000          # bidirectional text-to-video
    python -m models.shapes.train t2v --steps 5000 --cooldown 1500   # lr decays to 0 over the last 1500 steps
    python -m models.shapes.train ar  --steps 4000          # AR chunk model, diffusion forcing
    python -m models.shapes.train ar  --init-from models/shapes/checkpoints/t2v   # ... fine-tuned from t2v

Both use the real Wan code (`models.wan.WanTransformer`) at a tiny size (`shapes_config`). Batches are
rendered on the fly from train-split prompts; batch `s` is a pure function of `(seed, s)`, so a run
resumed from its last checkpoint sees exactly the batches an uninterrupted run would. The run folder
(default `runs/shapes/<name>`, not committed) holds the Orbax training state and `log.jsonl`; `--export`
(default `models/shapes/checkpoints/<name>`) receives the EMA weights as a `save_converted` folder plus
`training.json` (steps, wall time, machine), which is what `load_shapes_model(name)` reads.

Flow matching as in Wan: x_s = (1 - s) x0 + s eps, target velocity eps - x0, model time t = 1000 s. The
noise level s is drawn as u ~ U(0, 1) mapped through the sampling shift (s = 3u / (1 + 2u)), so training
sees noise levels in proportion to how the shift-3 samplers visit them. Text is dropped (all-zero context,
the empty prompt's embedding) with probability 0.1 so classifier-free guidance works.

Diffusion forcing (`ar`): every chunk of `num_frame_per_block` latent frames gets its own noise level
(per-frame `t`), attention is block-causal; with probability 0.5 a random number of leading chunks is
clean (t = 0, no loss), the situation of chunk-by-chunk rollout with a KV cache of finished chunks.
`--init-from` starts from another model's exported weights (same parameter shapes), as SkyReels-V2 DF and
CausVid start their causal models from a bidirectional one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import queue
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from models.shapes.latents import LATENT_CHANNELS, LATENT_FRAMES, TEXT_DIM, encode_prompts, encode_video
from models.shapes.prompts import sample_prompts
from models.shapes.render import render_batch
from models.wan.config import WanConfig
from models.wan.loader import restore_converted, save_converted
from models.wan.rope import axis_frequencies
from models.wan.transformer import init_transformer
from vidaccel.checks import bool_arg, choice_arg, float_arg, int_arg

MODEL_NAMES = ("t2v", "ar")
CHECKPOINT_ROOT = Path(__file__).parent / "checkpoints"
TRAIN_SHIFT = 3.0
CFG_DROPOUT = 0.1
CLEAN_PREFIX_PROB = 0.5


def shapes_config(name: str) -> WanConfig:
    """The tiny Wan of each shapes model: dim 128 (4 heads x 32), 4 layers, ffn 512, 24 latent channels."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown shapes model {name!r}; known: {MODEL_NAMES}")
    return WanConfig(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32,
                     in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=64,
                     ffn_dim=512, num_layers=4, num_frame_per_block=2 if name == "ar" else 1)


TEXT_INITS = ("wan", "xavier")
WIDTHS = (128, 192, 256)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str
    steps: int = 4000
    batch: int = 16
    lr: float = 6e-4
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999      # reached after a warm-up: decay_n = min(0.999, (1 + n) / (10 + n))
    seed: int = 0
    save_every: int = 250
    latent_frames: int = LATENT_FRAMES
    init_from: str | None = None  # an exported model folder whose weights start the run
    cooldown: int = 0             # the last `cooldown` steps decay the lr linearly to 0 (0: constant to the end)
    # diagnosis switches (issue 16); the defaults are how the committed models were trained
    shift: float = TRAIN_SHIFT    # noise levels s = shift u / (1 + (shift - 1) u); larger: more high-noise steps
    prompt_pool: int = 0          # 0: any train prompt; N: only the N of `sample_prompts(N, seed, "train")`
    decay_all: bool = True        # False: no weight decay on norms, biases, modulation tables and embeddings
    text_init: str = "wan"        # "wan": N(0, 0.02) text projection; "xavier": width-appropriate init
    heads: int = 4                # attention heads (head dim = dim / heads)
    dim: int = 128                # model width; the FFN is 4 x dim wide (the committed models: 128, FFN 512)
    rope_theta: float = 10000.0   # RoPE base of the model (Wan's value)
    video_pool: int = 0           # 0: a fresh render seed per video; N: render seeds 0..N-1 (with prompt_pool 1
                                  # and video_pool 1, every video is the same render)
    local_heads: int = 0          # self-attention heads per layer that start local (`local_attention_init`)

    def __post_init__(self):
        if self.cooldown and not 0 < self.cooldown <= self.steps - self.warmup:
            raise ValueError(f"cooldown={self.cooldown} is invalid; allowed: 0 (none) or 1 to steps minus the "
                             f"{self.warmup} warm-up steps ({self.steps - self.warmup})")
        float_arg("TrainConfig.shift", self.shift, low=0.0, low_open=True)
        int_arg("TrainConfig.prompt_pool", self.prompt_pool, minimum=0)
        choice_arg("TrainConfig.text_init", self.text_init, TEXT_INITS)
        choice_arg("TrainConfig.heads", self.heads, (1, 2, 4, 8))
        choice_arg("TrainConfig.dim", self.dim, WIDTHS)
        bool_arg("TrainConfig.decay_all", self.decay_all)
        float_arg("TrainConfig.rope_theta", self.rope_theta, low=1.0, low_open=True)
        int_arg("TrainConfig.video_pool", self.video_pool, minimum=0)
        int_arg("TrainConfig.local_heads", self.local_heads, minimum=0, maximum=self.heads)


def model_config(tc: TrainConfig) -> WanConfig:
    """The model a run trains: `shapes_config(tc.name)` with the run's width, heads and RoPE base."""
    base = shapes_config(tc.name)
    return base.replace(num_attention_heads=tc.heads, attention_head_dim=tc.dim // tc.heads, ffn_dim=4 * tc.dim,
                        rope_theta=float(tc.rope_theta))


def prompt_pool(tc: TrainConfig) -> list[str] | None:
    """The fixed training prompts of a `prompt_pool` run (None: the whole train split)."""
    return sample_prompts(tc.prompt_pool, tc.seed, "train") if tc.prompt_pool else None


def make_batch(tc: TrainConfig, step: int) -> dict[str, np.ndarray]:
    """Batch `step` of a run: clean latents, text context (some dropped), noise, noise levels; pure in (seed, step)."""
    rng = np.random.default_rng([tc.seed, step])
    prompt_seed = int(rng.integers(2**31))
    pool = prompt_pool(tc)
    if pool is None:
        prompts = sample_prompts(tc.batch, prompt_seed, "train", unique=False)
    else:
        prompts = [pool[i] for i in np.random.default_rng(prompt_seed).integers(len(pool), size=tc.batch)]
    seeds = rng.integers(2**31, size=tc.batch)
    if tc.video_pool:
        seeds = seeds % tc.video_pool
    video = render_batch(prompts, num_frames=2 * tc.latent_frames, seeds=seeds)
    x0 = encode_video(video)
    ctx = encode_prompts(prompts)
    ctx[rng.random(tc.batch) < CFG_DROPOUT] = 0.0
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    fpb = shapes_config(tc.name).num_frame_per_block
    chunks = tc.latent_frames // fpb
    u = rng.random((tc.batch, chunks if tc.name == "ar" else 1))
    sigma = (tc.shift * u / (1 + (tc.shift - 1) * u)).astype(np.float32)
    if tc.name == "ar":
        clean = rng.integers(1, chunks, size=tc.batch) * (rng.random(tc.batch) < CLEAN_PREFIX_PROB)
        sigma[np.arange(chunks)[None, :] < clean[:, None]] = 0.0
        sigma = np.repeat(sigma, fpb, axis=1)                         # per latent frame (B, F)
    return {"x0": x0, "context": ctx, "noise": noise, "sigma": sigma}


def _batches(tc: TrainConfig, start: int, stop: int):
    """Yield batches start..stop-1, rendered by a background thread a few steps ahead."""
    q: queue.Queue = queue.Queue(maxsize=4)

    def work():
        for s in range(start, stop):
            q.put(make_batch(tc, s))

    threading.Thread(target=work, daemon=True).start()
    for _ in range(start, stop):
        yield q.get()


def lr_schedule(tc: TrainConfig):
    """Linear warm-up to `lr`, constant, then (with `cooldown`) a linear decay to 0 over the last steps.

    The schedule is a function of the step alone, so a run resumed with a cooldown (e.g. the committed
    constant-lr state at step 3,500 continued with `--steps 5000 --cooldown 1500`) decays from where it stands.
    """
    parts, bounds = [optax.linear_schedule(0.0, tc.lr, tc.warmup), optax.constant_schedule(tc.lr)], [tc.warmup]
    if tc.cooldown:
        parts.append(optax.linear_schedule(tc.lr, 0.0, tc.cooldown))
        bounds.append(tc.steps - tc.cooldown)
    return optax.join_schedules(parts, bounds)


_EMBEDDINGS = ("patch_embedding", "text_embedder", "time_embedder")


def decay_mask(params):
    """True for the weights AdamW decays when `decay_all` is False: the kernels of attention, FFN and head.

    Norm gains, biases, modulation tables and the patch/text/time embeddings are left undecayed.
    """
    def keep(path, _):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return "kernel" in keys and not any(k in _EMBEDDINGS for k in keys)

    return jax.tree_util.tree_map_with_path(keep, params)


def optimizer(tc: TrainConfig):
    """AdamW with global-norm clipping on the run's lr schedule (decay masked by `decay_mask` unless `decay_all`)."""
    sched = lr_schedule(tc)
    mask = None if tc.decay_all else decay_mask
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=tc.weight_decay, mask=mask))


def init_model(tc: TrainConfig):
    """The run's freshly initialised model (`text_init="xavier"` re-draws the text projection)."""
    model = init_transformer(model_config(tc), seed=tc.seed)
    if tc.text_init == "xavier":
        rngs = nnx.Rngs(tc.seed + 1)
        init = nnx.initializers.xavier_uniform()
        for lin in (model.text_embedder.linear_1, model.text_embedder.linear_2):
            lin.kernel[...] = init(rngs.params(), lin.kernel.shape, lin.kernel.dtype)
    if tc.local_heads:
        local_attention_init(model, tc.local_heads)
    return model


# A rotary pair takes part in the local init if it turns by at least this many radians per token.
LOCAL_MIN_FREQ = 0.1
# Bias amplitude on each such pair of q and k: RMSNorm then leaves a logit contrast of several nats between a
# token and its neighbours two tokens away (measured by `experiments.shapes_coupling`'s `local`).
LOCAL_BIAS = 6.0


def local_attention_init(model, heads: int) -> None:
    """Make the first `heads` self-attention heads of every layer attend locally at initialisation.

    The q and k biases of such a head get amplitude `LOCAL_BIAS` on the first element of every rotary pair that
    turns by at least `LOCAL_MIN_FREQ` rad per token. After RoPE, q_i . k_j then holds
    sum_p b^2 cos(w_p (pos_i - pos_j)): a bump at offset 0 in time, height and width, whatever the input, so
    neighbouring tokens exchange information from step 0 (the content term, xavier-initialised, rides on top
    and training moves both). A ViT-style transformer without such a prior learns locality slowly; this is
    the RoPE analogue of the positional "mimetic" or convolution-like inits for attention.
    """
    cfg = model.cfg
    hd = cfg.attention_head_dim
    on = np.concatenate(axis_frequencies(hd, float(cfg.rope_theta))) >= LOCAL_MIN_FREQ   # (hd // 2,) rotary pairs
    head_bias = np.zeros((hd // 2, 2), np.float32)
    head_bias[on, 0] = LOCAL_BIAS
    bias = np.zeros((cfg.num_attention_heads, hd), np.float32)
    bias[:heads] = head_bias.reshape(-1)
    # q/k RMSNorm runs across heads, so the biases raise the rms that every head is divided by; the other heads'
    # gains are raised by the same factor (content entries have rms ~1 under xavier), so their logits keep
    # the spread they have without the local init.
    restore = np.sqrt(1.0 + heads * int(on.sum()) * LOCAL_BIAS**2 / cfg.dim)
    gain = np.ones((cfg.num_attention_heads, hd), np.float32)
    gain[heads:] = restore
    attn = model.layers.attn1                                       # blocks stacked on a leading layer axis
    for lin in (attn.to_q, attn.to_k):
        lin.bias[...] = jnp.broadcast_to(jnp.asarray(bias.reshape(-1), lin.bias.dtype), lin.bias.shape)
    for norm in (attn.norm_q, attn.norm_k):
        norm.weight[...] = jnp.broadcast_to(jnp.asarray(gain.reshape(-1), norm.weight.dtype), norm.weight.shape)


def make_train_step(graphdef, tc: TrainConfig):
    opt = optimizer(tc)

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        x0, noise, sigma = batch["x0"], batch["noise"], batch["sigma"]
        s = sigma[:, :, None, None, None] if sigma.shape[1] > 1 else sigma[:, :1, None, None, None]
        xt = (1 - s) * x0 + s * noise
        t = sigma * 1000.0 if sigma.shape[1] > 1 else sigma[:, 0] * 1000.0
        v = model(xt, t, batch["context"])
        err = jnp.mean((v - (noise - x0)) ** 2, axis=(2, 3, 4))         # (B, F)
        weight = (jnp.broadcast_to(s[:, :, 0, 0, 0], err.shape) > 0).astype(err.dtype)
        return jnp.sum(err * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    @jax.jit
    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        n = state["step"].astype(jnp.float32)
        decay = jnp.minimum(tc.ema_decay, (1 + n) / (10 + n))         # warm-up so early weights fade fast
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
        return {"params": params, "ema": ema, "opt": opt_state, "step": state["step"] + 1}, loss

    return opt, step


def train(tc: TrainConfig, run_dir: Path, export_dir: Path, log_every: int = 25) -> dict:
    cfg = model_config(tc)
    model = init_model(tc)
    if tc.init_from is not None:
        _load_weights_into(model, Path(tc.init_from))
    graphdef, params = nnx.split(model, nnx.Param)
    opt, step_fn = make_train_step(graphdef, tc)
    state = {"params": params, "ema": params, "opt": opt.init(params), "step": jnp.zeros((), jnp.int32)}
    run_dir = run_dir.absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2))
    mngr = ocp.CheckpointManager(run_dir / "state", options=ocp.CheckpointManagerOptions(max_to_keep=2))
    meta_path = run_dir / "wall.json"
    wall_before = 0.0
    if mngr.latest_step() is not None:
        state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(jax.eval_shape(lambda: state)))
        wall_before = json.loads(meta_path.read_text())["train_seconds"] if meta_path.exists() else 0.0
        print(f"resumed {tc.name} at step {int(state['step'])}", flush=True)
    start = int(state["step"])
    t0, losses = time.time(), []
    with (run_dir / "log.jsonl").open("a") as log:
        for s, batch in zip(range(start, tc.steps), _batches(tc, start, tc.steps)):
            state, loss = step_fn(state, batch)
            losses.append(loss)
            done = s + 1
            if done % log_every == 0 or done == tc.steps:
                mean = float(np.mean(jax.device_get(losses)))
                losses = []
                wall = wall_before + time.time() - t0
                rec = {"step": done, "loss": mean, "train_seconds": round(wall, 1)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(f"{tc.name} step {done}/{tc.steps} loss {mean:.4f} {wall / 60:.1f} min", flush=True)
            if done % tc.save_every == 0 or done == tc.steps:
                mngr.save(done, args=ocp.args.StandardSave(state))
                mngr.wait_until_finished()
                wall = wall_before + time.time() - t0
                meta_path.write_text(json.dumps({"train_seconds": wall}))
                export(tc, cfg, graphdef, state, export_dir, wall)
    mngr.close()
    return {"steps": int(state["step"])}


def _load_weights_into(model, folder: Path) -> None:
    """Copy the parameters of the exported model at `folder` into `model` (every shape must match)."""
    src = nnx.state(restore_converted(folder), nnx.Param)
    dst = nnx.state(model, nnx.Param)
    src_shapes = jax.tree.map(lambda a: a.shape, src)
    dst_shapes = jax.tree.map(lambda a: a.shape, dst)
    if src_shapes != dst_shapes:
        raise ValueError(f"--init-from {folder}: its parameter shapes differ from the {model.cfg} model's")
    nnx.update(model, src)


def export(tc: TrainConfig, cfg: WanConfig, graphdef, state, export_dir: Path, wall: float) -> None:
    """Write the EMA weights (`save_converted` layout) and how they were trained to `export_dir`."""
    model = nnx.merge(graphdef, state["ema"])
    save_converted(model, export_dir)
    info = {"name": tc.name, "steps": int(state["step"]), "train_seconds": round(wall, 1),
            "seconds_per_step": round(wall / max(int(state["step"]), 1), 3), "machine": _machine(),
            "train_config": dataclasses.asdict(tc)}
    (Path(export_dir) / "training.json").write_text(json.dumps(info, indent=2))


def _machine() -> str:
    devs = jax.devices()
    cores = len(os.sched_getaffinity(0))
    return f"{platform.machine()} {devs[0].platform} x{len(devs)}, {cores} cores, jax {jax.__version__}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.shapes.train", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=MODEL_NAMES)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--cooldown", type=int, default=0,
                   help="decay the lr linearly to 0 over the last N steps (default: constant lr to the end)")
    p.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    p.add_argument("--run-dir", type=Path, default=None, help="default runs/shapes/<name>")
    p.add_argument("--export", type=Path, default=None, help="default models/shapes/checkpoints/<name>")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from the weights of an exported model folder (e.g. the t2v model for ar)")
    a = p.parse_args(argv)
    for flag, v in (("--steps", a.steps), ("--batch", a.batch), ("--save-every", a.save_every)):
        if v < 1:
            p.error(f"{flag}={v} must be >= 1")
    if a.init_from is not None and not (a.init_from / "wan_config.json").exists():
        p.error(f"--init-from {a.init_from}: not an exported model folder (no wan_config.json)")
    try:
        tc = TrainConfig(a.name, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, save_every=a.save_every,
                         init_from=None if a.init_from is None else str(a.init_from), cooldown=a.cooldown)
    except ValueError as e:
        p.error(f"--{e}")
    train(tc, a.run_dir or Path("runs/shapes") / a.name, a.export or CHECKPOINT_ROOT / a.name)


if __name__ == "__main__":
    main()
