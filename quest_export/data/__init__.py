"""Data files shipped inside the package and found through ``importlib.resources``.

    targets/<id>.toml     target profiles (deploy.md section 1)
    prompts/default.txt   calibration prompts for text-to-image pipeline folders

Nothing here depends on the source tree's layout: an installed wheel finds the same files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def data(*parts: str) -> Traversable:
    """A file or folder under quest_export/data (readable with ``read_text`` / ``iterdir``)."""
    node = resources.files(__name__)
    for p in parts:
        node = node / p
    return node


def package_dir(package: str, *parts: str) -> Path:
    """A folder of an installed package as a file-system path, for readers that need one (diffusers, safetensors)."""
    from quest_export.errors import ArtifactError

    node = resources.files(package)
    for p in parts:
        node = node / p
    if not isinstance(node, Path):
        raise ArtifactError(f"{package} is installed as a zip archive ({node}); install quest-export unpacked "
                            "(pip install, not a zipapp) so its bundled models can be read")  # fmt: skip
    return node
