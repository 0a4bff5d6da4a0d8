"""Which app bundles (FABs) a hospital accepts: only those that run the installed fedprompt.

The aggregator submits a Flower app bundle with every run, and Flower's own executor installs it
and imports its ClientApp: whatever Python it carries runs next to the records. The hospital
worker (client/worker.py) never imports anything from a bundle; it still refuses a bundle that
asks for other code, so that an operator who ships a modified ClientApp learns it at once
("untrusted app") instead of believing it ran. Accepted:
  - a code-free bundle: only `pyproject.toml` (plus Flower's manifest `.info/CONTENT`), whose components
    name exactly fedprompt's installed ServerApp and ClientApp; or
  - a bundle whose sha256 is on the site's allow-list (`site.yaml: trusted_apps`), for a site that
    has reviewed one. Even then the installed code is what runs.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile

COMPONENTS = {"serverapp": "fedprompt.server.server_app:app", "clientapp": "fedprompt.client.client_app:app"}
CONFIG_FILE = "pyproject.toml"
# Flower's manifest: the one file flwr 1.42 writes under .info/ (flwr/cli/build.py: the
# CONTENT list of path, sha256 and size; flwr/cli/install.py reads nothing else there).
MANIFEST_FILES = {".info/CONTENT"}
MAX_BUNDLE_BYTES = 1 << 20  # a code-free bundle is a few hundred bytes
# Read from the zip's central directory before any member is decompressed: a code-free bundle
# holds 2 members and ~1 KB uncompressed. A zip bomb declares what it will inflate to (a 918 KB
# bundle declared a 900 MiB pyproject.toml and took 14 s and +1.8 GB to read whole), so
# refusing on the declared sizes costs nothing; the read below is capped at them too, in case
# a member inflates past what it declares.
MAX_MEMBERS = 16  # the name rule admits 2; this bounds the work before names are compared
MAX_UNCOMPRESSED_BYTES = 1 << 20  # in all: a thousand times a code-free bundle, parsed in milliseconds
MAX_RATIO = 100  # deflate reaches ~1,000:1 on padding; a real pyproject.toml compresses ~3:1


def bundle_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _metadata_reason(members: list[zipfile.ZipInfo]) -> str | None:
    """Why the central directory alone rules the bundle out (sizes as declared), or None."""
    if len(members) > MAX_MEMBERS:
        return f"holds {len(members)} members (at most {MAX_MEMBERS})"
    total = sum(m.file_size for m in members)
    if total > MAX_UNCOMPRESSED_BYTES:
        biggest = max(members, key=lambda m: m.file_size)
        return (
            f"declares {total} bytes uncompressed (at most {MAX_UNCOMPRESSED_BYTES}; {biggest.filename!r} "
            f"alone {biggest.file_size} from {biggest.compress_size} compressed)"
        )
    for m in members:
        ratio = m.file_size / max(m.compress_size, 1)
        if ratio > MAX_RATIO and m.file_size > 4096:  # a tiny member's ratio means nothing
            return f"member {m.filename!r} inflates {ratio:.0f}:1 (at most {MAX_RATIO}:1)"
    names = [m.filename for m in members]
    if len(set(names)) != len(names):
        return "holds a member name twice (which copy is read depends on the reader)"
    others = sorted(n for n in names if n != CONFIG_FILE and n not in MANIFEST_FILES)
    if others:
        return (
            f"carries files of its own ({', '.join(others[:5])}); only {CONFIG_FILE} and Flower's manifest "
            f"({', '.join(sorted(MANIFEST_FILES))}) are accepted"
        )
    if CONFIG_FILE not in names:
        return f"has no {CONFIG_FILE}"
    return None


def untrusted_reason(content: bytes, trusted_sha256: frozenset[str] | set[str] = frozenset()) -> str | None:
    """Why this bundle is refused, or None if the site accepts it. The reason goes to the site's log only."""
    digest = bundle_sha256(content)
    if digest in trusted_sha256:
        return None
    if len(content) > MAX_BUNDLE_BYTES:
        return f"bundle {digest[:16]}... is {len(content)} bytes: a code-free bundle is a pyproject.toml"
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            reason = _metadata_reason(archive.infolist())
            if reason is not None:
                return f"bundle {digest[:16]}... {reason}"
            with archive.open(CONFIG_FILE) as member:
                raw = member.read(MAX_UNCOMPRESSED_BYTES + 1)
        if len(raw) > MAX_UNCOMPRESSED_BYTES:
            return f"bundle {digest[:16]}... inflates {CONFIG_FILE} past {MAX_UNCOMPRESSED_BYTES} bytes"
        config = tomllib.loads(raw.decode("utf-8"))
    # ValueError: bad UTF-8 or TOML, a malformed directory; RuntimeError: an encrypted member;
    # NotImplementedError: an unknown compression method. A bundle never crashes the executor.
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        return f"bundle {digest[:16]}... is unreadable: {exc}"
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if components != COMPONENTS:
        return f"bundle {digest[:16]}... names components {components!r}; this site runs only {COMPONENTS!r}"
    return None
