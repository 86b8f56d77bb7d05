"""`loco corpus build` without network: from a tiny .deb and a folder made here; and the
corpus hash every run records in its config.toml."""

import hashlib
import io
import subprocess
import tarfile
import tomllib

import pytest

from locotrain.cli import main
from locotrain.data import build as corpus_build
from locotrain.data.build import RECIPES, html_to_text

from conftest import TINY

ROOT = RECIPES["pydocs"].root
# each sentence 300 times: every character clears build.MIN_COUNT (200), as in a real corpus
PROSE = ("The quick brown fox jumps over the lazy dog; sphinx of black quartz, judge my vow! "
         "He said \"x = 1, y = 2\" -- 'so' it was. " * 300)


def page(title: str, body: str) -> str:
    """A page shaped like Sphinx's: navigation and a sidebar around the main content."""
    return (f"<html><head><title>{title}</title><style>p {{color: red}}</style></head><body>"
            f"<div class='related'>Navigation: index modules next</div>"
            f"<div class='body' role='main'><h1>{title}<a class='headerlink' href='#x'>\u00b6</a>"
            f"</h1>{body}</div><div class='sphinxsidebar'>Quick search</div>"
            f"<script>var x = 1;</script></body></html>")


PAGES = {  # path under ROOT: HTML
    "library/b.html": page("lazy sphinx", f"<p>{PROSE}</p>"
                           "<p>caf\u00e9 \u201cquoted\u201d \u2018so\u2019 a\u2014b \u2603</p>"),
    "a.html": page("judge quartz",
                   f"<div><p>{PROSE}</p>\n\n\n<pre>x   =   1\n\n\n\ny = 2</pre></div>"),
    "genindex.html": page("Index", "<p>not prose index entry</p>"),
    "_static/basic.html": "<p>not prose static</p>",
}


def tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_deb(path, pages=PAGES, package="python3.11-doc"):
    """A .deb as dpkg builds it: an ar archive of debian-binary, control.tar.*, data.tar.*."""
    control = tar_bytes({"./control": f"Package: {package}\nVersion: 0-test\n".encode()}, "w:gz")
    data = tar_bytes({f"./{ROOT}/{p}": h.encode() for p, h in pages.items()}, "w:xz")
    out = bytearray(b"!<arch>\n")
    for name, blob in [("debian-binary", b"2.0\n"), ("control.tar.gz", control),
                       ("data.tar.xz", data)]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += blob + (b"\n" if len(blob) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def make_folder(folder, pages=PAGES):
    for p, h in reversed(pages.items()):  # another creation order: the build must not care
        (folder / ROOT / p).parent.mkdir(parents=True, exist_ok=True)
        (folder / ROOT / p).write_text(h, encoding="utf-8")
    return folder


def loco(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_html_to_text_keeps_main_content_only():
    text = html_to_text(page("Title &amp; more", "<p>one&nbsp;two</p><p>three</p>"))
    assert "Title & more" in text and "one\u00a0two" in text
    assert "\u00b6" not in text  # Sphinx's permalink
    for chrome in ["Navigation", "Quick search", "var x", "color: red"]:
        assert chrome not in text
    assert text.index("one") < text.index("\n", text.index("one")) < text.index("three")
    # a page without role="main" (not Sphinx): all of its body, still no script or style
    assert html_to_text("<p>plain</p><script>no</script>").strip() == "plain"


def test_build_is_deterministic_and_deb_equals_folder(tmp_path, capsys):
    deb = make_deb(tmp_path / "doc.deb")
    outs = [tmp_path / "one.txt", tmp_path / "two.txt", tmp_path / "three.txt"]
    runs = [loco(["corpus", "build", "pydocs", "--out", str(outs[0]), "--from", str(deb)], capsys),
            loco(["corpus", "build", "pydocs", "--out", str(outs[1]), "--from", str(deb)], capsys),
            loco(["corpus", "build", "pydocs", "--out", str(outs[2]),
                  "--from", str(make_folder(tmp_path / "tree"))], capsys)]
    assert [code for code, _, _ in runs] == [0, 0, 0], runs
    blobs = [p.read_bytes() for p in outs]
    assert blobs[0] == blobs[1] == blobs[2]
    sha = hashlib.sha256(blobs[0]).hexdigest()
    text = blobs[0].decode("utf-8")
    stdout = runs[0][1]
    assert f"sha256 {sha}" in stdout and f"{len(text):,} characters" in stdout
    assert "licence: PSF-2.0" in stdout and "python3.11-doc 0-test" in stdout
    # sorted pages: a.html before library/b.html; index and static pages left out
    assert text.index("judge quartz") < text.index("lazy sphinx") and "not prose" not in text
    assert "Navigation" not in text and "\u00b6" not in text
    # folded to ASCII, rare characters (the snowman) dropped, whitespace normalised
    assert 'cafe "quoted" \'so\' a--b' in text and "\u2603" not in text
    assert "x = 1\n\ny = 2" in text and "\n\n\n" not in text and "  " not in text
    assert len(set(text)) < 60
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_bad_sources_fail_in_one_line(tmp_path, capsys):
    cases = [
        (["nope"], "no corpus named 'nope'"),
        (["pydocs", "--from", str(tmp_path / "missing.deb")], "does not exist"),
        (["pydocs", "--from", str(make_deb(tmp_path / "k.deb", package="linux-doc-6.1"))],
         "is the package linux-doc-6.1, not python3.11-doc"),
        (["pydocs", "--from", str(make_deb(tmp_path / "empty.deb", pages={}))], "no HTML pages"),
    ]
    (tmp_path / "junk.deb").write_bytes(b"not an archive")
    cases.append((["pydocs", "--from", str(tmp_path / "junk.deb")], "is not a .deb"))
    for args, message in cases:
        code, _, err = loco(["corpus", "build", *args, "--out", str(tmp_path / "c.txt")], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "c.txt").exists()


def test_download_failure_names_problem_and_fix(tmp_path, capsys, monkeypatch):
    """No network here, so apt-get is replaced: first missing, then failing as it does
    offline."""
    argv = ["corpus", "build", "pydocs", "--out", str(tmp_path / "c.txt")]
    monkeypatch.setattr(corpus_build.shutil, "which", lambda name: None)
    code, _, err = loco(argv, capsys)
    assert code == 2 and "apt-get is not available" in err and "--from FILE" in err
    assert err.count("\n") == 1

    def offline(cmd, **kwargs):
        assert cmd == ["apt-get", "download", "python3.11-doc=3.11.2-6+deb12u8"]
        return subprocess.CompletedProcess(cmd, 100, "", "W: something\nE: Failed to fetch "
                                           "http://deb.debian.org/... Temporary failure\n")

    monkeypatch.setattr(corpus_build.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(corpus_build.subprocess, "run", offline)
    code, _, err = loco(argv, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "Failed to fetch" in err and "apt-get update" in err and "--from FILE" in err


def test_run_records_the_corpus_hash_and_refuses_another_text(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    loco(["corpus", "build", "pydocs", "--out", str(corpus),
          "--from", str(make_folder(tmp_path / "tree"))], capsys)
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    sets = []
    for o in TINY + [f"data.path={corpus}"]:
        sets += ["--set", o]
    out = tmp_path / "run"
    code, stdout, err = loco(["run", "--quiet", "--out", str(out), *sets], capsys)
    assert code == 0, err
    data = tomllib.loads((out / "config.toml").read_text())["data"]
    assert data["sha256"] == sha and data["chars"] == len(corpus.read_text(encoding="utf-8"))

    # the run's own config on the same file is accepted; on a changed file it is refused
    from locotrain.config import load_config
    from locotrain.setup import build

    build(load_config(str(out / "config.toml"))[1])
    corpus.write_text(corpus.read_text() + "more text\n", encoding="utf-8")
    code, _, err = loco(["run", str(out / "config.toml"), "--out", str(tmp_path / "again")],
                        capsys)
    assert code == 2 and err.count("\n") == 1 and f"sha256 {sha[:16]}" not in err
    assert f"data.sha256 = {sha[:16]}" in err and 'data.sha256 = ""' in err
    assert not (tmp_path / "again").exists()
    code, _, err = loco(["run", "--out", str(tmp_path / "again"), *sets,
                         "--set", "data.chars=5"], capsys)
    assert code == 2 and "data.chars = 5" in err and err.count("\n") == 1


def test_tiny_shakespeare_hash_is_recorded(tiny):
    from locotrain.config import to_toml
    from locotrain.setup import build

    cfg = tiny()
    build(cfg)
    assert cfg.data.chars == 1_115_394
    assert ('sha256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"'
            in to_toml(cfg))
    bad = tiny("data.sha256=" + "0" * 64)
    with pytest.raises(Exception, match="does not|not the text"):
        build(bad)
