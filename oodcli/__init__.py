"""oodcli: out-of-distribution detection from a feature store.

The expensive backbone pass happens once (``extract``); every scorer, trainer and
report reads the store it wrote.
"""

__version__ = "0.1.0"
