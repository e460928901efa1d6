"""Synthetic OOD: GROOD's mixup OOD prototype (``grood``), SynOOD's context labels (``context``); one module per method."""
