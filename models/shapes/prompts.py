"""The shapes world's prompt grammar: vocabulary, the `Scene` it describes, a parser and a seeded sampler.

Grammar (one to `MAX_OBJECTS` objects, each with a distinct colour so that every object is identifiable):

    prompt := object ("and" object)* "on a" BACKGROUND "background"
    object := "a" SIZE COLOR SHAPE "moving" DIRECTION SPEED

e.g. ``"a small red circle moving up-left slowly and a large blue square moving right quickly on a gray
background"``. Prompts are split into ``"train"`` and ``"heldout"`` by hashing the canonical prompt of
their scene (objects sorted by colour), so held-out prompts are never trained on whatever the sampler's seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable

import numpy as np

# Colours are RGB in 0..255. Object colours are the six primaries/secondaries (far apart in RGB and, after
# subtracting any background, pointing in different directions, which the detector's unmixing relies on).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "yellow": (240, 220, 30),
    "green": (30, 190, 50),
    "cyan": (30, 210, 230),
    "blue": (40, 70, 240),
    "magenta": (230, 40, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "navy": (20, 30, 90),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond")
# Half-extent in pixels (circle radius, half side of the square, half diagonal of the diamond, half base
# and half height of the triangle). Pixel sizes are fixed: they do not scale with the frame size.
SIZES: dict[str, float] = {"small": 3.0, "large": 5.0}
_D = 1.0 / math.sqrt(2.0)
# Unit vectors in image coordinates (x right, y down): "up" is -y.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up-left": (-_D, -_D),
    "up-right": (_D, -_D),
    "down-left": (-_D, _D),
    "down-right": (_D, _D),
}
# Pixels per video frame along the direction of motion.
SPEEDS: dict[str, float] = {"slowly": 0.5, "steadily": 1.0, "quickly": 2.0}
MAX_OBJECTS = 3
# Words that structure a prompt but carry nothing the scene does not already fix by position.
FUNCTION_WORDS: tuple[str, ...] = ("a", "moving", "and", "on", "background")
# Every content word, in a fixed order.
VOCABULARY: tuple[str, ...] = (*SIZES, *COLORS, *SHAPES, *DIRECTIONS, *SPEEDS, *BACKGROUNDS)
HELDOUT_PERCENT = 10
SPLITS = ("train", "heldout")
GRAMMAR = ('prompt := object ("and" object)* "on a" BACKGROUND "background"   (1 to 3 objects, distinct colours)\n'
           'object := "a" SIZE COLOR SHAPE "moving" DIRECTION SPEED')
EXAMPLE_PROMPT = ("a small red circle moving up-left slowly and a large blue square moving right quickly on a gray "
                  "background")


def _check_word(kind: str, value: object, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{kind}={value!r} is not in the shapes vocabulary; allowed: {sorted(allowed)}")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object of a scene; each field is a vocabulary word, validated at construction."""

    size: str
    color: str
    shape: str
    direction: str
    speed: str

    def __post_init__(self):
        _check_word("SceneObject.size", self.size, SIZES)
        _check_word("SceneObject.color", self.color, COLORS)
        _check_word("SceneObject.shape", self.shape, SHAPES)
        _check_word("SceneObject.direction", self.direction, DIRECTIONS)
        _check_word("SceneObject.speed", self.speed, SPEEDS)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]

    @property
    def half_extent(self) -> float:
        return SIZES[self.size]

    @property
    def velocity(self) -> tuple[float, float]:
        """(vx, vy) in pixels per frame."""
        ux, uy = DIRECTIONS[self.direction]
        s = SPEEDS[self.speed]
        return ux * s, uy * s

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} moving {self.direction} {self.speed}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A parsed prompt: 1..MAX_OBJECTS objects with distinct colours on a uniform background.

    Object order is the drawing order (later objects are drawn on top)."""

    objects: tuple[SceneObject, ...]
    background: str

    def __post_init__(self):
        objs = tuple(self.objects) if isinstance(self.objects, (list, tuple)) else self.objects
        if not isinstance(objs, tuple) or not all(isinstance(o, SceneObject) for o in objs):
            raise TypeError(f"Scene.objects must be a tuple of SceneObject, got {self.objects!r}")
        object.__setattr__(self, "objects", objs)
        if not 1 <= len(objs) <= MAX_OBJECTS:
            raise ValueError(f"Scene.objects has {len(objs)} objects; allowed: 1 to {MAX_OBJECTS}")
        colors = [o.color for o in objs]
        if len(set(colors)) != len(colors):
            raise ValueError(f"Scene.objects colours {colors} repeat; objects in a scene need distinct colours "
                             "(colour is how the adherence detector tells them apart)")
        _check_word("Scene.background", self.background, BACKGROUNDS)

    @property
    def prompt(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"

    def canonical(self) -> Scene:
        """The same scene with objects sorted by colour (one canonical prompt per set of objects)."""
        order = list(COLORS)
        return Scene(tuple(sorted(self.objects, key=lambda o: order.index(o.color))), self.background)


def parse_prompt(prompt: str) -> Scene:
    """Parse a prompt of the grammar above back to its `Scene` (case and extra whitespace are ignored).

    Any deviation is a ValueError naming the prompt and what is wrong, followed by the grammar and an example.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"parse_prompt expects a str, got {type(prompt).__name__}: {prompt!r}")
    try:
        return _parse(prompt)
    except ValueError as err:
        raise ValueError(f"{err}\nShapes prompts follow the grammar\n{GRAMMAR}\ne.g. {EXAMPLE_PROMPT!r}") from None


