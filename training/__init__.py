"""Patch Diffusion training code: data, networks, patches, loss, augmentation."""
