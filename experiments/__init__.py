"""The application layer: one module (or package) per paper (config with the paper's defaults, the transform,
the command reproducing its table), a shared harness for those commands, the embedded models' presets
(`shapes_presets`, reading the calibrations packaged in `calibrations/`), the evaluations of the embedded
models, and the `vidaccel` CLI and demo. Commands write under `results/` relative to the working directory;
nothing reads `results/` at run time.
"""
