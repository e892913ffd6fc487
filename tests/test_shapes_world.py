"""The shapes world: grammar, sampler and splits, renderer, latent map and prompt encoder."""

import dataclasses
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models.shapes as S
from models.shapes.latents import _word_vector
from models.shapes.render import FREE_FRACTION, centroid_offset, coverage

PROMPT_3 = ("a small red circle moving up-left slowly and a large blue square moving right quickly and "
            "a small yellow triangle moving down steadily on a gray background")


# ----------------------------------------------------------------------------- grammar and parser

def test_parse_round_trip_on_sampled_prompts():
    for split in S.prompts.SPLITS:
        for p in S.sample_prompts(200, seed=3, split=split):
            scene = S.parse_prompt(p)
            assert scene.prompt == p
            assert S.parse_prompt(scene.prompt) == scene


def test_parse_structure():
    scene = S.parse_prompt("  A Small RED circle moving up-left slowly and a large blue square moving right "
                           "quickly and a small yellow triangle moving down steadily on a gray background ")
    assert scene.background == "gray"
    assert [o.color for o in scene.objects] == ["red", "blue", "yellow"]
    assert scene.objects[0] == S.SceneObject("small", "red", "circle", "up-left", "slowly")
    assert scene.objects[1].velocity == (2.0, 0.0)
    vx, vy = scene.objects[0].velocity
    assert math.isclose(vx, -0.5 / math.sqrt(2)) and math.isclose(vy, -0.5 / math.sqrt(2))
    assert scene.objects[2].half_extent == S.SIZES["small"] and scene.objects[1].rgb == S.COLORS["blue"]


@pytest.mark.parametrize("bad, fragment", [
    ("a small red blob moving up slowly on a gray background", "'blob'"),
    ("a small red circle moving up slowly on a purple background", "'purple'"),
    ("a small red circle moving up slowly", "<end of prompt>"),
    ("a small red circle moving up slowly on a gray background please", "please"),
    ("small red circle moving up slowly on a gray background", "'small'"),
    ("", "<end of prompt>"),
])
def test_parse_errors_name_the_word(bad, fragment):
    with pytest.raises(ValueError, match="cannot parse prompt") as e:
        S.parse_prompt(bad)
    assert fragment in str(e.value)


def test_parse_errors_show_the_grammar_and_a_valid_example():
    bad = "a small red circle moving up on a gray background"               # in vocabulary, no speed word
    with pytest.raises(ValueError) as e:
        S.parse_prompt(bad)
    msg = str(e.value)
    want = f"cannot parse prompt {bad!r}: word 6 is 'on', expected a speed word ['quickly', 'slowly', 'steadily']"
    assert msg.startswith(want)
    assert S.prompts.GRAMMAR in msg and f"e.g. {S.prompts.EXAMPLE_PROMPT!r}" in msg
    assert S.parse_prompt(S.prompts.EXAMPLE_PROMPT).prompt == S.prompts.EXAMPLE_PROMPT


def test_check_prompts():
    assert S.check_prompts(PROMPT_3) == [PROMPT_3]                              # one str is one prompt
    assert S.check_prompts(p for p in [PROMPT_3, PROMPT_3]) == [PROMPT_3, PROMPT_3]
    with pytest.raises(ValueError, match=r"no prompts given; pass at least one, e.g. \['a small red circle"):
        S.check_prompts([])
    cases = [("a small red circle moving up on a gray background", "cannot parse prompt", "expected a speed word"),
             ("", "cannot parse prompt ''", "word 0 is '<end of prompt>'"),
             ("red circle", "cannot parse prompt 'red circle'", "expected 'a'"),
             ("a small red circle moving up slowly and a large red square moving left slowly on a black background",
              "invalid prompt", "distinct colours")]
    for bad, what, why in cases:
        with pytest.raises(ValueError) as e:
            S.check_prompts([PROMPT_3, bad])
        msg = str(e.value)
        assert msg.startswith(f"prompts[1]: {what}") and why in msg and S.prompts.GRAMMAR in msg
    with pytest.raises(TypeError, match=r"prompts\[0\]: parse_prompt expects a str, got int"):
        S.check_prompts([3])
    with pytest.raises(TypeError, match="prompts must be a str or a list of str, got int"):
        S.check_prompts(3)


