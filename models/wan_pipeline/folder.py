"""Read a diffusers pipeline folder (Wan2.1 T2V or SkyReels-V2 DF): which pipeline it is, where its parts are,
and the scheduler settings, with one error that names everything missing or unsupported."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# Pipeline class (model_index.json `_class_name`) -> how the transformer samples.
KINDS = {"WanPipeline": "t2v", "SkyReelsV2DiffusionForcingPipeline": "diffusion_forcing"}
PARTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
# The files each part needs besides its weights (weights are checked by the part's own loader).
_PART_FILES = {"tokenizer": "tokenizer.json", "text_encoder": "config.json", "transformer": "config.json",
               "vae": "config.json", "scheduler": "scheduler_config.json"}
SCHEDULERS = ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler")


@dataclasses.dataclass(frozen=True)
class SchedulerSettings:
    """What the sampler needs from `scheduler/scheduler_config.json`."""

    solver: str  # "unipc" or "euler"
    shift: float
    num_train_timesteps: int
    solver_order: int = 2


@dataclasses.dataclass(frozen=True)
class PipelineFolder:
    root: Path
    kind: str  # a value of KINDS
    class_name: str
    scheduler: SchedulerSettings

    def part(self, name: str) -> Path:
        return self.root / name


def read_pipeline_folder(path: str | Path) -> PipelineFolder:
    """Check a pipeline folder and read its index and scheduler settings.

    Every problem (missing folder, missing `model_index.json`, each missing part, an unsupported pipeline or
    scheduler) is collected into one `ValueError` (`FileNotFoundError` when the path itself is absent).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"pipeline folder {root} does not exist (expected a diffusers pipeline folder with "
                                f"model_index.json and {', '.join(p + '/' for p in PARTS)})")
    problems = []
    index_path = root / "model_index.json"
    class_name = None
    if not index_path.is_file():
        problems.append("no model_index.json (is this the pipeline root, not one of its subfolders?)")
    else:
        class_name = json.loads(index_path.read_text()).get("_class_name")
        if class_name not in KINDS:
            problems.append(f"pipeline class {class_name!r} is not supported (supported: {', '.join(KINDS)})")
    for part in PARTS:
        need = root / part / _PART_FILES[part]
        if not (root / part).is_dir():
            problems.append(f"missing {part}/")
        elif not need.is_file():
            problems.append(f"{part}/ has no {_PART_FILES[part]}")
    scheduler = None
    sched_path = root / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        scheduler, why = _scheduler_settings(json.loads(sched_path.read_text()))
        if why:
            problems.append(why)
    if problems:
        raise ValueError(f"{root} is not a usable Wan pipeline folder:\n  - " + "\n  - ".join(problems))
    return PipelineFolder(root, KINDS[class_name], class_name, scheduler)


def _scheduler_settings(cfg: dict) -> tuple[SchedulerSettings | None, str | None]:
    name = cfg.get("_class_name")
    if name not in SCHEDULERS:
        return None, f"scheduler {name!r} is not supported (supported: {', '.join(SCHEDULERS)})"
    steps = int(cfg.get("num_train_timesteps", 1000))
    if name == "FlowMatchEulerDiscreteScheduler":
        if cfg.get("use_dynamic_shifting") or cfg.get("shift_terminal") or cfg.get("stochastic_sampling"):
            return None, ("FlowMatchEulerDiscreteScheduler with dynamic shifting, shift_terminal or stochastic "
                          "sampling is not supported")
        return SchedulerSettings("euler", float(cfg.get("shift", 1.0)), steps, 1), None
    unsupported = [k for k, ok in (("use_flow_sigmas", cfg.get("use_flow_sigmas") is True),
                                   ("prediction_type", cfg.get("prediction_type") == "flow_prediction"),
                                   ("solver_type", cfg.get("solver_type", "bh2") == "bh2"),
                                   ("thresholding", not cfg.get("thresholding", False)),
                                   ("use_dynamic_shifting", not cfg.get("use_dynamic_shifting", False)),
                                   ("final_sigmas_type", cfg.get("final_sigmas_type", "zero") == "zero"),
                                   ("predict_x0", cfg.get("predict_x0", True) is True)) if not ok]
    if unsupported:
        return None, ("UniPCMultistepScheduler settings not supported (the flow-matching UniPC of Wan needs "
                      "use_flow_sigmas=true, prediction_type='flow_prediction', solver_type='bh2', predict_x0, "
                      f"final_sigmas_type 'zero', no thresholding or dynamic shifting): {', '.join(unsupported)}")
    if cfg.get("disable_corrector"):
        return None, f"UniPC disable_corrector={cfg['disable_corrector']} in the folder is not supported"
    return SchedulerSettings("unipc", float(cfg.get("flow_shift", 1.0)), steps, int(cfg.get("solver_order", 2))), None
