"""`seal_artifact`: record the digest of an artifact whose manifest was edited on purpose.

Loading refuses a manifest whose content no longer matches its digest (`embq.artifact.digest`).
After an intended edit (or for an artifact written before digests), `embq seal ARTIFACT`:

1. checks the artifact as loading does, the digest aside: paths, sizes, every file against its
   sha256 (a file that does not match is refused, never sealed), headers, formats, the model
   section against the tables, and (`check`) that the model builds;
2. writes the manifest with the new digest under a temporary name in the artifact directory,
   fsyncs it and renames it over manifest.json: a crash leaves the old manifest or the new one.
   No file of the artifact is opened for writing; a server watching the artifact sees a new
   manifest (another inode) and reports it (`embq_serving`), since the artifact's identity
   changed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embq.artifact.digest import DIGEST_FIELD, manifest_digest
from embq.artifact.reader import Artifact, load_artifact
from embq.artifact.schema import MANIFEST_FILE, json_text
from embq.files import fsync_dir, staged_file


def seal_artifact(
    path: str | os.PathLike, check: Callable[[Artifact], Any] | None = None
) -> dict[str, Any]:
    """Check an artifact and record its manifest's digest (see the module docstring).

    Args:
        path: the artifact directory.
        check: called with the loaded artifact before anything is written (e.g. building its
            inference model); an exception it raises stops the seal.

    Returns:
        {"artifact": path, "digest": the new digest, "previous": the digest the manifest held
         (None if none), "changed": whether manifest.json was rewritten}.

    Raises:
        ArtifactError: anything loading refuses, the digest aside.
    """
    artifact = load_artifact(path, verify=True, check_seal=False)
    if check is not None:
        check(artifact)
    manifest = artifact.manifest
    previous = manifest.get(DIGEST_FIELD)
    digest = manifest_digest(manifest)
    result = {"artifact": str(artifact.path), "digest": digest, "previous": previous,
              "changed": previous != digest}  # fmt: skip
    if previous == digest:
        return result
    sealed = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    sealed[DIGEST_FIELD] = digest
    text = json_text(sealed, "manifest") + "\n"
    target = Path(artifact.path) / MANIFEST_FILE
    with staged_file(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(artifact.path)
    return result
