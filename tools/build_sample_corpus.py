"""Build ``pipeline/sample_data/corpus.jsonl`` (and its ``LICENSE.md``) from real text.

The sample corpus that ships inside the package is made only of human-written
text taken from permissively licensed sources:

* translated message catalogues (``.po`` files) from the Sphinx wheel
  (BSD-2-Clause) and the Django wheel (BSD-3-Clause), in ~26 languages and
  many scripts;
* English docstrings from the CPython standard library (PSF-2.0), which give
  the medium and the long (3,000-20,000 character) documents;
* a handful of "edge" rows built from the same real text that exercise emoji
  (astral-plane characters, variation selectors), NFD-decomposed accents
  (combining marks), right-to-left text with embedded Latin, and mixed-script
  lines.

Output is deterministic: inputs are read in sorted order, every random choice
comes from ``random.Random(SEED)``, and the JSON is written with
``ensure_ascii=False`` and ``\\n`` line endings.  Given the same wheels and the
same standard library, the output is identical byte for byte.

How to run (from the repository root)::

    mkdir -p /tmp/wheels
    pip download --no-deps -d /tmp/wheels sphinx==9.0.4 django==5.2.19
    python tools/build_sample_corpus.py /tmp/wheels

Positional arguments are wheel files or directories holding them (exactly one
``sphinx-*.whl`` and one ``django-*.whl`` must be found).  The standard library
defaults to the running interpreter's (``sysconfig`` "stdlib" path; the shipped
file was built with CPython 3.11.7, whose stdlib includes ``test/``); override
with ``--stdlib-dir``.  ``--out-dir`` defaults to ``pipeline/sample_data`` next
to this script.  Do not install the wheels: they are only read as zip files.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import platform
import random
import re
import sys
import sysconfig
import unicodedata
import zipfile
from collections import Counter
from pathlib import Path

SEED = 20240611

# Languages taken from the .po catalogues: canonical tag -> (name, sphinx locale, django locale).
# A locale of None means that package has no (usable) catalogue for the language.
LANGS: dict[str, tuple[str, str | None, str | None]] = {
    "zh_CN": ("Chinese (Simplified)", "zh_CN", "zh_Hans"),
    "zh_TW": ("Chinese (Traditional)", "zh_TW", "zh_Hant"),
    "ja": ("Japanese", "ja", "ja"),
    "ko": ("Korean", "ko", "ko"),
    "ar": ("Arabic", "ar", "ar"),
    "he": ("Hebrew", "he", "he"),
    "fa": ("Persian", "fa", "fa"),
    "ru": ("Russian", "ru", "ru"),
    "uk": ("Ukrainian", "uk_UA", "uk"),
    "el": ("Greek", "el", "el"),
    "hi": ("Hindi", "hi", "hi"),
    "bn": ("Bengali", "bn", "bn"),
    "ta": ("Tamil", None, "ta"),
    "th": ("Thai", None, "th"),
    "ka": ("Georgian", "ka", "ka"),
    "hy": ("Armenian", None, "hy"),
    "de": ("German", "de", "de"),
    "fr": ("French", "fr", "fr"),
    "es": ("Spanish", "es", "es"),
    "pt_BR": ("Portuguese (Brazil)", "pt_BR", "pt_BR"),
    "it": ("Italian", "it", "it"),
    "pl": ("Polish", "pl", "pl"),
    "cs": ("Czech", "cs", "cs"),
    "sv": ("Swedish", "sv", "sv"),
    "tr": ("Turkish", "tr", "tr"),
    "vi": ("Vietnamese", "vi", "vi"),
}
ROWS_PER_LANG = 85  # short/medium rows per language (both packages together)
LONG_PO_LANGS = list(LANGS)  # one long document (3,000-6,000 characters) per language with enough text

# Standard-library modules (paths relative to the stdlib dir).
# LONG: all docstrings of the module, in source order, cut into 3,000-20,000 character documents.
STDLIB_LONG = [
    "argparse.py", "asyncio/tasks.py", "bisect.py", "calendar.py", "codecs.py", "collections/__init__.py",
    "configparser.py", "contextlib.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "doctest.py",
    "email/message.py", "enum.py", "fractions.py", "functools.py", "gettext.py", "heapq.py", "http/client.py",
    "inspect.py", "ipaddress.py", "json/__init__.py", "logging/__init__.py", "mailbox.py", "optparse.py",
    "pathlib.py", "pickle.py", "pprint.py", "random.py", "shutil.py", "statistics.py", "string.py",
    "subprocess.py", "tarfile.py", "textwrap.py", "threading.py", "typing.py", "unittest/case.py",
    "urllib/parse.py", "zipfile.py", "turtle.py", "tkinter/__init__.py", "xml/etree/ElementTree.py",
    "http/cookiejar.py", "urllib/request.py", "socket.py", "ssl.py", "concurrent/futures/_base.py", "pydoc.py",
    "platform.py",
]
LONG_CHUNKS_PER_MODULE = 4
# SPLIT: each docstring (module, class, function, method) is a candidate row.
STDLIB_SPLIT = [
    "_pydecimal.py", "abc.py", "ast.py", "base64.py", "cmd.py", "copy.py", "dis.py", "email/utils.py",
    "fnmatch.py", "ftplib.py", "getopt.py", "glob.py", "gzip.py", "hashlib.py", "hmac.py", "imaplib.py",
    "locale.py", "mimetypes.py", "numbers.py", "operator.py", "os.py", "pdb.py", "poplib.py", "queue.py",
    "sched.py", "secrets.py", "selectors.py", "shlex.py", "smtplib.py", "socketserver.py", "tempfile.py",
    "timeit.py", "tokenize.py", "trace.py", "traceback.py", "uuid.py", "warnings.py", "weakref.py",
]
STDLIB_SPLIT_ROWS = 760
STDLIB_SPLIT_PER_MODULE = 40  # cap, so that no single module dominates

# Edge rows: real strings, located by file and an exact substring of the literal.
EDGE_EMOJI = [
    ("stdlib", "test/test_logging.py", "\U0001f602: \u2603\ufe0f: The \u00d8resund Bridge"),
    ("stdlib", "test/test_minidom.py", "Don't let entities make you frown \u263a"),
    ("django", "django/utils/encoding.py", "Take an IRI (string or UTF-8 bytes, e.g. '/I \u2665 Django/'"),
]

MIN_LEN = 12
MAX_LEN = 20_000
LONG_MIN = 3_000


# --------------------------------------------------------------------------- .po parsing


_PO_LINE = re.compile(r'^(msgctxt|msgid_plural|msgid|msgstr(?:\[\d+\])?)\s+(".*")$')


def parse_po(text: str) -> list[tuple[str, str]]:
    """Return (msgid, msgstr) pairs in file order; skip header, fuzzy, obsolete and untranslated entries.

    An entry starts at its first comment or keyword line after the previous entry's msgstr.
    For plural entries msgstr[0] is taken.
    """
    out: list[tuple[str, str]] = []
    cur: dict[str, str] = {}
    fuzzy = False
    field: str | None = None

    def flush() -> None:
        msgid = cur.get("msgid", "")
        msgstr = cur.get("msgstr", cur.get("msgstr[0]", ""))
        if msgid and msgstr and not fuzzy:
            out.append((msgid, msgstr))

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#~"):  # blank or obsolete
            continue
        m = _PO_LINE.match(line)
        starts_entry = line.startswith("#") or (m is not None and m.group(1) in ("msgctxt", "msgid"))
        if starts_entry and field is not None and field.startswith("msgstr"):
            flush()
            cur, field, fuzzy = {}, None, False
        if line.startswith("#"):
            if line.startswith("#,") and "fuzzy" in line:
                fuzzy = True
            continue
        if m:
            kw, lit = m.groups()
            cur[kw] = ast.literal_eval(lit)
            field = kw
        elif line.startswith('"') and field:
            cur[field] += ast.literal_eval(line)
    if field is not None:
        flush()
    return out


def clean(s: str) -> str:
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = "\n".join(x.rstrip() for x in s.split("\n"))
    return s.strip()


def po_messages(zf: zipfile.ZipFile, package: str, locale: str) -> list[str]:
    """Translated strings of one locale, in file order, from all catalogues of the package (sorted)."""
    names = sorted(
        n
        for n in zf.namelist()
        if n.endswith(".po") and f"/locale/{locale}/LC_MESSAGES/" in n and n.startswith(f"{package}/")
    )
    msgs: list[str] = []
    for n in names:
        for msgid, msgstr in parse_po(zf.read(n).decode("utf-8")):
            s = clean(msgstr)
            if len(s) < 2 or s == clean(msgid):
                continue
            msgs.append(s)
    return msgs


def po_pairs(zf: zipfile.ZipFile, package: str, locale: str) -> dict[str, str]:
    names = sorted(
        n
        for n in zf.namelist()
        if n.endswith(".po") and f"/locale/{locale}/LC_MESSAGES/" in n and n.startswith(f"{package}/")
    )
    pairs: dict[str, str] = {}
    for n in names:
        for msgid, msgstr in parse_po(zf.read(n).decode("utf-8")):
            pairs.setdefault(clean(msgid), clean(msgstr))
    return pairs


def dedupe(msgs: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for m in msgs:
        if m not in seen:
            seen.add(m)
            out.append(m)
    return out


def group_messages(msgs: list[str], rng: random.Random) -> list[str]:
    """Group consecutive messages into short rows (1 message) and paragraph-like rows (2-8 messages)."""
    rows = []
    i = 0
    while i < len(msgs):
        k = rng.choices([1, 2, 3, 4, 6, 8], weights=[40, 18, 12, 10, 10, 10])[0]
        chunk = msgs[i : i + k]
        i += k
        # Single-line messages read like sentences when joined by spaces; multi-line ones keep their breaks.
        sep = "\n" if any("\n" in c for c in chunk) else " "
        text = sep.join(chunk)
        if len(text) >= MIN_LEN:
            rows.append(text)
    return rows


# --------------------------------------------------------------------------- stdlib docstrings


def docstrings(path: Path) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) for the module and every class/function, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}" if prefix else child.name
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    out.append((name, clean(doc)))
                visit(child, name)

    mod_doc = ast.get_docstring(tree, clean=True)
    if mod_doc:
        out.append(("", clean(mod_doc)))
    visit(tree, "")
    return out


def module_name(rel: str) -> str:
    name = rel[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def module_id(rel: str) -> str:
    return re.sub(r"_+", "_", module_name(rel).replace(".", "_")).strip("_")


def long_target(rng: random.Random) -> int:
    """Log-uniform document length between LONG_MIN and 18,000 characters (most near the low end)."""
    return round(math.exp(rng.uniform(math.log(LONG_MIN), math.log(18_000))))


def long_chunks(rel: str, docs: list[tuple[str, str]], rng: random.Random) -> list[str]:
    mod = module_name(rel)
    parts = []
    for name, doc in docs:
        title = mod if not name else f"{mod}.{name}"
        parts.append(f"{title}\n\n{doc}")
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    target = long_target(rng)
    for p in parts:
        if len(p) > MAX_LEN:
            continue
        if size + len(p) + 2 > MAX_LEN:
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
        if size >= target:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
            target = long_target(rng)
            if len(chunks) == LONG_CHUNKS_PER_MODULE:
                break
    return chunks


# --------------------------------------------------------------------------- edge rows


def string_literal_containing(source: str, needle: str) -> str:
    """The first string literal (or docstring) in ``source`` that contains ``needle``, as written in the source.

    The literal's source text (quotes removed, escapes such as ``\\xe2`` left as typed) is used rather than its
    value, so that no control characters produced by escape sequences end up in the corpus.
    """
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and needle in node.value:
            seg = ast.get_source_segment(source, node) or ""
            m = re.fullmatch(r'[rRuU]?("""|\'\'\'|"|\')(.*)\1', seg, re.S)
            if not m:
                raise SystemExit(f"unexpected literal form: {seg[:80]!r}")
            return clean(inspect.cleandoc(m.group(2)))
    raise SystemExit(f"edge string not found: {needle!r}")


