"""Synthetic OOD: GROOD's mixup OOD prototype (``grood``); one module per method."""
