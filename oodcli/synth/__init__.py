"""Synthetic OOD, one module per method: GROOD's mixup OOD prototype (``grood``); SynOOD's context
labels (``context``), its energy-guided inpainting (``synood``) and the tiny inpainting pipeline of
the offline demo (``tiny_diffusion``)."""
