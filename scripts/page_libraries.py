"""The chat page's two libraries, taken from the npm registry at set-up time (scripts/setup), never committed:
marked renders Markdown, DOMPurify sanitises the result. Pinned versions, each tarball checked against the
registry's sha512 `integrity`, and only the files the page loads (and their licences) extracted into
app/static/vendor/. Quick when they are already there. Without them the page shows answers as plain text.

    python scripts/page_libraries.py [DEST]

npm's own `npm_config_registry` names another registry (a mirror).
"""
import base64
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path


from app.paths import PROJECT_DIR

DEST = PROJECT_DIR / "app" / "static" / "vendor"
REGISTRY = os.environ.get("npm_config_registry") or "https://registry.npmjs.org"
STAMP = ".pins"  # in DEST: what was extracted there, so that an unchanged set-up does nothing


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    integrity: str  # the registry's dist.integrity for this version
    files: dict     # path in the tarball -> name in DEST

    def tarball_url(self):
        return f"{REGISTRY.rstrip('/')}/{self.name}/-/{self.name}-{self.version}.tgz"

    def pin(self):
        return f"{self.name}@{self.version} {self.integrity}"


PACKAGES = [
    Package("marked", "18.2.1",
            "sha512-ii4bxCTCqqwpT86XZWgJNs+ZnAIZksmLGYMViWA7PDIXYIeNo1x6cDdX3JOip9NM/cI6p8z57FxliACboTruMA==",
            {"package/lib/marked.esm.js": "marked.esm.js", "package/LICENSE": "marked.LICENSE.txt"}),
    # Its ES module build is a .mjs file; served as .js, it gets a JavaScript type whatever the system's MIME
    # table says (browsers refuse a module of any other type).
    Package("dompurify", "3.5.0",
            "sha512-LYC0ZkE8P1V42JsRYTwMdme/2ET8SpOc5AA2eOFjP/IadvRd2fwiT4TVz5vkfy0XUx12aS2UaRkTnfVPNOv9vw==",
            {"package/dist/purify.es.mjs": "purify.es.js", "package/LICENSE": "dompurify.LICENSE.txt"}),
]


def up_to_date(dest):
    stamp = dest / STAMP
    return (stamp.is_file() and stamp.read_text().splitlines() == [p.pin() for p in PACKAGES]
            and all((dest / name).is_file() for p in PACKAGES for name in p.files.values()))


def download(package):
    """The tarball's bytes, checked against the pinned integrity (a changed or corrupted file is an error)."""
    with urllib.request.urlopen(package.tarball_url(), timeout=60) as response:
        data = response.read()
    algorithm, _, expected = package.integrity.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if actual != expected:
        raise ValueError(f"{package.name}@{package.version}: the tarball's {algorithm} is {actual}, "
                         f"not the pinned {expected}")
    return data


def extract(package, data, dest):
    """Only the listed members, by name: nothing else in the tarball is written anywhere."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member_name, name in package.files.items():
            member = tar.getmember(member_name)
            if not member.isfile():
                raise ValueError(f"{package.name}: {member_name} is not a file")
            content = tar.extractfile(member).read()
            with tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp:
                tmp.write(content)
            os.chmod(tmp.name, 0o644)
            os.replace(tmp.name, dest / name)  # a page being served never sees half a file


def main(dest=DEST):
    dest = Path(dest)
    if up_to_date(dest):
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    (dest / STAMP).unlink(missing_ok=True)
    try:
        for package in PACKAGES:
            extract(package, download(package), dest)
    except (OSError, ValueError, KeyError, tarfile.TarError) as exc:
        print(f"page libraries: {exc}", file=sys.stderr)
        return 1
    (dest / STAMP).write_text("".join(p.pin() + "\n" for p in PACKAGES))
    print("page libraries: " + ", ".join(f"{p.name} {p.version}" for p in PACKAGES))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
