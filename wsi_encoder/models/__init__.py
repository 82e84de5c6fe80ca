"""Patch encoders (registry, checkpoints) and task heads.

Import the submodules directly (``wsi_encoder.models.encoders``, ``wsi_encoder.models.checkpoint``);
this package module stays empty so that importing it does not load torch.
"""
