"""What code and configuration a run used: the facts a `config` entry records."""
from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Mapping

from .canonical import canonical_bytes, normalize, sha256_hex

PACKAGES = ("ktfed", "torch", "numpy", "opacus", "cryptography", "grpcio", "protobuf", "safetensors",
            "scikit-learn")
# Containers are built without .git: the image build passes the commit in this variable.
GIT_COMMIT_ENV = "KTFED_GIT_COMMIT"


def code_versions(packages=PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that matter to the guarantees (those installed)."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit(repo: str | os.PathLike | None = None) -> str | None:
    """The commit the code was run from ($KTFED_GIT_COMMIT, else `git rev-parse HEAD`, with
    "-dirty" when the tree has local changes); None when neither is available."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    repo = Path(repo) if repo else Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None


def as_text(config: str | bytes) -> str:
    return config.decode("utf-8") if isinstance(config, (bytes, bytearray)) else str(config)


def config_sha256(config: Mapping | str | bytes) -> str:
    """SHA-256 of a config: of its canonical JSON for a mapping, of its UTF-8 text otherwise."""
    if isinstance(config, Mapping):
        return sha256_hex(canonical_bytes(normalize(dict(config), "config")))
    return sha256_hex(as_text(config).encode("utf-8"))


def canonical_token(token: Mapping) -> bytes:
    return canonical_bytes(normalize(dict(token), "token"))


