"""Pixel-space diffusion (DDPM, DDIM, DPM-Solver++) in JAX/Flax.

The maths is pure functions (`schedules`, `diffusion`, `samplers`), the network
a Flax module (`models`), and `train` / `sample` / `main` run experiments
described by the ml_collections files in `configs/`.
"""
