"""Build the embedded calibration/eval text corpus from Python stdlib docstrings.

llmc must calibrate and evaluate compressed models without network access, so it
ships its own English-like text. Docstrings of the standard library are a good
fit: they are free to redistribute (PSF licence), are natural prose mixed with
code, and can be regenerated from any Python installation with no download.

The split between ``train`` and ``heldout`` is made per *module* with a stable
hash, so that held-out text comes from modules the tiny model never saw.

Run with the project venv::

    /work/venv/bin/python scripts/build_stdlib_corpus.py
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import inspect
import io
import json
import sys
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "llmc" / "assets" / "stdlib_docs"

# Docstrings shorter than this are mostly one-word stubs ("Return self.") that
# add repetition without adding language.
MIN_CHARS = 40

# Percentage of modules that go to the held-out split.
HELDOUT_PERCENT = 10

# A fixed list, so the corpus does not depend on what happens to be installed
# or on directory listing order. Deliberately excluded: modules with import
# side effects (antigravity, this, rlcompleter), GUI stacks (tkinter, turtle,
# turtledemo, idlelib), test packages, codec tables (encodings.*), data-only
# modules (pydoc_data) and packages that write files on import (lib2to3) or are
# huge legacy trees (distutils). Entries that fail to import on the running
# platform (e.g. Windows-only ones) are skipped at run time.
MODULES: tuple[str, ...] = tuple(
    sorted(
        """
        abc aifc argparse ast asynchat asyncio asyncio.base_events
        asyncio.base_futures asyncio.base_subprocess asyncio.base_tasks
        asyncio.coroutines asyncio.events asyncio.exceptions
        asyncio.format_helpers asyncio.futures asyncio.locks asyncio.mixins
        asyncio.proactor_events asyncio.protocols asyncio.queues asyncio.runners
        asyncio.selector_events asyncio.sslproto asyncio.staggered asyncio.streams
        asyncio.subprocess asyncio.taskgroups asyncio.tasks asyncio.threads
        asyncio.timeouts asyncio.transports asyncio.trsock asyncio.unix_events
        asyncore base64 bdb bisect bz2 cProfile calendar cgi cgitb chunk cmd code
        codecs codeop collections collections.abc colorsys compileall
        concurrent.futures concurrent.futures._base concurrent.futures.process
        concurrent.futures.thread configparser contextlib contextvars copy copyreg
        csv ctypes ctypes.util dataclasses datetime dbm dbm.dumb decimal difflib
        dis doctest email email._encoded_words email._header_value_parser
        email._parseaddr email._policybase email.base64mime email.charset
        email.contentmanager email.encoders email.errors email.feedparser
        email.generator email.header email.headerregistry email.iterators
        email.message email.mime.application email.mime.audio email.mime.base
        email.mime.image email.mime.message email.mime.multipart
        email.mime.nonmultipart email.mime.text email.parser email.policy
        email.quoprimime email.utils enum filecmp fileinput fnmatch fractions
        ftplib functools genericpath getopt getpass gettext glob graphlib gzip
        hashlib heapq hmac html html.entities html.parser http http.client
        http.cookiejar http.cookies http.server imaplib imghdr importlib
        importlib._bootstrap importlib._bootstrap_external importlib.abc
        importlib.machinery importlib.metadata importlib.metadata._adapters
        importlib.metadata._collections importlib.metadata._functools
        importlib.metadata._itertools importlib.metadata._meta
        importlib.metadata._text importlib.readers importlib.resources
        importlib.resources._adapters importlib.resources._common
        importlib.resources._legacy importlib.resources.abc
        importlib.resources.readers importlib.resources.simple importlib.util
        inspect io ipaddress json json.decoder json.encoder json.scanner keyword
        linecache locale logging logging.config logging.handlers lzma mailbox
        mailcap mimetypes modulefinder multiprocessing multiprocessing.connection
        multiprocessing.context multiprocessing.dummy multiprocessing.forkserver
        multiprocessing.heap multiprocessing.managers multiprocessing.pool
        multiprocessing.popen_fork multiprocessing.process multiprocessing.queues
        multiprocessing.reduction multiprocessing.resource_sharer
        multiprocessing.resource_tracker multiprocessing.shared_memory
        multiprocessing.sharedctypes multiprocessing.spawn
        multiprocessing.synchronize multiprocessing.util netrc nntplib ntpath
        numbers opcode operator optparse os pathlib pdb pickle pickletools pipes
        pkgutil platform plistlib poplib posixpath pprint profile pstats pty
        py_compile pyclbr pydoc queue quopri random re re._compiler re._parser
        reprlib runpy sched secrets selectors shelve shlex shutil signal site
        smtpd smtplib sndhdr socket socketserver sqlite3 sqlite3.dump sre_compile
        sre_parse ssl stat statistics string stringprep struct subprocess sunau
        symtable sysconfig tabnanny tarfile telnetlib tempfile textwrap threading
        timeit token tokenize tomllib tomllib._parser trace traceback
        tracemalloc tty types typing unittest unittest.async_case unittest.case
        unittest.loader unittest.main unittest.mock unittest.result
        unittest.runner unittest.signals unittest.suite unittest.util urllib
        urllib.error urllib.parse urllib.request urllib.response
        urllib.robotparser uu uuid venv warnings wave weakref webbrowser wsgiref
        wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.types
        wsgiref.util wsgiref.validate xdrlib xml.dom xml.dom.domreg
        xml.dom.expatbuilder xml.dom.minicompat xml.dom.minidom xml.dom.pulldom
        xml.dom.xmlbuilder xml.etree.ElementInclude xml.etree.ElementPath
        xml.etree.ElementTree xml.sax xml.sax._exceptions xml.sax.expatreader
        xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client
        xmlrpc.server zipapp zipfile zipimport zoneinfo zoneinfo._common
        zoneinfo._tzpath zoneinfo._zoneinfo
        """.split()
    )
)

# Guard against someone adding a dangerous module to the list above.
FORBIDDEN_PREFIXES = ("antigravity", "this", "idlelib", "tkinter", "turtle", "test", "lib2to3")


def is_heldout(module_name: str) -> bool:
    """Decide the split from the module name alone.

    crc32 is stable across runs and Python versions (unlike ``hash()``), so a
    module always lands in the same split.
    """
    return zlib.crc32(module_name.encode("utf-8")) % 100 < HELDOUT_PERCENT


def _owned_by(obj: Any, module_name: str) -> bool:
    """True when *obj* belongs to *module_name* rather than being re-exported.

    C accelerators (``_heapq`` for ``heapq`` ...) report the private module, so
    they are accepted too; otherwise the pure-Python docs of such modules would
    be lost.
    """
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    short = module_name.rsplit(".", 1)[-1]
    return owner in (module_name, "_" + short, "_py" + short)


def _raw_doc(obj: Any) -> str | None:
    """The object's own docstring, never one inherited from a base class."""
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__")
    else:
        doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _unwrap_member(value: Any) -> Any | None:
    """Map class-dict entries to the object carrying the docstring."""
    if isinstance(value, (staticmethod, classmethod)):
        return value.__func__
    if isinstance(value, property):
        return value
    if inspect.isfunction(value) or inspect.isclass(value):
        return value
    if inspect.ismethoddescriptor(value) or inspect.isbuiltin(value):
        return value
    return None


