"""Shared plumbing for every model package: data, mesh, checkpoints, logging, images.

Nothing model-specific lives here; ddpm/, latent/, stylegan/ and metrics/
import from it rather than keeping copies.
"""
