"""The examples of the README and docs/ run against a live service, and their claims are checked against the code.

Every fenced block of README.md and of each docs/*.md is marked on the line before its fence:

* ``<!-- runnable NAME -->`` (optionally ``dataset=D`` for each dataset the
  block expects to exist): the block runs here, ``bash`` blocks under
  ``bash -e -o pipefail`` with the virtual environment's ``bin`` first on
  ``PATH``, ``python`` blocks in a fresh interpreter, both in an empty
  directory, with ``MASKSERVE_URL`` (and ``REDIS_URL``) naming the test
  service. A block that exits non-zero fails its test.
* ``<!-- not runnable: REASON -->``: deliberately not run (it needs docker,
  root, runs for minutes, or starts a server that runs until stopped).

An HTML comment is invisible on GitHub and leaves the fence's language, and
with it the highlighting, alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client import Client
from service.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
CONFIGURATION = ROOT / "docs" / "configuration.md"  # the configuration table: every setting, in full
MARK = re.compile(r"^<!--\s*(runnable|not runnable)\b(.*?)-->\s*$")
LANGS = ("bash", "python")
BLOCK_TIMEOUT_S = 300  # a guard against a hung block, not a way to wait for anything


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    runnable: bool | None  # None: unmarked
    name: str = ""
    reason: str = ""
    datasets: list[str] = field(default_factory=list)
    doc: str = "README.md"  # the document it is in, relative to the repository

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def readme_blocks(text: str, doc: str = "README.md") -> list[Block]:
    """Every fenced block of a Markdown text with the marker on the line before it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang = lines[i][3:].strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"{doc} line {i + 1}: a fence that is never closed")
        block = Block(line=i + 1, lang=lang, code="\n".join(lines[i + 1 : end]) + "\n", runnable=None, doc=doc)
        m = MARK.match(lines[i - 1]) if i else None
        if m:
            block.runnable = m.group(1) == "runnable"
            words = m.group(2).split()
            if block.runnable:
                block.name = words[0] if words else ""
                block.datasets = [w.removeprefix("dataset=") for w in words[1:] if w.startswith("dataset=")]
            else:
                block.reason = m.group(2).strip(" :")
        blocks.append(block)
        i = end + 1
    return blocks


BLOCKS = [b for d in DOCS for b in readme_blocks(d.read_text(encoding="utf-8"), str(d.relative_to(ROOT)))]
RUNNABLE = [b for b in BLOCKS if b.runnable]
# Cases expected to fail on this branch, and why; strict: once they pass, the entry must go.
EXPECTED_FAILURES: dict[str, str] = {}  # block name -> why it fails today (run as a strict xfail)


def test_every_block_is_marked() -> None:
    """Each fenced block is runnable (and then has a name and a language we run) or says why not."""
    unmarked = [b.where for b in BLOCKS if b.runnable is None]
    assert not unmarked, f"blocks at {unmarked} carry neither <!-- runnable NAME --> nor <!-- not runnable: WHY -->"
    assert all(b.reason for b in BLOCKS if b.runnable is False), "a not-runnable block must say why"
    for b in RUNNABLE:
        assert b.name, f"{b.where}: a runnable block needs a name"
        assert b.lang in LANGS, f"block {b.name} ({b.where}): runnable blocks are {LANGS}, not {b.lang!r}"
    names = [b.name for b in RUNNABLE]
    assert len(names) == len(set(names)), f"runnable block names repeat: {names}"
    assert set(EXPECTED_FAILURES) <= set(names), "an expected failure names no block"


def test_readme_blocks_parse() -> None:
    """The parser itself: markers, names, datasets, languages and reasons."""
    text = "<!-- runnable demo dataset=a dataset=b -->\n```bash\necho hi\n```\n\n" \
           "<!-- not runnable: needs docker -->\n```bash\ndocker compose up\n```\n```\nplain\n```\n"  # fmt: skip
    run, skip, plain = readme_blocks(text)
    assert (run.runnable, run.name, run.datasets, run.lang, run.code) == (True, "demo", ["a", "b"], "bash", "echo hi\n")
    assert (skip.runnable, skip.reason) == (False, "needs docker")
    assert plain.runnable is None and plain.lang == ""


