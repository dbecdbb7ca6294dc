"""What every registry entry is: a sampler carrying its own loop, and the settings of one call.

`ddpm.samplers.sample` checks its arguments, works out the SDEdit start, and hands the rest to
`SAMPLERS[name].run`; the VP solvers (`vp.py`) and the sigma-space solvers (`karras.py`)
each bring their loop, so `sample` knows no sampler by name or kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Run:
  """The settings of one `sample` call, as every sampler's loop sees them."""
  num_steps: int
  spacing: str
  steps_offset: int
  prediction: str
  clip_x0: bool
  num_snapshots: int
  karras: bool
  eta: float
  ddpm_variance: str
  final_alpha_cumprod: float
  inject: Optional[Callable] = None
  init_x0: Optional[jnp.ndarray] = None
  first: int = 0  # Image-to-image: how many of the steps are skipped (set by `sample`).


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A registry entry: `run` takes x_T (or, with `run.init_x0`, the SDEdit noise) to x_0.

  run(schedule, model_fn, x_T, rng, Run) returns x_0, or (x_0, snapshots, snapshot_timesteps)
  with `Run.num_snapshots`; subclasses define it with the entry's own loop.
  """

  # Always runs all T steps whatever num_steps (ddpm): image-to-image's strength counts them.
  full_chain: bool = dataclasses.field(default=False, kw_only=True)

  def run(self, s, model_fn: ModelFn, x_T: jnp.ndarray, rng: jax.Array, run: Run) -> Any:
    raise NotImplementedError