def test_evaluation_training_and_docs_prompts_follow_the_grammar():
    S.check_prompts(S.sample_prompts(64, seed=0, split="heldout"))             # the evaluation set
    S.check_prompts(S.sample_prompts(500, seed=1, unique=False))               # what train.make_batch draws
    root = Path(__file__).parent.parent
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    quoted = [q for f in docs for q in re.findall(r"[\"'](a (?:small|large) [a-z -]+?)[\"']", f.read_text())]
    assert any("moving right slowly on a black background" in q for q in quoted)  # docs/shapes_models.md's
    S.check_prompts(quoted)


def test_parse_rejects_repeated_colour_and_too_many_objects():
    with pytest.raises(ValueError, match="distinct colours"):
        S.parse_prompt("a small red circle moving up slowly and a large red square moving left slowly "
                       "on a black background")
    four = " and ".join(f"a small {c} circle moving up slowly" for c in ["red", "green", "blue", "cyan"])
    with pytest.raises(ValueError, match="4 objects; allowed: 1 to 3"):
        S.parse_prompt(four + " on a black background")
    with pytest.raises(TypeError, match="expects a str"):
        S.parse_prompt(3)


def test_scene_validation_names_field():
    with pytest.raises(ValueError, match=r"SceneObject.shape='hexagon'.*allowed"):
        S.SceneObject("small", "red", "hexagon", "up", "slowly")
    with pytest.raises(ValueError, match=r"Scene.background='pink'"):
        S.Scene((S.SceneObject("small", "red", "circle", "up", "slowly"),), "pink")
    with pytest.raises(ValueError, match="0 objects"):
        S.Scene((), "black")
    with pytest.raises(TypeError, match="tuple of SceneObject"):
        S.Scene(("a small red circle",), "black")
    scene = S.parse_prompt(PROMPT_3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scene.background = "white"


def test_vocabulary_sizes():
    assert (len(S.COLORS), len(S.SHAPES), len(S.SIZES), len(S.DIRECTIONS), len(S.SPEEDS), len(S.BACKGROUNDS)) \
        == (6, 4, 2, 8, 3, 4)
    assert len(set(S.VOCABULARY)) == len(S.VOCABULARY) == 27
    assert not set(S.VOCABULARY) & set(S.FUNCTION_WORDS)
    for ux, uy in S.DIRECTIONS.values():
        assert math.isclose(math.hypot(ux, uy), 1.0)


# ----------------------------------------------------------------------------- sampler and splits

def test_sampler_is_deterministic_distinct_and_in_split():
    a = S.sample_prompts(300, seed=11)
    assert a == S.sample_prompts(300, seed=11)
    assert a != S.sample_prompts(300, seed=12)
    assert len(set(a)) == 300
    assert all(S.prompt_split(p) == "train" for p in a)
    h = S.sample_prompts(64, seed=0, split="heldout")
    assert len(set(h)) == 64 and all(S.prompt_split(p) == "heldout" for p in h)


def test_heldout_disjoint_from_train_across_seeds():
    heldout = set(S.sample_prompts(64, seed=0, split="heldout"))
    train = set()
    for seed in range(5):
        train |= set(S.sample_prompts(400, seed=seed))
    assert not heldout & train
    # the split is a property of the scene, not of the object order in its prompt
    for p in heldout:
        scene = S.parse_prompt(p)
        reordered = S.Scene(tuple(reversed(scene.objects)), scene.background).prompt
        assert S.prompt_split(reordered) == "heldout"


def test_sampler_covers_the_vocabulary_and_heldout_fraction():
    prompts = S.sample_prompts(1500, seed=5)
    words = {w for p in prompts for w in p.split()}
    assert set(S.VOCABULARY) <= words
    counts = np.bincount([len(S.parse_prompt(p).objects) for p in prompts], minlength=4)
    assert counts[0] == 0 and min(counts[1:]) > 350
    assert S.sample_prompts(50, seed=1, max_objects=1) and all(
        len(S.parse_prompt(p).objects) == 1 for p in S.sample_prompts(50, seed=1, max_objects=1))
    rng = np.random.default_rng(0)
    frac = np.mean([S.prompt_split(S.sample_scene(rng)) == "heldout" for _ in range(2000)])
    assert abs(frac - S.prompts.HELDOUT_PERCENT / 100) < 0.02


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=-1, seed=0), "n=-1"),
    (dict(n=2.5, seed=0), "n=2.5"),
    (dict(n=3, seed=0, split="test"), "split='test'"),
    (dict(n=3, seed=0, max_objects=4), "max_objects=4"),
])
def test_sampler_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.sample_prompts(**kwargs)


