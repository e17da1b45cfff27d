"""Text documents on disk and their deterministic train/validation split.

Two byte-level sources list their documents here (nothing is read until `Document.read`):

* stdlib: the `.py` files of the running Python's standard library (`sysconfig`'s "stdlib" path,
  without site-/dist-packages and, by default, without test directories), one document per file,
  in sorted order of their relative paths, capped at the first `max_bytes` of files. It needs no
  download; it does depend on the Python version (3.11 has ~730 files, ~11.5 MiB without tests).
* files: the files matched by a path or glob (several separated by commas), one document each.
  A single file (a novel, say) is split by position instead: the last `validation_fraction` of its
  bytes, moved forward to the next line start, is the validation document.

Several documents are split by a stable hash of their relative path (SHA-256, so every machine
and process agrees; Python's `hash` is salted per process): a document is in validation when the
hash, read as a fraction of 2**64, is below `validation_fraction`. Adding a file never moves
another.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import pathlib
import sysconfig

SPLITS = ("train", "validation")
STDLIB_MAX_BYTES = 16 * 2**20          # all of 3.11's non-test stdlib; loads in ~0.2 s
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


@dataclasses.dataclass(frozen=True)
class Document:
  """Bytes [start, stop) of the file at `path`; `name` is the stable key the split hashes."""
  name: str
  path: str
  start: int = 0
  stop: int | None = None

  def read(self) -> bytes:
    with open(self.path, "rb") as f:
      f.seek(self.start)
      return f.read() if self.stop is None else f.read(self.stop - self.start)


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {SPLITS}")


def check_validation_fraction(validation_fraction: float) -> None:
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1)")


def in_validation(name: str, validation_fraction: float) -> bool:
  """Stable across machines and processes: SHA-256 of the name, not Python's salted hash."""
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < validation_fraction * 2**64


def _hash_split(documents: list[Document], split: str, validation_fraction: float):
  want_validation = split == "validation"
  return [d for d in documents if in_validation(d.name, validation_fraction) == want_validation]


def _cap(documents: list[Document], sizes: list[int], max_bytes: int | None) -> list[Document]:
  """Whole documents in order while they fit in max_bytes (None: no cap)."""
  if max_bytes is None:
    return documents
  kept, total = [], 0
  for document, size in zip(documents, sizes):
    if total + size > max_bytes:
      break
    kept.append(document)
    total += size
  return kept


def stdlib_documents(split: str, validation_fraction: float, max_bytes: int | None = None,
                     include_tests: bool = False) -> list[Document]:
  """The standard library's `.py` files of `split`, sorted by relative path (see module doc)."""
  check_split(split)
  check_validation_fraction(validation_fraction)
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  skipped = _SKIPPED_DIRS if include_tests else _SKIPPED_DIRS | _TEST_DIRS
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in skipped]
    for filename in filenames:
      if filename.endswith(".py"):
        path = pathlib.Path(dirpath, filename)
        found.append((path.relative_to(root).as_posix(), str(path)))
  found.sort()
  sizes = [os.path.getsize(path) for _, path in found]
  # Empty files (many __init__.py) would only add a separator; leave them out.
  documents = [Document(name, path) for (name, path), size in zip(found, sizes) if size]
  sizes = [size for size in sizes if size]
  documents = _cap(documents, sizes, STDLIB_MAX_BYTES if max_bytes is None else max_bytes)
  return _hash_split(documents, split, validation_fraction)


def expand_paths(path: str) -> list[str]:
  """Sorted, de-duplicated files matched by `path`: a path or glob, or several joined by commas."""
  patterns = [p.strip() for p in path.split(",") if p.strip()]
  if not patterns:
    raise ValueError(f"path={path!r} names no files; give a file, a glob or a comma-separated list")
  files = set()
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    matches = glob.glob(pattern, recursive=True)
    if not matches:
      if glob.has_magic(pattern):
        raise ValueError(f"glob {pattern!r} (from path={path!r}) matches no files")
      raise ValueError(f"file {pattern!r} (from path={path!r}) does not exist")
    matched_files = [m for m in matches if os.path.isfile(m)]
    if not matched_files:
      raise ValueError(f"{pattern!r} (from path={path!r}) matches only directories; "
                       f"use a glob such as '{pattern.rstrip('/')}/**/*.txt'")
    files.update(os.path.abspath(m) for m in matched_files)
  return sorted(files)


def _single_file_split(path: str, split: str, validation_fraction: float,
                       max_bytes: int | None) -> list[Document]:
  size = os.path.getsize(path)
  if max_bytes is not None:
    size = min(size, max_bytes)
  cut = size - int(round(size * validation_fraction))
  if 0 < cut < size:
    # Start validation at a line start so neither part begins mid-line (or mid-UTF-8 character).
    with open(path, "rb") as f:
      f.seek(cut - 1)
      newline = f.read(size - cut + 1).find(b"\n")
    if newline >= 0:
      cut += newline
  name = os.path.basename(path)
  if split == "train":
    return [Document(f"{name}[train]", path, 0, cut)] if cut > 0 else []
  return [Document(f"{name}[validation]", path, cut, size)] if cut < size else []


def file_documents(path: str, split: str, validation_fraction: float,
                   max_bytes: int | None = None) -> list[Document]:
  """The documents of `split` among the files matched by `path` (see module doc)."""
  check_split(split)
  check_validation_fraction(validation_fraction)
  files = expand_paths(path)
  sizes = [os.path.getsize(f) for f in files]
  nonempty = [(f, s) for f, s in zip(files, sizes) if s]
  if not nonempty:
    raise ValueError(f"path={path!r}: all {len(files)} matched file(s) are empty: {files[:3]}")
  if len(files) == 1:
    return _single_file_split(files[0], split, validation_fraction, max_bytes)
  root = os.path.commonpath(files)
  documents = [Document(pathlib.Path(os.path.relpath(f, root)).as_posix(), f) for f, _ in nonempty]
  documents = _cap(documents, [s for _, s in nonempty], max_bytes)
  return _hash_split(documents, split, validation_fraction)
