"""Which app bundles (FABs) a hospital accepts: only those that run the installed fedprompt.

The aggregator submits a Flower app bundle with every run, and Flower's own executor installs it
and imports its ClientApp: whatever Python it carries runs next to the records. The hospital
worker (client/worker.py) never imports anything from a bundle; it still refuses a bundle that
asks for other code, so that an operator who ships a modified ClientApp learns it at once
("untrusted app") instead of believing it ran. Accepted:
  - a code-free bundle: only `pyproject.toml` (plus Flower's `.info/` manifest), whose components
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
MANIFEST_DIR = ".info/"  # Flower's own file list and hashes, added by `flwr build`
MAX_BUNDLE_BYTES = 1 << 20  # a code-free bundle is a few hundred bytes


def bundle_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def untrusted_reason(content: bytes, trusted_sha256: frozenset[str] | set[str] = frozenset()) -> str | None:
    """Why this bundle is refused, or None if the site accepts it. The reason goes to the site's log only."""
    digest = bundle_sha256(content)
    if digest in trusted_sha256:
        return None
    if len(content) > MAX_BUNDLE_BYTES:
        return f"bundle {digest[:16]}... is {len(content)} bytes: a code-free bundle is a pyproject.toml"
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
        names = archive.namelist()
        others = sorted(n for n in names if n != "pyproject.toml" and not n.startswith(MANIFEST_DIR))
        if others:
            return (
                f"bundle {digest[:16]}... carries files of its own ({', '.join(others[:5])}); only pyproject.toml is "
                "accepted"
            )
        if "pyproject.toml" not in names:
            return f"bundle {digest[:16]}... has no pyproject.toml"
        config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError) as exc:
        return f"bundle {digest[:16]}... is unreadable: {exc}"
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if components != COMPONENTS:
        return f"bundle {digest[:16]}... names components {components!r}; this site runs only {COMPONENTS!r}"
    return None
