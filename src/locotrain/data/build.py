"""`loco corpus build`: a larger corpus than Tiny Shakespeare, rebuilt byte for byte anywhere.

Tiny Shakespeare (1.1M characters) is overfit within minutes on one GPU, so longer runs need
more text. Shipping tens of megabytes in the package is out of the question, and a data-set
hub cannot be reached from our machines; Debian's archive can. Its documentation packages
hold plenty of English prose under free licences, and a package version never changes once
published, so a pinned package plus a deterministic conversion gives the same file, and the
same SHA-256, on every machine.

The conversion, top to bottom:
  1. get the .deb: `apt-get download PACKAGE=VERSION`, or `--from` a .deb or a folder that
     was carried to a machine without network;
  2. read the .deb in pure Python (an `ar` archive holding data.tar.*), so that no dpkg is
     needed, and keep the Sphinx HTML pages under the recipe's folder, in sorted path order;
  3. HTML -> text with the stdlib `html.parser`: only the page's main content (role="main";
     the navigation bars and sidebars repeat on every page), no scripts, styles or "¶" links;
  4. fold Unicode towards ASCII (NFKD, accents dropped, typographic quotes and dashes made
     plain) and drop characters seen fewer than MIN_COUNT times, so that the character
     vocabulary stays near 100 instead of thousands of one-off symbols;
  5. normalise whitespace (runs of spaces -> one, at most one blank line), pages separated by
     one blank line; write atomically and print the size and the SHA-256.

The result depends on the package version and, in principle, on Python's Unicode tables
(step 4); the recipes record the hash of a reference build (Python 3.11) to compare with.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class Recipe:
    package: str  # Debian package
    version: str  # pinned: another version gives another text (and hash)
    root: str  # the folder of Sphinx HTML pages inside the package
    skip: tuple[str, ...]  # paths under root (folders or files, prefix match) that are not prose
    licence: str
    sha256: str = ""  # of the reference build, to tell a reproduced build from a different one
    chars: int = 0


RECIPES = {
    # Python's documentation. Each page says "licensed under the Python Software Foundation
    # License Version 2"; since 3.8.6 the code examples in it are also under the Zero-Clause
    # BSD licence (license.html in the package). About 10M characters: for 20M+ use linuxdocs.
    "pydocs": Recipe(
        package="python3.11-doc", version="3.11.2-6+deb12u8",
        root="usr/share/doc/python3.11/html",
        # indexes and the table of contents are lists of names, not prose
        skip=("_sources/", "_static/", "_images/", "_downloads/", "genindex", "py-modindex",
              "search.html", "contents.html"),
        licence="PSF-2.0 (Python Software Foundation License Version 2; code examples also "
                "0BSD), see license.html in the package",
        sha256="f40490591d996d340610992bece7da2480a356ab073cc08c746716c3b33f1fc1",
        chars=9_228_626),
    # The Linux kernel's documentation (Documentation/, built to HTML by Sphinx). Debian's
    # copyright file says GPL-2; the pages' own SPDX lines (in _sources/) are mostly GPL-2.0,
    # but the media uAPI pages (~350) are GFDL-1.1-no-invariants-or-later (some dual with
    # GPL-2.0), and a few are MIT, BSD-2-Clause or CC-BY-4.0 dual. ~29M characters.
    "linuxdocs": Recipe(
        package="linux-doc-6.1", version="6.1.176-1",
        root="usr/share/doc/linux-doc-6.1/html",
        # translations/ holds Chinese, Japanese, Korean and Italian copies of English pages
        skip=("_sources/", "_static/", "_images/", "_downloads/", "translations/",
              "genindex", "search.html"),
        licence="GPL-2.0 for most pages (the package's copyright file); the media uAPI "
                "pages are GFDL-1.1-no-invariants-or-later; a few MIT/BSD-2-Clause/CC-BY-4.0 "
                "dual (SPDX lines in _sources/)",
        sha256="f7cb5cbe6013f9cb09583a603c8af7e750a30e1d0202f3cca3a27b553b1ba267",
        chars=29_371_634),
}

MIN_COUNT = 200  # a character seen fewer times in the whole corpus is dropped (step 4)
# typographic punctuation NFKD leaves alone, mapped to the ASCII a keyboard types
PLAIN = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                       "\u2013": "-", "\u2014": "--", "\u2212": "-", "\u2026": "...",
                       "\u00a0": " ", "\u00b6": ""})


# --------------------------------------------------------------------------- 1. the package


def fetch_deb(recipe: Recipe, folder: Path) -> Path:
    """`apt-get download PACKAGE=VERSION` into `folder`; the .deb's path."""
    spec = f"{recipe.package}={recipe.version}"
    fix = (f"download {recipe.package}_{recipe.version}_all.deb where apt works (or from "
           f"snapshot.debian.org) and pass --from FILE")
    if shutil.which("apt-get") is None:
        raise UserError(f"apt-get is not available to download {spec}; {fix}")
    done = subprocess.run(["apt-get", "download", spec], cwd=folder, capture_output=True,
                          text=True)
    debs = sorted(folder.glob("*.deb"))
    if done.returncode != 0 or not debs:
        errors = [line for line in done.stderr.splitlines() if line.startswith("E:")]
        why = errors[0][2:].strip() if errors else f"exit code {done.returncode}"
        raise UserError(f"apt-get could not download {spec} ({why}); run `apt-get update` and "
                        f"retry, or {fix}")
    return debs[0]


