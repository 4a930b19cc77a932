"""DMC / DMC-OT continual learning on CLIP: the research library (see ARCHITECTURE.md).

Importing the package registers its built-in locally built models (the offline stand-in)
in `dmc_core.model_builders`, so the registry never imports them itself.
"""

from dmc_core import standin as _standin  # noqa: F401