# ----------------------------------------------------------------------------- renderer

def _reflect_reference(p0: float, v: float, lo: float, hi: float, n: int) -> np.ndarray:
    """Step-by-step elastic bounce, independent of render.fold."""
    out, p = [p0], p0
    for _ in range(n - 1):
        p += v
        while p > hi or p < lo:
            if p > hi:
                p, v = 2 * hi - p, -v
            if p < lo:
                p, v = 2 * lo - p, -v
        out.append(p)
    return np.array(out)


def test_trajectories_bounce_stay_inside_and_start_free():
    for i, p in enumerate(S.sample_prompts(40, seed=2)):
        scene = S.parse_prompt(p)
        paths = S.trajectories(p, num_frames=24, seed=i)
        assert paths.shape == (len(scene.objects), 24, 2)
        for obj, path in zip(scene.objects, paths):
            h = obj.half_extent
            assert path.min() >= h - 1e-9 and path.max() <= 32 - h + 1e-9
            for axis, v in enumerate(obj.velocity):
                ref = _reflect_reference(path[0, axis], v, h, 32 - h, 24)
                np.testing.assert_allclose(path[:, axis], ref, atol=1e-9)
                # no bounce in the first FREE_FRACTION of the video: steps equal v exactly
                free = int(FREE_FRACTION * 23)
                np.testing.assert_allclose(np.diff(path[: free + 1, axis]), v, atol=1e-9)


def test_render_is_deterministic_and_seeded():
    v = S.render(PROMPT_3, seed=4)
    assert v.shape == (S.VIDEO_FRAMES, 32, 32, 3) and v.dtype == np.uint8
    np.testing.assert_array_equal(v, S.render(S.parse_prompt(PROMPT_3), seed=4))
    assert not np.array_equal(v, S.render(PROMPT_3, seed=5))
    assert S.render(PROMPT_3, num_frames=5, size=48, seed=4).shape == (5, 48, 48, 3)
    batch = S.render_batch([PROMPT_3, PROMPT_3], seeds=[4, 5])
    np.testing.assert_array_equal(batch[0], v)


def test_render_pixels_background_and_objects():
    """Uncovered pixels are exactly the background; fully covered pixels of the top object its colour."""
    for i, p in enumerate(S.sample_prompts(20, seed=8)):
        scene = S.parse_prompt(p)
        v = S.render(scene, seed=i)
        paths = S.trajectories(scene, seed=i)
        cov = np.stack([coverage(o.shape, o.half_extent, path[:, 0], path[:, 1])
                        for o, path in zip(scene.objects, paths)])  # (n, T, 32, 32)
        empty = cov.sum(0) == 0
        assert np.all(v[empty] == S.BACKGROUNDS[scene.background])
        top = cov[-1] == 1.0
        assert top.sum() > 0 and np.all(v[top] == scene.objects[-1].rgb)
        # the background is static where no object ever passes, and that is most of the frame
        never = np.all(empty, axis=0)
        assert never.mean() > 0.3 and np.all(v[:, never] == v[:1, never])


@pytest.mark.parametrize("shape, area", [("square", 4.0), ("circle", math.pi), ("diamond", 2.0),
                                         ("triangle", 2.0)])