def edge_rows(
    zfs: dict[str, zipfile.ZipFile], stdlib: Path, pairs: dict[str, dict[str, str]], pools: dict[str, list[str]]
) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for src, rel, needle in EDGE_EMOJI:
        source = zfs[src].read(rel).decode("utf-8") if src in zfs else (stdlib / rel).read_text(encoding="utf-8")
        rows.append(("emoji", string_literal_containing(source, needle)))

    # NFD: longest accented Vietnamese and French messages, decomposed into base letters + combining marks.
    for lang in ("vi", "fr"):
        cands = [m for m in pools[lang] if unicodedata.normalize("NFD", m) != m and 120 <= len(m) <= 600]
        cands.sort(key=lambda m: (-len(m), m))
        rows.append(("nfd", unicodedata.normalize("NFD", " ".join(cands[:3]))))

    # Right-to-left text with embedded left-to-right Latin runs (bidi).
    for lang in ("ar", "he"):
        cands = [m for m in pools[lang] if re.search(r"[A-Za-z]{3,}", m) and 60 <= len(m) <= 400]
        cands.sort(key=lambda m: (-len(re.findall(r"[A-Za-z]{3,}", m)), m))
        rows.append(("rtl", " ".join(cands[:3])))

    # Mixed script: one English message and its translations, on one line each joined by " / ".
    order = ["zh_CN", "ja", "ko", "ar", "he", "ru", "el", "hi", "th", "ka", "hy", "ta"]
    for msgid in ("Search", "Change password"):
        parts = [msgid] + [pairs[lang][msgid] for lang in order if pairs[lang].get(msgid)]
        rows.append(("mixed", " / ".join(parts)))
    return rows


