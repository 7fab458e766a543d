"""One of each helper that the training jobs (pretraining, distillation, downstream) share.

| module | holds |
|---|---|
| ``config`` | built-in defaults <- YAML <- ``key=value`` overrides, strict (unknown keys are errors); ``ConfigError`` |
| ``checkpoint`` | atomic file writes, checkpoint save/load (``weights_only=True``), step-numbered names, pruning |
| ``rng`` | generator states as plain data, per-step seeds |
| ``distributed`` | torchrun process-group set-up and the few collectives the jobs use |
| ``errors`` | the errors the entry points turn into exit statuses (2: usage, 3: non-finite loss) |
| ``run_info`` | git revision and run metadata; paths made portable for what an export publishes |
| ``figures`` | the figures (matplotlib, ``plot`` extra): frame similarity, pretraining panels, segmentation overlays |
| ``progress`` | progress bars and the closing "wrote X; next: Y" line |
| ``schedulers`` | per-iteration cosine schedules |
"""
