"""Where the subpackages are when this package runs from a source checkout.

In a source checkout the subpackages ``stepsource.aggregates``, ``.projections``,
``.adapters`` and ``.engine`` are the folders beside ``stepsource/`` (an install maps them into
the package). When that folder itself is imported from the repository root (``python -m
stepsource`` there puts the root first on ``sys.path``), the package also looks for them in
the root; an installed package, which holds them, is left alone.
"""

from pathlib import Path

import stepsource

_here = Path(stepsource.__file__).resolve().parent
if not (_here / "engine").is_dir() and (_here.parent / "engine" / "__init__.py").is_file():
    stepsource.__path__.append(str(_here.parent))
