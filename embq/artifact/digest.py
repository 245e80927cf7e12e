"""An artifact's identity: one digest over its manifest, and through the manifest every file.

    digest = "sha256:" + hex(sha256(canonical_manifest(manifest)))

`canonical_manifest` is the manifest without its "digest" field, serialised as JSON with sorted
keys, no whitespace, non-ASCII characters as themselves (not \\u escapes), numbers as Python's
json module writes them, encoded as UTF-8. The manifest records every file's sha256, so the
digest covers the files too once each file is checked against its sha256 (what loading does
with verify=True, the default). docs/artifact.md gives the definition and a one-line
recomputation.

The writer stores the digest in the manifest; loading recomputes it and refuses a manifest
edited afterwards (`embq seal` re-seals an intended edit).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from embq.errors import ArtifactError

DIGEST_FIELD = "digest"
DIGEST_PREFIX = "sha256:"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes the digest is taken over (see the module docstring).

    Raises:
        ArtifactError: the manifest holds what JSON cannot carry canonically (NaN / Inf, text
            that is not valid Unicode, nesting too deep to serialise).
    """
    body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)  # fmt: skip
        return text.encode("utf-8")
    except (ValueError, TypeError, RecursionError, UnicodeEncodeError) as e:
        raise ArtifactError(f"the manifest cannot be serialised canonically: {e}") from None


def manifest_digest(manifest: dict[str, Any]) -> str:
    """"sha256:<64 hex digits>" of the manifest (its own "digest" field left out)."""
    return DIGEST_PREFIX + hashlib.sha256(canonical_manifest(manifest)).hexdigest()


def check_digest(manifest: dict[str, Any], where: str) -> str:
    """The manifest's digest, once it matches the manifest's content.

    Raises:
        ArtifactError: no digest (an artifact written before digests, or by hand), a malformed
            one, or one the content no longer matches (the manifest was edited).
    """
    stored = manifest.get(DIGEST_FIELD)
    if stored is None:
        raise ArtifactError(
            f"{where} has no \"digest\": it was written before embq sealed artifacts, or by "
            "hand. Check that its tables and config are what you expect, then run "
            f"`embq seal {where}` to record its digest."
        )
    if not isinstance(stored, str) or not DIGEST_RE.match(stored):
        raise ArtifactError(
            f"{where}: \"digest\" must be \"sha256:\" and 64 lowercase hex digits, got {stored!r}"
        )
    actual = manifest_digest(manifest)
    if actual != stored:
        raise ArtifactError(
            f"{where}: manifest.json was changed after the artifact was written (its content "
            f"hashes to {actual}, its recorded digest is {stored}). Re-create or re-copy the "
            f"artifact; if you edited it on purpose, run `embq seal {where}`."
        )
    return stored


def check_expected_digest(actual: str | None, expected: str | None, where: str) -> None:
    """Refuse an artifact whose digest is not the one pinned (`expected`; None pins nothing)."""
    if expected is None:
        return
    if not isinstance(expected, str) or not DIGEST_RE.match(expected):
        raise ArtifactError(
            f"the expected digest must be \"sha256:\" and 64 lowercase hex digits (as "
            f"`embq seal` and the artifact's metadata print it), got {expected!r}"
        )
    if actual != expected:
        raise ArtifactError(
            f"{where} is not the pinned artifact: its digest is {actual}, the expected one "
            f"{expected}. Deploy the artifact with that digest, or pin this one."
        )