def _parse(prompt: str) -> Scene:
    words = prompt.lower().split()
    pos = 0

    def take(kind: str, allowed) -> str:
        nonlocal pos
        got = words[pos] if pos < len(words) else "<end of prompt>"
        if got not in allowed:
            want = repr(allowed[0]) if len(allowed) == 1 else f"a {kind} word {sorted(allowed)}"
            raise ValueError(f"cannot parse prompt {prompt!r}: word {pos} is {got!r}, expected {want}")
        pos += 1
        return got

    objects = []
    while True:
        take("article", ("a",))
        size = take("size", SIZES)
        color = take("color", COLORS)
        shape = take("shape", SHAPES)
        take("verb", ("moving",))
        direction = take("direction", DIRECTIONS)
        speed = take("speed", SPEEDS)
        objects.append(SceneObject(size, color, shape, direction, speed))
        if take("connective", ("and", "on")) == "on":
            break
    take("article", ("a",))
    background = take("background", BACKGROUNDS)
    take("noun", ("background",))
    if pos != len(words):
        raise ValueError(f"cannot parse prompt {prompt!r}: unexpected words after the end: {words[pos:]}")
    try:
        return Scene(tuple(objects), background)
    except ValueError as err:
        raise ValueError(f"invalid prompt {prompt!r}: {err}") from None


def check_prompts(prompts: str | Iterable[str]) -> list[str]:
    """`prompts` as a list (one str is one prompt), each checked against the grammar with `parse_prompt`.

    A ValueError names the first bad prompt by index and says what is wrong; an empty list is refused too.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}: {prompts!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"no prompts given; pass at least one, e.g. [{EXAMPLE_PROMPT!r}]")
    for i, p in enumerate(prompts):
        try:
            parse_prompt(p)
        except (ValueError, TypeError) as err:
            raise type(err)(f"prompts[{i}]: {err}") from None
    return prompts


def as_scene(scene_or_prompt: Scene | str) -> Scene:
    if isinstance(scene_or_prompt, Scene):
        return scene_or_prompt
    if isinstance(scene_or_prompt, str):
        return parse_prompt(scene_or_prompt)
    raise TypeError(f"expected a Scene or a prompt str, got {type(scene_or_prompt).__name__}")


def prompt_split(scene_or_prompt: Scene | str) -> str:
    """``"heldout"`` for HELDOUT_PERCENT % of scenes (by a hash of the canonical prompt), else ``"train"``."""
    canonical = as_scene(scene_or_prompt).canonical().prompt
    bucket = int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def sample_scene(rng: np.random.Generator, max_objects: int = MAX_OBJECTS) -> Scene:
    """A uniformly random canonical scene: 1..max_objects objects (count uniform), distinct colours."""
    n = int(rng.integers(1, max_objects + 1))
    colors = [list(COLORS)[i] for i in sorted(rng.choice(len(COLORS), size=n, replace=False))]

    def pick(options) -> str:
        options = list(options)
        return options[int(rng.integers(len(options)))]

    objs = tuple(SceneObject(pick(SIZES), c, pick(SHAPES), pick(DIRECTIONS), pick(SPEEDS)) for c in colors)
    return Scene(objs, pick(BACKGROUNDS))


def sample_prompts(n: int, seed: int, split: str = "train", *, max_objects: int = MAX_OBJECTS,
                   unique: bool = True) -> list[str]:
    """`n` canonical prompts of `split`, deterministic in `seed` (distinct from each other when `unique`).

    Held-out and train prompts are disjoint for every seed (the split is a hash of the scene, not of the
    seed). The evaluation set is ``sample_prompts(64, seed=0, split="heldout")``.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"sample_prompts: n={n!r} is invalid; allowed: an int >= 0")
    if split not in SPLITS:
        raise ValueError(f"sample_prompts: split={split!r} is invalid; allowed: {SPLITS}")
    if not isinstance(max_objects, int) or not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"sample_prompts: max_objects={max_objects!r} is invalid; allowed: 1..{MAX_OBJECTS}")
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    tries, max_tries = 0, 1000 * max(n, 1)
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise ValueError(f"sample_prompts: could not find {n} {'distinct ' if unique else ''}{split} prompts "
                             f"with max_objects={max_objects} in {max_tries} draws; ask for fewer")
        prompt = sample_scene(rng, max_objects).prompt
        if prompt_split(prompt) != split or (unique and prompt in seen):
            continue
        seen.add(prompt)
        out.append(prompt)
    return out
