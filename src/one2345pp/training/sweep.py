"""W&B sweep files, and a local agent that runs their trials without a W&B server.

A sweep file (``experiments/sweeps/<stage>.yaml``) is an ordinary W&B sweep configuration: ``wandb sweep FILE``
registers it and prints the ``wandb agent`` command for the cluster. Its ``command`` passes the sampled values as
``key=value`` overrides (``${args_no_hyphens}``) to ``one2345pp train``.

:func:`run_local` is the same loop without the server (laptops, CI, offline clusters): it samples values for the
``grid`` and ``random`` methods (``bayes`` needs W&B's server; locally it is refused), expands the command macros
``${env}``, ``${interpreter}``, ``${program}``, ``${args}``, ``${args_no_hyphens}`` and runs each trial as a
subprocess with ``WANDB_MODE=offline`` unless the environment already says otherwise.
"""

from __future__ import annotations

import itertools
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

LOCAL_METHODS = ("grid", "random")


class SweepError(ValueError):
    pass


def load_sweep(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sweep file not found: {p}")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(spec, dict) or "parameters" not in spec or "command" not in spec:
        raise SweepError(f"{p}: a sweep needs 'method', 'parameters' and 'command' sections")
    for name, param in spec["parameters"].items():
        if not isinstance(param, dict) or not ({"value", "values", "min", "max"} & set(param)):
            raise SweepError(f"{p}: parameter {name!r} needs value, values or min/max")
    return spec


def _sample(param: dict, rng: np.random.Generator) -> Any:
    if "value" in param:
        return param["value"]
    if "values" in param:
        values = param["values"]
        probs = param.get("probabilities")
        return values[rng.choice(len(values), p=probs)]
    lo, hi = param["min"], param["max"]
    dist = param.get("distribution") or ("int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform")
    if dist == "int_uniform":
        return int(rng.integers(lo, hi + 1))
    if dist == "uniform":
        return float(rng.uniform(lo, hi))
    if dist == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if dist == "q_log_uniform_values":
        q = param.get("q", 1)
        return float(round(math.exp(rng.uniform(math.log(lo), math.log(hi))) / q) * q)
    raise SweepError(f"distribution {dist!r} is not supported by the local agent (use W&B's agent)")


def trials(spec: dict, count: int, seed: int = 0) -> list[dict]:
    """Up to ``count`` parameter assignments: the grid in order, or random samples."""
    method = spec.get("method", "random")
    params = spec["parameters"]
    if method == "grid":
        names = list(params)
        options = []
        for n in names:
            p = params[n]
            if "values" not in p and "value" not in p:
                raise SweepError(f"grid sweep: parameter {n!r} needs value or values")
            options.append(p["values"] if "values" in p else [p["value"]])
        return [dict(zip(names, combo)) for combo in itertools.islice(itertools.product(*options), count)]
    if method == "random":
        rng = np.random.default_rng(seed)
        return [{n: _sample(p, rng) for n, p in params.items()} for _ in range(count)]
    raise SweepError(
        f"method {method!r}: the local agent runs {' and '.join(LOCAL_METHODS)} sweeps; "
        "bayes needs W&B's server (`wandb sweep FILE`, then `wandb agent ID`)"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def command_for(spec: dict, values: dict) -> list[str]:
    """The trial's argv with W&B's command macros expanded."""
    args_nh = [f"{k}={_fmt(v)}" for k, v in values.items()]
    macros = {
        "${env}": [],
        "${interpreter}": [sys.executable],
        "${program}": [spec["program"]] if spec.get("program") else [],
        "${args}": [f"--{a}" for a in args_nh],
        "${args_no_hyphens}": args_nh,
        "${args_json}": [],
    }
    argv: list[str] = []
    for token in spec["command"]:
        token = str(token)
        argv.extend(macros.get(token, [token]))
    if argv and argv[0] == "one2345pp":  # the console script of this interpreter's environment
        argv[:1] = [sys.executable, "-m", "one2345pp.cli"]
    return argv


def run_local(path: str | os.PathLike, count: int = 1, seed: int = 0, dry_run: bool = False) -> list[int]:
    """Run ``count`` trials of a sweep file locally; returns their exit codes (printing each command)."""
    spec = load_sweep(path)
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    codes = []
    for i, values in enumerate(trials(spec, count, seed)):
        argv = command_for(spec, values)
        tag = f"[sweep {Path(path).name} trial {i + 1}/{count}]"
        print(f"{tag} {shlex.join(argv)}", flush=True)
        if dry_run:
            codes.append(0)
            continue
        try:
            code = subprocess.call(argv, env=env)
        except OSError as exc:  # the command itself cannot be started: record it and go on with the next trial
            print(f"{tag} cannot start {argv[0]!r}: {exc}", flush=True)
            code = 127
        if code != 0:
            print(f"{tag} failed with exit code {code} ({' '.join(f'{k}={_fmt(v)}' for k, v in values.items())})")
        codes.append(code)
    return codes
