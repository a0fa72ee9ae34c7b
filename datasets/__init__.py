"""TFDS builders, one package per dataset; installed as `uem_ich_jax.datasets`.

Never import this folder as a top-level `datasets` package: that name belongs to
Hugging Face datasets.
"""
