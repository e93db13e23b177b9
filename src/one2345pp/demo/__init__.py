"""``one2345pp demo --out outputs/demo [--config experiments/demo.yaml] [--force] [key=value ...]``: the whole
project end to end on the embedded procedural dataset (``make demo``).

Steps (``OUT/logs/<step>.log`` holds each one's output; progress lines are echoed with the step's name):

1. ``data``: ``one2345pp data build --source procedural`` of ``data.num_objects`` training objects with the tiny
   recipe (``experiments/tiny/data.yaml``) -> ``OUT/data/`` (the last shard is the stages' validation set);
   ``data-sheet``: a contact sheet of the first objects;
2. ``heldout``: ``images.num_images`` objects of another procedural seed rendered as the shards render a condition
   view, with their ground-truth views -> ``OUT/heldout/`` (:mod:`one2345pp.demo.heldout`);
3. ``train-<stage>`` for the four stages: ``one2345pp train --stage S --config C`` with
   ``run.root=OUT/checkpoints``, ``run.name=demo``, ``data.train_shards=OUT/data``, the demo's step count and
   overrides; ``jobs`` at a time, each with ``threads`` torch threads (default ``cores // jobs``): the small models
   of the tiny presets gain little from a second thread, so two single-threaded stages side by side use two cores
   better than one two-threaded stage after the other. A stage with ``train.<stage>.pretrained`` (by default the
   multi-view stage: the shipped ``checkpoints/tiny/multiview``) is not trained: its run folder is copied to
   ``OUT/checkpoints/<stage>/demo`` instead; ``one2345pp demo --from-scratch`` trains all four;
4. ``export``: ``one2345pp export --multiview --coarse --fine --texture`` -> ``OUT/pipeline/``;
5. ``infer`` (the held-out images -> ``OUT/infer/<name>/``: mesh.glb, views.png, turntable.png, result.json) beside
   ``eval`` (``one2345pp eval --dataset procedural`` on ``eval.num_objects`` held-out objects -> ``OUT/eval/``:
   metrics.csv, metrics.json, report.html);
6. ``OUT/index.html`` (:mod:`one2345pp.demo.report`): the steps with their seconds, the training data, the stages,
   per held-out image the input, the ground-truth and generated views, the turntable and the GLB, and the
   evaluation table; its path is printed last.

The modules: :mod:`~one2345pp.demo.config` (the settings), :mod:`~one2345pp.demo.plan` (the steps and the names the
demo owns under OUT), :mod:`~one2345pp.demo.steps` (running them, the state file, the summaries),
:mod:`~one2345pp.demo.run` (``run_demo``: the phases in order), :mod:`~one2345pp.demo.report` (the page).

The subprocesses (the package's own command line) keep each step's memory apart and make a failure name its step.
``OUT/demo.json`` records each finished step (seconds, summary, outputs). A rerun skips a step recorded as done whose
outputs exist; an interrupted step resumes where its command resumes (the data builder continues its manifest, a
stage with ``ckpts/last.ckpt`` continues with ``run.resume=last``, ``infer`` and ``eval`` skip finished images and
objects). A rerun with other settings into the same folder is refused (``OUT/demo_config.yaml``; ``jobs``,
``threads`` and ``progress_interval`` may change) unless ``--force``, which removes the demo's earlier outputs
(only the names the demo writes) and redoes every step. A failed step is recorded with its reason and the last lines
of its log, the steps that need it are recorded as not run, the others go on, the page is still written, and the
command returns 1.
"""

from __future__ import annotations

from .config import DemoConfig, load_demo_config
from .run import run_demo

__all__ = ["DemoConfig", "load_demo_config", "run_demo"]
