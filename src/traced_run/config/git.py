"""The git commit an app runs from, as ``mlflow.genai.enable_git_model_versioning()`` tags
its agent version: branch, commit, dirty, the ``origin`` remote's URL.

Read from the files under ``.git`` alone, never by running ``git``: a repository's own
config can make ``git status`` run its code (``core.fsmonitor``, clean filters), and the
app's working directory may be anyone's checkout. What it costs grows with the number of
tracked files (a stat each), so it is read on the delivery thread, not at start-up.

Dirty is the working tree against the index, as git compares them: a file whose size or
modification time differs from the index's record is hashed and compared with its blob.
Not seen: changes staged but not committed (telling them needs HEAD's tree, read from
packed objects), and files git converts on checkin (``autocrlf``, filters), which read as changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BRANCH = "mlflow.source.git.branch"
COMMIT = "mlflow.source.git.commit"
DIRTY = "mlflow.source.git.dirty"
REPO_URL = "mlflow.source.git.repoURL"
"""MLflow's tag names (mlflow.utils.mlflow_tags)."""

_HEX40 = re.compile(r"[0-9a-f]{40}")
_ON_BRANCH = "ref: refs/heads/"
"""How .git/HEAD starts when a branch is checked out."""
_ENTRY = struct.Struct(">10I20sH")
"""An index entry's fixed part: ctime s/ns, mtime s/ns, dev, ino, mode, uid, gid, size, sha, flags."""
_ASSUME_VALID = 0x8000
_EXTENDED = 0x4000
_SKIP_WORKTREE = 0x4000
"""In the extended flags of an index of version 3 or 4."""
_GITLINK = 0o160000


class GitUnreadable(Exception):
    """The checkout cannot say its commit; ``str()`` says why, in words safe to print."""

    def __init__(self, message: str, usual: bool = False) -> None:
        self.usual = usual
        """A state a checkout is often in (a detached HEAD in CI): nothing is wrong with it."""
        super().__init__(message)


@dataclass(frozen=True)
class Checkout:
    branch: str
    commit: str
    dirty: bool
    repo_url: str | None

    def tags(self) -> dict[str, str]:
        """MLflow's tags for this version, as ``GitInfo.to_mlflow_tags`` writes them (no diff)."""
        found = {BRANCH: self.branch, COMMIT: self.commit, DIRTY: str(self.dirty).lower()}
        if self.repo_url is not None:
            found[REPO_URL] = self.repo_url
        return found


def find(start: Path) -> tuple[Path, Path, Path] | None:
    """(work tree, git dir, common dir) of the checkout holding ``start``; None outside one."""
    for directory in (start, *start.parents):
        dot_git = directory / ".git"
        if dot_git.is_dir():
            return directory, dot_git, dot_git
        if dot_git.is_file():  # a linked worktree or a submodule: "gitdir: <path>"
            text = dot_git.read_text(errors="replace").strip()
            if not text.startswith("gitdir:"):
                return None
            git_dir = (directory / text.partition(":")[2].strip()).resolve()
            common = git_dir / "commondir"
            shared = (git_dir / common.read_text().strip()).resolve() if common.is_file() else git_dir
            return directory, git_dir, shared
    return None


def read(start: Path) -> Checkout | None:
    """The checkout ``start`` is in; None when it is in none. Raises GitUnreadable."""
    try:
        found = find(start)
        if found is None:
            return None
        work, git_dir, common = found
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith(_ON_BRANCH):
            # MLflow's versioning gives up here too: a version is keyed on a branch.
            raise GitUnreadable("HEAD is detached (no branch)", usual=True)
        branch = head.removeprefix(_ON_BRANCH)
        commit = _ref(common, git_dir, "refs/heads/" + branch)
        if commit is None:
            raise GitUnreadable(f"branch {branch!r} has no commit yet", usual=True)
        return Checkout(branch, commit, _dirty(work, git_dir), remote_url(common / "config"))
    except (OSError, UnicodeDecodeError, ValueError, IndexError, struct.error) as error:
        raise GitUnreadable(f"cannot read the git checkout of {start}: {error}") from None


def _ref(common: Path, git_dir: Path, name: str) -> str | None:
    for directory in (git_dir, common):
        loose = directory / name
        if loose.is_file():
            text = loose.read_text().strip()
            return text if _HEX40.fullmatch(text) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            sha, _, ref = line.partition(" ")
            if ref == name and _HEX40.fullmatch(sha):
                return sha
    return None


def remote_url(config: Path, remote: str = "origin") -> str | None:
    """The remote's URL in the repository's config, without credentials; None when it has none."""
    if not config.is_file():
        return None
    section = None
    for line in config.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == f'[remote "{remote}"]' and line.partition("=")[0].strip() == "url":
            return without_credentials(line.partition("=")[2].strip())
    return None


def without_credentials(url: str) -> str:
    """``https://user:token@host/x`` as ``https://host/x``; an scp-like ``git@host:x`` names a
    login, no secret, and stays."""
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _dirty(work: Path, git_dir: Path) -> bool:
    """Whether a tracked file of the work tree differs from its index entry."""
    index = git_dir / "index"
    if not index.is_file():
        return False
    data = index.read_bytes()
    if data[:4] != b"DIRC":
        raise GitUnreadable(f"{index} is not a git index")
    version, count = struct.unpack_from(">II", data, 4)
    at, path = 12, b""
    for _ in range(count):
        start = at
        *stat, size, sha, flags = _ENTRY.unpack_from(data, at)
        at += _ENTRY.size
        extended = 0
        if version >= 3 and flags & _EXTENDED:
            (extended,) = struct.unpack_from(">H", data, at)
            at += 2
        if version == 4:  # the path as (bytes dropped from the previous one, the rest), unpadded
            drop, at = _varint(data, at)
            end = data.index(b"\0", at)
            path = path[:len(path) - drop] + data[at:end]
            at = end + 1
        else:  # NUL-padded to a multiple of 8 bytes, at least one NUL
            end = data.index(b"\0", at)
            path = data[at:end]
            at = start + ((end - start + 8) & ~7)
        mode, mtime = stat[6], (stat[2], stat[3])
        if flags & _ASSUME_VALID or extended & _SKIP_WORKTREE or mode == _GITLINK:
            continue
        if _changed(work / os.fsdecode(path), mtime, size, sha):
            return True
    return False


def _changed(file: Path, mtime: tuple[int, int], size: int, sha: bytes) -> bool:
    try:
        status = file.lstat()
    except FileNotFoundError:
        return True
    if status.st_size == size and (int(status.st_mtime), status.st_mtime_ns % 1_000_000_000) == mtime:
        return False
    # The index's record may be stale (a file touched, or written in the second the index was):
    # the content decides, as git's own refresh does.
    content = os.readlink(file).encode() if file.is_symlink() else file.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(content), usedforsecurity=False)
    blob.update(content)
    return blob.digest() != sha


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """git's offset encoding (index v4): big-endian 7-bit groups, each continuation adding one."""
    byte = data[at]
    number = byte & 0x7F
    at += 1
    while byte & 0x80:
        byte = data[at]
        number = ((number + 1) << 7) | (byte & 0x7F)
        at += 1
    return number, at
