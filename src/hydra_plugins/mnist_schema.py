"""Makes the pipeline's config schema known to Hydra in whatever process composes ``conf/``.

DVC composes ``conf/`` into ``params.yaml`` in its own process (``dvc exp run -S``), where
nothing of this project is imported. It does run Hydra's plugin discovery first, on the
folder ``.dvc/config`` names as ``hydra.plugins_path`` (``src``), and discovery imports every
module under ``hydra_plugins``: this one. Importing the schema registers it in Hydra's
ConfigStore, ``conf/config.yaml`` lists it first in its defaults, and so a wrong type, an
unknown key or a value out of range is refused at composition, before DVC writes
``params.yaml`` or removes any output.
"""

import mnist_pipeline.core.config  # noqa: F401  (registers the schema and its checking resolver)