def _ar_members(blob: bytes, where: str) -> dict[str, bytes]:
    """The members of an `ar` archive (a .deb is one): 8-byte magic, then per member a
    60-byte header (name 16, dates and ids 32, size 10, magic 2) and its data, padded to 2."""
    if not blob.startswith(b"!<arch>\n"):
        raise UserError(f"'{where}' is not a .deb (no ar archive header); give a .deb file or "
                        "a folder of HTML pages")
    members, pos = {}, 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip() or 0)
        members[name] = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _control_field(control_tar: bytes, field: str) -> str:
    with tarfile.open(fileobj=io.BytesIO(control_tar), mode="r:*") as tar:
        for member in tar:
            if member.name.lstrip("./") == "control":
                for line in tar.extractfile(member).read().decode("utf-8").splitlines():
                    if line.startswith(field + ":"):
                        return line.split(":", 1)[1].strip()
    return ""


def pages_from_deb(path: Path, recipe: Recipe) -> tuple[dict[str, bytes], str]:
    """({path under root: HTML bytes}, "package version") of a .deb, read in memory."""
    members = _ar_members(path.read_bytes(), str(path))
    control = next((v for k, v in members.items() if k.startswith("control.tar")), None)
    data_name = next((k for k in members if k.startswith("data.tar")), None)
    if data_name is None:
        raise UserError(f"'{path}' holds no data.tar.*; it is not a complete .deb")
    if data_name.endswith(".zst"):  # Python's tarfile reads gz, xz and bz2 only
        raise UserError(f"'{path}' is compressed with zstd, which Python cannot read; extract it "
                        "with `dpkg-deb -x FILE DIR` and pass --from DIR")
    package = _control_field(control, "Package") if control else ""
    version = _control_field(control, "Version") if control else ""
    if package and package != recipe.package:
        raise UserError(f"'{path}' is the package {package}, not {recipe.package}; pass "
                        f"--from a {recipe.package} .deb")
    pages = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and name.startswith(recipe.root + "/"):
                pages[name[len(recipe.root) + 1:]] = tar.extractfile(member).read()
    return pages, f"{package or recipe.package} {version or '(version unknown)'}"


def pages_from_folder(folder: Path, recipe: Recipe) -> tuple[dict[str, bytes], str]:
    """The same from a folder: an extracted package (`dpkg-deb -x`) or the HTML folder itself."""
    root = folder / recipe.root if (folder / recipe.root).is_dir() else folder
    pages = {p.relative_to(root).as_posix(): p.read_bytes()
             for p in root.rglob("*") if p.is_file()}
    return pages, f"the folder {folder}"


def select(pages: dict[str, bytes], recipe: Recipe) -> list[tuple[str, bytes]]:
    """The prose pages in sorted path order: the order, and so the text, is the same on
    every machine (a folder's listing order is not)."""
    return sorted((p, b) for p, b in pages.items()
                  if p.endswith(".html") and not p.startswith(recipe.skip))


# --------------------------------------------------------------------------- 2. HTML -> text


BLOCKS = {"p", "div", "pre", "li", "dt", "dd", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
          "blockquote", "section", "table", "ul", "ol", "dl", "br", "hr", "caption", "figure"}
SKIPPED = {"head", "script", "style", "noscript", "template", "title"}
VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"}