def _env(service_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKSERVE_") and k != "REDIS_URL"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MASKSERVE_URL"] = service_url
    env["REDIS_URL"] = redis_url
    return env


def _make_dataset(c: Client, name: str, tokenizer: str, corpus: list[str]) -> None:
    """A tiny dataset under the name a block expects: about 20 kB of text, L=64 (about 90 sequences)."""
    c.create_dataset(name, tokenizer=tokenizer, seq_len=64, packing="complete")
    docs, size = [], 0
    for doc in corpus:
        docs.append(doc)
        size += len(doc)
        if size > 20_000:
            break
    c.ingest(name, docs)


def _case(b: Block):  # noqa: ANN202 - a pytest ParameterSet
    marks = [pytest.mark.xfail(strict=True, reason=EXPECTED_FAILURES[b.name])] if b.name in EXPECTED_FAILURES else []
    return pytest.param(b, id=b.name, marks=marks)


@pytest.mark.parametrize("block", [_case(b) for b in RUNNABLE])
def test_readme_block(
    block: Block, service_url: str, redis_url: str, client: Client, bpe_tokenizer: str, corpus: list[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    for name in block.datasets:
        _make_dataset(client, name, bpe_tokenizer, corpus)
    argv = ["bash", "-e", "-o", "pipefail", "-c", block.code] if block.lang == "bash" else [sys.executable, "-c", block.code]
    proc = subprocess.run(argv, cwd=tmp_path, env=_env(service_url, redis_url), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=BLOCK_TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 0, f"block {block.name!r} ({block.where}) exited {proc.returncode}:\n{proc.stdout[-6000:]}"


# ---- settings: the configuration table (docs/configuration.md) against the code ---------------

ENV_NAME = re.compile(r"MASKSERVE_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_]*\*)")  # a name, not a pattern like MASKSERVE_MAX_*
# Set by the service for its own worker processes, not by users.
INTERNAL = {"MASKSERVE_SUPERVISOR_PID"}


def _settings_names() -> set[str]:
    out = set()
    for name, f in Settings.model_fields.items():
        alias = f.validation_alias
        out.add(alias if isinstance(alias, str) else "MASKSERVE_" + name.upper())
    return out


def _config_table() -> set[str]:
    """The names in the first column of the configuration table (every table of docs/configuration.md)."""
    rows = [line.split("|")[1] for line in CONFIGURATION.read_text(encoding="utf-8").splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row)}


def _code_names() -> set[str]:
    """Every ``MASKSERVE_*`` name the service, client and trainer code spells out."""
    return {n for pkg in ("service", "client", "trainer") for p in (ROOT / pkg).rglob("*.py")
            for n in ENV_NAME.findall(p.read_text(encoding="utf-8"))}  # fmt: skip


def test_every_setting_is_in_the_configuration_table() -> None:
    table = _config_table()
    missing = sorted((_settings_names() | _code_names()) - INTERNAL - table)
    assert not missing, f"settings the code reads but the configuration table ({CONFIGURATION.name}) lacks: {missing}"


def test_every_documented_setting_exists() -> None:
    known = _settings_names() | _code_names()
    for doc in DOCS:
        unknown = sorted(set(ENV_NAME.findall(doc.read_text(encoding="utf-8"))) - known)
        assert not unknown, f"{doc.relative_to(ROOT)} names settings no code reads: {unknown}"


# ---- the repository stands alone ------------------------------------------------------------------

# Spelled in pieces, so that this file does not match itself.
OUTSIDE = ("DESIGN" + ".md", "STYLE" + ".md", "../" + "shared", "/work/" + "shared")


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, stdout=subprocess.PIPE, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_nothing_refers_to_documents_outside_the_repository() -> None:
    hits = []
    for path in _tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a binary file (an image)
        for n, line in enumerate(text.splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for s in OUTSIDE if s in line]
    assert not hits, "references to documents the repository does not have:\n" + "\n".join(hits)


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to files that do not exist: {broken}"
