"""one2345pp: a training and inference framework for One-2-3-45++.

The method's facts (camera layout, schedules, evaluation protocol) are described in ``shared/design/METHOD.md``;
the modules of this package are organised by concern: ``cameras`` (the single source of camera conventions),
``geometry`` (meshes, normalisation, ground-truth volumes), ``rendering`` (CPU ray-cast renderer), ``data``
(procedural source, shard builder, data modules) and ``config`` (typed configs with ``key=value`` overrides).
"""

__version__ = "0.1.0"