def _walk_class(cls: type, module_name: str, seen: set[int]) -> Iterator[tuple[str, str]]:
    if id(cls) in seen:
        return
    seen.add(id(cls))
    qual = cls.__qualname__
    doc = _raw_doc(cls)
    if doc:
        yield f"{module_name}.{qual}", doc
    for name in sorted(vars(cls)):
        member = _unwrap_member(vars(cls)[name])
        if member is None or id(member) in seen:
            continue
        if inspect.isclass(member):
            # Only classes actually nested here, not attributes pointing elsewhere.
            if member.__qualname__.startswith(qual + ".") and _owned_by(member, module_name):
                yield from _walk_class(member, module_name, seen)
            continue
        seen.add(id(member))
        doc = _raw_doc(member)
        if doc:
            yield f"{module_name}.{qual}.{name}", doc


def iter_module_docs(module: ModuleType) -> Iterator[tuple[str, str]]:
    """Yield ``(source, raw_docstring)`` in a deterministic order for one module."""
    module_name = module.__name__
    seen: set[int] = set()
    if isinstance(module.__doc__, str):
        yield module_name, module.__doc__
    members = vars(module)
    for name in sorted(members):
        obj = members[name]
        if id(obj) in seen or not _owned_by(obj, module_name):
            continue
        if inspect.isclass(obj):
            yield from _walk_class(obj, module_name, seen)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            seen.add(id(obj))
            doc = _raw_doc(obj)
            if doc:
                yield f"{module_name}.{getattr(obj, '__qualname__', name)}", doc


def safe_import(name: str) -> ModuleType | None:
    """Import a stdlib module, tolerating platform gaps and deprecation noise."""
    if name.split(".")[0] in FORBIDDEN_PREFIXES or name.startswith(FORBIDDEN_PREFIXES):
        raise ValueError(f"module {name!r} is on the forbidden list")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception as exc:  # platform-specific modules, missing C deps
            print(f"skip {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None


def collect(modules: tuple[str, ...] = MODULES) -> dict[str, list[dict[str, str]]]:
    """Collect cleaned, globally de-duplicated docstring records per split.

    De-duplication is global (first occurrence wins, in module order) so the
    same text can never appear in both splits.
    """
    splits: dict[str, list[dict[str, str]]] = {"train": [], "heldout": []}
    seen_texts: set[str] = set()
    for name in modules:
        module = safe_import(name)
        if module is None:
            continue
        split = "heldout" if is_heldout(name) else "train"
        for source, raw in iter_module_docs(module):
            text = inspect.cleandoc(raw).strip()
            if len(text) < MIN_CHARS or text in seen_texts:
                continue
            seen_texts.add(text)
            splits[split].append({"text": text, "source": source})
    return splits


def write_jsonl_gz(records: list[dict[str, str]], path: Path) -> None:
    """Write gzip'd JSON lines with a zero mtime and no file name in the header.

    That makes the file byte-for-byte reproducible, so re-running the script
    leaves git clean unless the content really changed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for rec in records:
            line = json.dumps({"text": rec["text"], "source": rec["source"]}, ensure_ascii=False)
            gz.write(line.encode("utf-8") + b"\n")
    path.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    splits = collect()
    modules_used: dict[str, set[str]] = {"train": set(), "heldout": set()}
    for name in MODULES:
        modules_used["heldout" if is_heldout(name) else "train"].add(name)

    for split, records in splits.items():
        out = args.out / f"{split}.jsonl.gz"
        write_jsonl_gz(records, out)
        chars = sum(len(r["text"]) for r in records)
        print(
            f"{split}: {len(records)} records, {chars} characters, "
            f"{len(modules_used[split])} listed modules, {out.stat().st_size} bytes gz -> {out}"
        )
    print("heldout modules:", " ".join(sorted(modules_used["heldout"])))
    print("python:", sys.version.split()[0])


if __name__ == "__main__":
    main()
