"""The prompt-adherence detector: ground truth scores ~1, degraded ground truth high, noise / shuffled frames /
another prompt's video at or below chance on the criteria they break, and targeted edits fail their criterion."""

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

import models.shapes as S
from models.shapes.adherence import (
    CHANCE,
    CRITERIA,
    MID_VIDEO_DIRECTION_CHANCE,
    main,
    same_up_to_reflection,
    score_video,
)

N = 64


@pytest.fixture(scope="module")
def heldout():
    prompts = S.sample_prompts(N, seed=0, split="heldout")
    return prompts, S.render_batch(prompts, seeds=range(N))


def _degrade(videos: np.ndarray, rng) -> np.ndarray:
    """1-pixel Gaussian blur (sigma 1 px in space) then Gaussian noise sigma 0.05, clipped to [0, 1]."""
    x = ndimage.gaussian_filter(videos / 255.0, sigma=(0, 0, 1, 1, 0), mode="nearest")
    return np.clip(x + rng.normal(0.0, 0.05, x.shape), 0.0, 1.0)


def test_criteria_and_chance_levels():
    assert CRITERIA == ("background", "color", "shape", "size", "direction", "speed", "persistence")
    assert CHANCE == {"background": 1 / 4, "color": 1 / 6, "shape": 1 / 4, "size": 1 / 2, "direction": 1 / 8,
                      "speed": 1 / 3, "persistence": None}


def test_ground_truth_scores_high(heldout):
    prompts, videos = heldout
    r = S.adherence(videos, prompts)
    assert r["score"] >= 0.98
    for c in CRITERIA:
        assert r[c] >= 0.97, (c, r[c])
    assert min(v["score"] for v in r["per_video"]) >= 0.85
    # the score is the mean of the 7 criteria, each the mean over the prompt's objects
    v = r["per_video"][0]
    assert np.isclose(v["score"], np.mean([v[c] for c in CRITERIA]))
    assert np.isclose(v["shape"], np.mean([o["shape"] for o in v["objects"]]))


def test_blurred_noised_ground_truth_scores_high(heldout):
    prompts, videos = heldout
    r = S.adherence(_degrade(videos, np.random.default_rng(0)), prompts)
    assert r["score"] >= 0.97
    for c in CRITERIA:
        assert r[c] >= 0.93, (c, r[c])


def test_uniform_noise_is_at_or_below_chance(heldout):
    prompts, videos = heldout
    rng = np.random.default_rng(1)
    r = S.adherence(rng.uniform(size=videos.shape).astype(np.float32), prompts)
    for c in CRITERIA:
        assert r[c] <= (CHANCE[c] if CHANCE[c] is not None else 0.05), (c, r[c])
    assert r["score"] <= 0.05


def test_shuffled_frames_break_motion_only(heldout):
    """Shuffling frames keeps every frame-local check (background, colour, shape, size) and breaks motion."""
    prompts, videos = heldout
    rng = np.random.default_rng(2)
    shuffled = np.stack([v[rng.permutation(len(v))] for v in videos])
    r = S.adherence(shuffled, prompts)
    assert r["direction"] <= CHANCE["direction"] and r["speed"] <= CHANCE["speed"]
    assert r["persistence"] <= 0.8  # slow objects barely move, so their shuffled jumps often stay small
    for c in ("background", "color", "shape", "size"):
        assert r[c] >= 0.97, (c, r[c])
    assert r["score"] <= 0.7


def test_video_of_another_prompt_scores_low(heldout):
    prompts, videos = heldout
    r = S.adherence(videos, prompts[1:] + prompts[:1])
    assert r["score"] <= 0.3
    for c in ("background", "shape", "size", "direction", "speed"):
        assert r[c] <= 2 * CHANCE[c], (c, r[c])


def _edited(prompt: str, i: int, **change) -> dict:
    """Render the prompt with its first object's fields changed; that object's checks against the original."""
    scene = S.parse_prompt(prompt)
    obj = dataclasses.replace(scene.objects[0], **change)
    video = S.render(S.Scene((obj,) + scene.objects[1:], scene.background), seed=i)
    return score_video(video, prompt)["objects"][0]


ROTATE = {"up": "right", "right": "down", "down": "left", "left": "up", "up-left": "up-right",
          "up-right": "down-right", "down-right": "down-left", "down-left": "up-left"}
OTHER_SPEED = {"slowly": "quickly", "steadily": "slowly", "quickly": "steadily"}
OTHER_SHAPE = {"square": "triangle", "circle": "diamond", "triangle": "circle", "diamond": "square"}