def test_coverage_area_and_centroid(shape, area):
    """Coverage converges to the exact area and centroid; the default 4x4 supersampling is within 5 %."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    for h in S.SIZES.values():
        cx, cy = rng.uniform(12, 20, size=2)
        ox, oy = centroid_offset(shape, h)
        for ss, rel_area, tol_c in ((32, 0.005, 0.03), (4, 0.05, 0.15)):
            c = coverage(shape, h, cx, cy, supersample=ss)
            assert abs(c.sum() - area * h * h) < rel_area * area * h * h
            assert abs((c * xs).sum() / c.sum() - cx - ox) < tol_c
            assert abs((c * ys).sum() / c.sum() - cy - oy) < tol_c


def test_render_errors():
    with pytest.raises(ValueError, match="num_frames=0"):
        S.render(PROMPT_3, num_frames=0)
    with pytest.raises(ValueError, match="size=8"):
        S.render(PROMPT_3, size=8)
    with pytest.raises(ValueError, match="cannot parse"):
        S.render("a red thing")
    with pytest.raises(TypeError, match="Scene or a prompt str"):
        S.render(42)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        S.render_batch([PROMPT_3, PROMPT_3], seeds=[0])


# ----------------------------------------------------------------------------- latent map

def test_latent_constants():
    assert (S.VIDEO_FRAMES, S.VIDEO_SIZE) == (16, 32)
    assert S.LATENT_FRAMES * S.TEMPORAL_GROUP == S.VIDEO_FRAMES == 16
    assert S.LATENT_SIZE * S.SPATIAL_GROUP == S.VIDEO_SIZE
    assert S.LATENT_CHANNELS == 3 * S.TEMPORAL_GROUP * S.SPATIAL_GROUP**2 == 24
    assert (S.LATENT_SIZE // 2) ** 2 == 64  # tokens per latent frame with patch (1, 2, 2)


def test_latent_round_trip_exact_and_layout():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(2, 16, 32, 32, 3), dtype=np.uint8)
    z = S.encode_video(video)
    assert z.shape == (2, S.LATENT_FRAMES, S.LATENT_SIZE, S.LATENT_SIZE, S.LATENT_CHANNELS)
    assert z.dtype == np.float32
    np.testing.assert_array_equal(S.decode_latents(z, uint8=True), video)
    np.testing.assert_array_equal(S.encode_video(video[1]), z[1])  # unbatched works the same
    np.testing.assert_allclose(S.encode_video(video.astype(np.float32) / 255.0), z, atol=1e-6)
    # channel c = ((dt * 2 + dy) * 2 + dx) * 3 + rgb of pixel (2f + dt, 2i + dy, 2j + dx)
    for _ in range(50):
        b, f, i, j = rng.integers(2), rng.integers(8), rng.integers(16), rng.integers(16)
        dt, dy, dx, c = rng.integers(2), rng.integers(2), rng.integers(2), rng.integers(3)
        ch = ((dt * 2 + dy) * 2 + dx) * 3 + c
        want = (video[b, 2 * f + dt, 2 * i + dy, 2 * j + dx, c] / 255.0 - S.PIXEL_MEAN[c]) / S.PIXEL_STD[c]
        assert abs(z[b, f, i, j, ch] - want) < 1e-5
    # other even sizes and frame counts
    v2 = rng.integers(0, 256, size=(6, 12, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(S.decode_latents(S.encode_video(v2), uint8=True), v2)


def test_decode_is_unclipped_until_uint8():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3.0, size=(1, 8, 16, 16, 24)).astype(np.float32)
    x = S.decode_latents(z)
    assert x.dtype == np.float32 and x.min() < -0.5 and x.max() > 1.5
    np.testing.assert_allclose(S.encode_video(x), z, rtol=1e-5, atol=1e-5)  # exact inverse on floats too
    u = S.decode_latents(z, uint8=True)
    np.testing.assert_array_equal(u, np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))


def test_latent_map_under_jit_matches_numpy():
    rng = np.random.default_rng(2)
    video = rng.integers(0, 256, size=(1, 16, 32, 32, 3), dtype=np.uint8)
    zj = jax.jit(S.encode_video)(jnp.asarray(video))
    assert isinstance(zj, jax.Array)
    np.testing.assert_allclose(np.asarray(zj), S.encode_video(video), atol=1e-6)
    back = jax.jit(lambda z: S.decode_latents(z, uint8=True))(zj)
    np.testing.assert_array_equal(np.asarray(back), video)


@pytest.fixture(scope="module")
def train_videos():
    prompts = S.sample_prompts(256, seed=1)
    return S.render_batch(prompts, seeds=range(1000, 1256))


def test_latents_are_normalised_over_training_renders(train_videos):
    z = S.encode_video(train_videos).reshape(-1, S.LATENT_CHANNELS)
    assert np.all(np.abs(z.mean(0)) < 0.25), z.mean(0)
    assert np.all(np.abs(z.std(0) - 1.0) < 0.15), z.std(0)


def test_measure_pixel_stats_matches_its_recipe():
    mean, std = S.measure_pixel_stats(12, seed=3)
    prompts = S.sample_prompts(12, 3)
    x = np.stack([S.render(p, seed=3 * 100_003 + i) for i, p in enumerate(prompts)]) / 255.0
    np.testing.assert_allclose(mean, x.reshape(-1, 3).mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, x.reshape(-1, 3).std(0), rtol=1e-12)


def test_latent_map_errors():
    v = np.zeros((16, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\(\.\.\., T, H, W, 3\)"):
        S.encode_video(v[..., :2])
    with pytest.raises(ValueError, match="multiple of 2"):
        S.encode_video(v[:15])
    with pytest.raises(ValueError, match="multiple of 2"):
        S.encode_video(v[:, :31])
    with pytest.raises(TypeError, match="dtype int32"):
        S.encode_video(v.astype(np.int32))
    with pytest.raises(TypeError, match="numpy or JAX array"):
        S.encode_video(v.tolist())
    with pytest.raises(ValueError, match=r"\(\.\.\., F, H, W, 24\)"):
        S.decode_latents(np.zeros((8, 16, 16, 16), np.float32))
    with pytest.raises(TypeError, match="float dtype"):
        S.decode_latents(np.zeros((8, 16, 16, 24), np.int32))


# ----------------------------------------------------------------------------- prompt encoder

def _sinusoid(i: int, dim: int) -> np.ndarray:
    k = np.arange(dim) // 2
    ang = i / 10000.0 ** (2.0 * k / dim)
    return np.where(np.arange(dim) % 2 == 0, np.sin(ang), np.cos(ang))


def test_encode_prompts_shape_padding_and_positions():
    prompts = [PROMPT_3, "a large red circle moving up slowly on a navy background", "", "   "]
    e = S.encode_prompts(prompts)
    assert e.shape == (4, S.TEXT_LEN, S.TEXT_DIM) == (4, 16, 32) and e.dtype == np.float32
    np.testing.assert_array_equal(e, S.encode_prompts(prompts))  # deterministic
    assert len(S.prompt_tokens(PROMPT_3)) == 16 and np.all(np.any(e[0] != 0, axis=-1))
    n1 = len(S.prompt_tokens(prompts[1]))
    assert n1 == 6 and np.all(np.any(e[1, :n1] != 0, axis=-1)) and np.all(e[1, n1:] == 0)
    assert np.all(e[2] == 0) and np.all(e[3] == 0)
    # "red" at position 1 in prompt 0 and 1; "gray" (pos 15) vs "navy" (pos 5) differ
    np.testing.assert_array_equal(e[0, 1], e[1, 1])
    # one word at two positions differs by the position signal only
    a = S.encode_prompts(["red", "small red"])
    np.testing.assert_allclose(a[1, 1] - a[0, 0], _sinusoid(1, 32) - _sinusoid(0, 32), atol=1e-5)
    np.testing.assert_array_equal(S.encode_prompts(["RED Circle"]), S.encode_prompts(["red circle"]))


def test_word_vectors_distinct():
    e = S.encode_prompts(list(S.VOCABULARY))[:, 0]  # every word at position 0
    e = e - e.mean(0)  # remove the shared position signal
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert np.max(cos - 2 * np.eye(len(cos))) < 0.8


def test_encode_prompts_errors():
    with pytest.raises(ValueError, match=r"outside the shapes vocabulary: \['hexagon', 'pink'\]"):
        S.encode_prompts(["a pink hexagon moving up"])
    with pytest.raises(ValueError, match="16 content words, more than text_len=8"):
        S.encode_prompts([PROMPT_3], text_len=8)
    with pytest.raises(ValueError, match="text_dim=0"):
        S.encode_prompts([PROMPT_3], text_dim=0)
    with pytest.raises(TypeError, match="list of str"):
        S.encode_prompts(PROMPT_3)
    with pytest.raises(TypeError, match="expects a str"):
        S.encode_prompts([3])
    assert S.encode_prompts([PROMPT_3], text_len=20, text_dim=7).shape == (1, 20, 7)


def test_encode_prompts_nondefault_dims_consistent():
    e = S.encode_prompts(["red"], text_len=4, text_dim=9)
    np.testing.assert_allclose(e[0, 0] - _word_vector("red", 9), _sinusoid(0, 9), atol=1e-6)