# --------------------------------------------------------------------------- main


def find_wheels(args: list[str]) -> dict[str, Path]:
    files: list[Path] = []
    for a in args:
        p = Path(a)
        files.extend(sorted(p.glob("*.whl")) if p.is_dir() else [p])
    found: dict[str, Path] = {}
    for pkg in ("sphinx", "django"):
        hits = [f for f in files if f.name.lower().startswith(pkg + "-")]
        if len(hits) != 1:
            raise SystemExit(f"need exactly one {pkg}-*.whl, found {[str(h) for h in hits]}")
        found[pkg] = hits[0]
    return found


def wheel_version(path: Path) -> str:
    return path.name.split("-")[1]


def copyright_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().lower().startswith("copyright (c)")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheels", nargs="+", help="sphinx-*.whl and django-*.whl, or directories containing them")
    ap.add_argument("--stdlib-dir", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent.parent / "pipeline" / "sample_data"))
    a = ap.parse_args(argv)

    wheels = find_wheels(a.wheels)
    zfs = {pkg: zipfile.ZipFile(p) for pkg, p in wheels.items()}
    stdlib = Path(a.stdlib_dir)
    rng = random.Random(SEED)

    rows: list[tuple[str, str, str]] = []  # (source, tag, text)

    # ---- .po catalogues
    pools: dict[str, list[str]] = {}
    pairs: dict[str, dict[str, str]] = {}
    for lang, (_name, sph, dj) in LANGS.items():
        per_src = {}
        for pkg, loc in (("sphinx", sph), ("django", dj)):
            per_src[pkg] = dedupe(po_messages(zfs[pkg], pkg, loc)) if loc else []
        pools[lang] = per_src["sphinx"] + per_src["django"]
        pairs[lang] = {}
        for pkg, loc in (("django", dj), ("sphinx", sph)):
            if loc:
                for k, v in po_pairs(zfs[pkg], pkg, loc).items():
                    pairs[lang].setdefault(k, v)

        # One long document per language, from consecutive messages of the package with more text, only if
        # that leaves most of the language's text for the short rows.
        used_long: set[int] = set()
        long_pkg = max(("sphinx", "django"), key=lambda pkg: (sum(map(len, per_src[pkg])), pkg))
        if lang in LONG_PO_LANGS:
            msgs = per_src[long_pkg]
            target = rng.randint(LONG_MIN, 6_000)
            if sum(map(len, msgs)) >= 3 * target:
                start = rng.randrange(0, max(1, len(msgs) // 2))
                acc, idx, size = [], [], 0
                for i in range(start, len(msgs)):
                    acc.append(msgs[i])
                    idx.append(i)
                    size += len(msgs[i]) + 1
                    if size >= target:
                        break
                if size >= LONG_MIN:
                    used_long.update(idx)
                    rows.append((long_pkg, LANGS_LOCALE(lang, long_pkg), "\n".join(acc)))

        cands: list[tuple[str, str]] = []
        for pkg in ("sphinx", "django"):
            msgs = per_src[pkg]
            if pkg == long_pkg and used_long:
                msgs = [m for i, m in enumerate(msgs) if i not in used_long]
            cands.extend((pkg, t) for t in group_messages(msgs, rng))
        picked = sorted(rng.sample(range(len(cands)), min(ROWS_PER_LANG, len(cands))))
        for i in picked:
            pkg, text = cands[i]
            rows.append((pkg, LANGS_LOCALE(lang, pkg), text))

    # ---- stdlib
    for rel in STDLIB_LONG:
        for text in long_chunks(rel, docstrings(stdlib / rel), rng):
            rows.append(("stdlib", module_id(rel), text))
    split: list[tuple[str, str]] = []
    for rel in STDLIB_SPLIT:
        docs = [doc for _name, doc in docstrings(stdlib / rel) if MIN_LEN <= len(doc) <= MAX_LEN]
        keep = sorted(rng.sample(range(len(docs)), min(STDLIB_SPLIT_PER_MODULE, len(docs))))
        split.extend((module_id(rel), docs[i]) for i in keep)
    for i in sorted(rng.sample(range(len(split)), min(STDLIB_SPLIT_ROWS, len(split)))):
        rows.append(("stdlib", split[i][0], split[i][1]))

    # ---- edge rows
    for kind, text in edge_rows(zfs, stdlib, pairs, pools):
        rows.append(("edge", kind, text))

    # ---- ids (counter per source-tag, in generation order), then a seeded shuffle
    counters: Counter[tuple[str, str]] = Counter()
    records = []
    seen_text: set[str] = set()
    for src, tag, text in rows:
        if not text or text in seen_text:
            continue
        seen_text.add(text)
        counters[(src, tag)] += 1
        records.append({"id": f"{src}-{tag}-{counters[(src, tag)]:04d}", "text": text})
    rng.shuffle(records)

    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "corpus.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    (out_dir / "LICENSE.md").write_text(license_md(records, wheels, zfs, stdlib), encoding="utf-8", newline="\n")
    print(f"wrote {len(records)} rows to {out_dir / 'corpus.jsonl'}", file=sys.stderr)
    return 0


def LANGS_LOCALE(lang: str, pkg: str) -> str:  # noqa: N802 - small helper
    """The upstream locale code used in ids, e.g. ``django-zh_Hans`` / ``sphinx-zh_CN``."""
    _name, sph, dj = LANGS[lang]
    loc = sph if pkg == "sphinx" else dj
    assert loc is not None
    return loc


def lang_of(rid: str) -> str:
    src, tag, _n = rid.rsplit("-", 2)
    if src == "stdlib":
        return "en"
    if src == "edge":
        return f"edge:{tag}"
    for lang, (_name, sph, dj) in LANGS.items():
        if tag == (sph if src == "sphinx" else dj):
            return lang
    raise ValueError(rid)


def license_md(records: list[dict], wheels: dict[str, Path], zfs: dict[str, zipfile.ZipFile], stdlib: Path) -> str:
    sph_v, dj_v = wheel_version(wheels["sphinx"]), wheel_version(wheels["django"])
    sph_lic = zfs["sphinx"].read(f"sphinx-{sph_v}.dist-info/licenses/LICENSE.rst").decode("utf-8")
    dj_lic = zfs["django"].read(f"django-{dj_v}.dist-info/licenses/LICENSE").decode("utf-8")
    py_lic = (stdlib / "LICENSE.txt").read_text(encoding="utf-8")
    m = re.search(r'"(Copyright \(c\) 2001,.*?Python Software Foundation;\s*All Rights Reserved)"', py_lic, re.S)
    psf_line = " ".join(m.group(1).split()) if m else "Copyright (c) 2001 Python Software Foundation; All Rights Reserved"
    py_ver = platform.python_version() if Path(sysconfig.get_paths()["stdlib"]) == stdlib else "(see --stdlib-dir)"

    by_lang: Counter[str] = Counter(lang_of(r["id"]) for r in records)
    by_src: Counter[str] = Counter(r["id"].split("-", 1)[0] for r in records)
    lengths = sorted(len(r["text"]) for r in records)
    n_long = sum(1 for x in lengths if x >= LONG_MIN)
    names = {lang: v[0] for lang, v in LANGS.items()}
    names["en"] = "English"

    lines = [
        "# Sample corpus: contents and licences",
        "",
        "`corpus.jsonl` is a small multilingual corpus of real, human-written text used as the input of",
        "embedpipe's embedded default job. Each line is a JSON object `{\"id\": ..., \"text\": ...}` (UTF-8).",
        "Ids are `<source>-<locale or module>-<counter>`, e.g. `sphinx-zh_CN-0042`, `django-ar-0007`,",
        "`stdlib-json-0003`; the edge rows are `edge-<kind>-<counter>`.",
        "",
        "It is generated, byte for byte, by `tools/build_sample_corpus.py` (see its docstring):",
        "",
        "```",
        f"pip download --no-deps -d /tmp/wheels sphinx=={sph_v} django=={dj_v}",
        "python tools/build_sample_corpus.py /tmp/wheels",
        "```",
        "",
        f"Rows: {len(records)}; rows of {LONG_MIN:,} characters or more: {n_long}; "
        f"characters per row: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}.",
        "",
        "## Sources",
        "",
        f"### Sphinx {sph_v} — BSD-2-Clause ({by_src['sphinx']} rows)",
        "",
        f"Translated messages (`msgstr`) from `sphinx/locale/<locale>/LC_MESSAGES/sphinx.po` in the wheel",
        f"`{wheels['sphinx'].name}`. Fuzzy, untranslated and identical-to-English entries are skipped;",
        "consecutive messages of one locale are grouped into short paragraphs. The catalogues are",
        "\"distributed under the same license as the Sphinx project\"; the translators are credited in each",
        "catalogue's header.",
        "",
        *[f"    {c}" for c in copyright_lines(sph_lic)],
        "",
        "Licence: BSD-2-Clause (full text in the wheel's `LICENSE.rst`).",
        "",
        f"### Django {dj_v} — BSD-3-Clause ({by_src['django']} rows)",
        "",
        "Translated messages from `django/conf/locale/<locale>/LC_MESSAGES/django.po`,",
        "`django/contrib/*/locale/<locale>/LC_MESSAGES/django.po` and `djangojs.po` in the wheel",
        f"`{wheels['django'].name}`, processed as above, plus one docstring (`django/utils/encoding.py`,",
        "`iri_to_uri`) used as an edge row. The catalogues are \"distributed under the same license as the",
        "Django package\" (translators are credited in each catalogue's header):",
        "",
        *[f"    {c}" for c in copyright_lines(dj_lic)],
        "",
        "Licence: BSD-3-Clause (full text in the wheel's `LICENSE`).",
        "",
        f"### Python standard library (CPython {py_ver}) — PSF-2.0 ({by_src['stdlib']} rows)",
        "",
        "English docstrings (module, class, function and method) read with `ast` from these stdlib modules.",
        f"Long documents ({LONG_MIN:,}-{MAX_LEN:,} characters: the docstrings of one module in source order, each",
        "headed by its qualified name): " + ", ".join(f"`{r}`" for r in STDLIB_LONG) + ".",
        "Single docstrings: " + ", ".join(f"`{r}`" for r in STDLIB_SPLIT) + ".",
        "Two string literals from `test/test_logging.py` and `test/test_minidom.py` are used as edge rows.",
        "",
        f"    {psf_line}",
        "",
        "Licence: Python Software Foundation License Version 2 (PSF-2.0; full text in `LICENSE.txt` of the",
        "CPython distribution).",
        "",
        f"### Edge rows ({by_src['edge']} rows)",
        "",
        "Built only from the text above, to exercise tokenizer corner cases: `edge-emoji-*` (emoji, astral-plane",
        "characters and a variation selector, verbatim from the sources), `edge-nfd-*` (Vietnamese and French",
        "messages converted to Unicode NFD, i.e. base letters plus combining marks), `edge-rtl-*` (Arabic and",
        "Hebrew messages with embedded Latin words), `edge-mixed-*` (one English message followed by its",
        "translations in several scripts, joined with ` / `).",
        "",
        "## Rows per language",
        "",
        "| language | tag | rows |",
        "|---|---|---:|",
    ]
    for lang, n in sorted(by_lang.items(), key=lambda kv: (kv[0].startswith("edge"), -kv[1], kv[0])):
        label = f"edge rows ({lang.split(':', 1)[1]})" if lang.startswith("edge:") else names[lang]
        lines.append(f"| {label} | {lang} | {n} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