def test_targeted_edits_fail_their_criterion():
    prompts = S.sample_prompts(12, seed=4, split="heldout")
    for i, p in enumerate(prompts):
        o = S.parse_prompt(p).objects[0]
        r = _edited(p, i, direction=ROTATE[o.direction])
        assert r["direction"] == 0.0 and r["speed"] == 1.0 and r["shape"] >= 0.75, (p, r)
        r = _edited(p, i, speed=OTHER_SPEED[o.speed])
        assert r["speed"] == 0.0 and r["direction"] == 1.0, (p, r)
        r = _edited(p, i, shape=OTHER_SHAPE[o.shape])
        assert r["shape"] <= 0.1 and r["size"] >= 0.75 and r["color"] >= 0.75, (p, r)
        r = _edited(p, i, size="large" if o.size == "small" else "small")
        assert r["size"] <= 0.1 and r["color"] >= 0.75, (p, r)


def test_vanishing_and_duplicated_objects_fail_persistence():
    prompts = S.sample_prompts(8, seed=5, split="heldout", max_objects=1)
    separated = []
    for i, p in enumerate(prompts):
        scene = S.parse_prompt(p)
        video = S.render(scene, seed=i)
        bg = np.asarray(S.BACKGROUNDS[scene.background], np.uint8)
        vanish = video.copy()
        vanish[8:] = bg  # the object disappears half-way
        r = score_video(vanish, p)
        assert r["color"] == 0.5 and r["persistence"] == 0.5 and r["background"] == 1.0, (p, r)
        # a second copy of the object from another seed, apart from the first in as many
        # frames as possible: two components of the colour in those frames
        path = S.trajectories(scene, seed=i)[0]
        reach = 2 * scene.objects[0].half_extent + 1
        apart = {s: np.max(np.abs(S.trajectories(scene, seed=s)[0] - path), axis=-1) > reach
                 for s in range(100, 200)}
        seed = max(apart, key=lambda s: apart[s].sum())
        separated.append(apart[seed].mean())
        other = S.render(scene, seed=seed)
        dup = np.where(np.any(other != bg, axis=-1, keepdims=True), other, video)
        r = score_video(dup, p)
        assert r["persistence"] <= 1.0 - apart[seed].mean() and r["color"] == 1.0, (p, r)
    assert np.mean(separated) >= 0.75  # the duplicates were apart (so the check above had teeth) in most frames


def test_accepts_uint8_and_float_alike(heldout):
    prompts, videos = heldout
    a = score_video(videos[3], prompts[3])
    b = score_video(videos[3].astype(np.float32) / 255.0, S.parse_prompt(prompts[3]))
    assert a == b
    assert S.adherence(list(videos[:2]), prompts[:2])["score"] == S.adherence(videos[:2], prompts[:2])["score"]


def test_errors(heldout):
    prompts, videos = heldout
    with pytest.raises(ValueError, match="2 videos and 3 prompts"):
        S.adherence(videos[:2], prompts[:3])
    with pytest.raises(TypeError, match="not a single prompt"):
        S.adherence(videos[:1], prompts[0])
    with pytest.raises(ValueError, match=r"expected \(B, T, H, W, 3\)"):
        S.adherence(videos[0], prompts[:16])
    with pytest.raises(ValueError, match=r"expected \(T >= 2, H >= 16, W >= 16, 3\)"):
        score_video(videos[0, ..., :2], prompts[0])
    with pytest.raises(TypeError, match="dtype int32"):
        score_video(videos[0].astype(np.int32), prompts[0])
    bad = videos[0] / 255.0
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        score_video(bad, prompts[0])
    with pytest.raises(ValueError, match="cannot parse prompt"):
        score_video(videos[0], "a red thing")


def test_validation_command_writes_figures(tmp_path, capsys):
    out = tmp_path / "adherence.json"
    main(["--n", "3", "--seed", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    assert res["n"] == 3 and set(res) >= {"ground_truth", "blur1_noise0.05", "uniform_noise", "shuffled_frames",
                                          "other_prompt"}
    assert res["ground_truth"]["score"] > 0.9 and res["uniform_noise"]["score"] < 0.1
    assert set(res["ground_truth"]) == {"score", *CRITERIA}


def test_mid_video_segments_of_long_renders():
    """Later 16-frame segments of 96-frame renders: objects have bounced, so the strict first-step rule fails
    direction on many, while mid_video (any bounce phase, direction up to reflections) scores them like
    whole renders; shuffled segments and another prompt's segments stay low."""
    assert same_up_to_reflection("right", "left") and not same_up_to_reflection("right", "up")
    assert same_up_to_reflection("up-right", "down-left") and MID_VIDEO_DIRECTION_CHANCE == 0.375
    prompts = S.sample_prompts(24, seed=1, split="heldout")
    videos = S.render_batch(prompts, num_frames=96, seeds=range(24))
    later = videos[:, 48:64]
    assert S.adherence(later, prompts)["direction"] < 0.8            # the strict rule misreads bounced motion
    mid = S.adherence(later, prompts, mid_video=True)
    assert mid["score"] >= 0.96 and mid["direction"] >= 0.9, mid
    shuffled = videos[:, np.random.default_rng(0).permutation(96)][:, 48:64]
    assert S.adherence(shuffled, prompts, mid_video=True)["direction"] <= 0.1
    assert S.adherence(later, prompts[1:] + prompts[:1], mid_video=True)["score"] < 0.4