class _PageText(HTMLParser):
    """The text of one page. Block elements end lines, so paragraphs stay paragraphs. The
    main content is kept apart from the rest: a page without role="main" (not Sphinx) gives
    all its text instead."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.all, self.main = [], []
        self.main_tag, self.main_depth, self.seen_main = "", 0, False
        self.skip_tag, self.skip_depth = "", 0

    def handle_starttag(self, tag, attrs):
        if self.skip_depth:  # inside a skipped element: only count its nesting
            self.skip_depth += tag == self.skip_tag
            return
        a = dict(attrs)
        # "headerlink": Sphinx's "¶" permalink after every heading
        if tag in SKIPPED or "headerlink" in (a.get("class") or "").split():
            if tag not in VOID:
                self.skip_tag, self.skip_depth = tag, 1
            return
        if self.main_depth:
            self.main_depth += tag == self.main_tag
        elif a.get("role") == "main" and not self.seen_main:
            self.main_tag, self.main_depth, self.seen_main = tag, 1, True
        if tag in BLOCKS:
            self._emit("\n")

    def handle_endtag(self, tag):
        if self.skip_depth:
            self.skip_depth -= tag == self.skip_tag
            return
        if tag in BLOCKS:
            self._emit("\n")
        if self.main_depth and tag == self.main_tag:
            self.main_depth -= 1

    def handle_data(self, data):
        if not self.skip_depth:
            self._emit(data)

    def _emit(self, text):
        self.all.append(text)
        if self.main_depth:
            self.main.append(text)


def html_to_text(html: str) -> str:
    parser = _PageText()
    parser.feed(html)
    parser.close()
    return "".join(parser.main if parser.seen_main else parser.all)


# --------------------------------------------------------------------------- 3. characters


def fold(text: str) -> str:
    """Towards ASCII without losing words: NFKD splits "é" into "e" and an accent, which is
    dropped; ligatures and full-width forms become plain letters; quotes and dashes plain."""
    text = unicodedata.normalize("NFKD", text.translate(PLAIN))
    return "".join(c for c in text if not unicodedata.combining(c))


def normalise_whitespace(text: str) -> str:
    """Each line's whitespace runs become one space, lines are stripped, and runs of blank
    lines become one blank line."""
    lines, blank = [], True  # `blank` drops blank lines at the start too
    for line in text.split("\n"):
        line = " ".join(line.split())
        if line or not blank:
            lines.append(line)
        blank = not line
    return "\n".join(lines).strip("\n")


def keep_common(texts: list[str], min_count: int = MIN_COUNT) -> tuple[list[str], int]:
    """Drop every character seen fewer than `min_count` times over all texts, and every
    control character but newline; (the texts, how many distinct characters were dropped)."""
    counts = Counter()
    for t in texts:
        counts.update(t)
    drop = {c for c, n in counts.items()
            if c != "\n" and (n < min_count or not c.isprintable())}
    if not drop:
        return texts, 0
    table = str.maketrans({c: None for c in drop})
    return [t.translate(table) for t in texts], len(drop)


# --------------------------------------------------------------------------- 4. the build


@dataclass
class Built:
    path: Path
    chars: int
    vocab: int
    sha256: str
    pages: int
    source: str
    dropped: int
    seconds: float


def build_text(pages: list[tuple[str, bytes]], min_count: int = MIN_COUNT) -> tuple[str, int]:
    """(the corpus text, distinct characters dropped) from (path, HTML) pages in order."""
    texts = [fold(html_to_text(html.decode("utf-8", errors="replace"))) for _, html in pages]
    texts, dropped = keep_common(texts, min_count)
    texts = [t for t in map(normalise_whitespace, texts) if t]
    return "\n\n".join(texts) + "\n", dropped


def build(name: str, out: Path, source: Path | None = None,
          min_count: int = MIN_COUNT) -> Built:
    """Build corpus `name` into `out`, from `source` (a .deb or a folder) or apt-get."""
    from ..metrics import atomic_write  # (imports torch; the checks above need not wait)

    if name not in RECIPES:
        raise UserError(f"no corpus named '{name}'; choose one of: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; give the path of the text file to write")
    start = time.perf_counter()
    if source is not None:
        source = Path(source)
        if not source.exists():
            raise UserError(f"--from '{source}' does not exist; give a downloaded "
                            f"{recipe.package} .deb or a folder of its HTML pages")
        pages, origin = (pages_from_folder(source, recipe) if source.is_dir()
                         else pages_from_deb(source, recipe))
    else:
        with tempfile.TemporaryDirectory(prefix="loco-corpus-") as tmp:
            pages, origin = pages_from_deb(fetch_deb(recipe, Path(tmp)), recipe)
    selected = select(pages, recipe)
    if not selected:
        raise UserError(f"no HTML pages found under {recipe.root} in '{source}'; give a "
                        f"{recipe.package} .deb or a folder of .html files")
    text, dropped = build_text(selected, min_count)
    blob = text.encode("utf-8")
    atomic_write(out, blob)
    return Built(out, len(text), len(set(text)), hashlib.sha256(blob).hexdigest(),
                 len(selected), origin, dropped, time.perf_counter() - start)
