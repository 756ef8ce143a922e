"""Every shell block the documentation marks as runnable is run, as written.

Convention (documented in docs/README.md): a block fenced as ```sh runnable
is run; a ```text output block right after it lists lines its output must
contain, in order (``...`` inside a line matches anything, a line of only
``...`` is a gap). The runnable blocks of one file run in order in one bash
(``set -euo pipefail``, variables carry over), in a folder where a fresh
``keygate dev`` runs with its default data folder, as the docs assume.

The docs use the default ports (8883, 8443, 9100), which ``keygate dev``
takes or refuses to start (naming the flag). The test starts it on free ports
(other tests may hold the defaults) and substitutes those port numbers into
the blocks; nothing else is changed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.config import load_config, parse_hostport
from tests.integration.test_dev import Stack, dev_env, start_dev

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
MARK = "@@keygate-docs-block@@"


@dataclass
class Block:
    file: Path
    line: int
    code: str
    expected: list[str] | None = None


def runnable_blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    blocks: list[Block] = []
    last_end = -1
    for m in FENCE.finditer(text):
        info = m.group(1).split()
        line = text.count("\n", 0, m.start()) + 1
        if info[:2] == ["sh", "runnable"]:
            blocks.append(Block(path, line, m.group(2)))
        elif info[:2] == ["text", "output"]:
            between = text[last_end:m.start()]
            assert blocks and between.strip() == "", f"{path}:{line}: an output block must follow a runnable block"
            blocks[-1].expected = [x for x in m.group(2).splitlines() if x.strip()]
        last_end = m.end()
    return blocks


def files_with_blocks() -> list[Path]:
    return [p for p in DOCS if p.exists() and runnable_blocks(p)]


def matches(expected: list[str], actual: list[str]) -> str | None:
    """None when every expected line appears in ``actual`` in order, else the first one missing."""
    i = 0
    for want in expected:
        if want.strip() == "...":
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in want.strip().split("...")))
        while i < len(actual) and not pattern.fullmatch(actual[i].strip()):
            i += 1
        if i == len(actual):
            return want
        i += 1
    return None


def keygate_shim(folder: Path) -> Path:
    """A ``keygate`` on PATH: the installed script if there is one, else this tree's module."""
    folder.mkdir(parents=True, exist_ok=True)
    installed = Path(sys.executable).parent / "keygate"
    shim = folder / "keygate"
    if installed.exists():
        shim.symlink_to(installed)
    else:
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m proxy "$@"\n')
        shim.chmod(0o755)
    return folder


def substitute_ports(code: str, config) -> str:
    for default, actual in ((8883, parse_hostport(config.mqtt.listen)[1]),
                            (8443, parse_hostport(config.http.listen)[1]),
                            (9100, parse_hostport(config.metrics.listen)[1])):
        if actual != default:
            code = re.sub(rf"(?<![0-9]){default}(?![0-9])", str(actual), code)
    return code


def test_the_tour_has_runnable_blocks():
    tour = [p for p in DOCS if p.name in ("README.md", "README-tour.md") and p.exists()]
    assert sum(len(runnable_blocks(p)) for p in tour) >= 7


def test_every_output_block_follows_a_runnable_block():
    for path in DOCS:
        if path.exists():
            runnable_blocks(path)  # asserts the pairing


@pytest.mark.integration
@pytest.mark.parametrize("doc", files_with_blocks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks(doc: Path, tmp_path):
    for tool in ("mosquitto", "mosquitto_pub", "mosquitto_sub", "curl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.fail(f"{tool} is not installed; scripts/setup installs it")
    work = tmp_path / "work"
    work.mkdir()
    stack: Stack = start_dev(work / "keygate-dev")
    try:
        config = load_config(stack.data / "proxy.yaml")
        blocks = runnable_blocks(doc)
        script = ["exec 2>&1", "set -euo pipefail"]
        for i, block in enumerate(blocks):
            script.append(f"printf '\\n%s\\n' {MARK}{i}")  # a fresh line even after output without one
            script.append(substitute_ports(block.code, config))
        script.append(f"printf '\\n%s\\n' {MARK}end")
        env = dev_env()
        env["PATH"] = f"{keygate_shim(tmp_path / 'bin')}{os.pathsep}{env['PATH']}"
        result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True,
                                text=True, timeout=240)
        outputs = split_outputs(result.stdout)
        ran = [i for i in outputs if i != "end"]
        last = max(ran) if ran else 0
        where = f"{doc.relative_to(ROOT)}:{blocks[last].line}"
        assert result.returncode == 0 and "end" in outputs, (
            f"{where}: block exited with {result.returncode}\n--- output:\n{outputs.get(last, '')}"
            )
        # The tour's key files stay in the data folder (git-ignored), nothing beside it.
        if doc.name == "README.md":
            assert sorted(p.name for p in work.iterdir()) == ["keygate-dev"]
        for i, block in enumerate(blocks):
            if block.expected:
                expected = [substitute_ports(line, config) for line in block.expected]
                missing = matches(expected, outputs[i].splitlines())
                assert missing is None, (f"{doc.relative_to(ROOT)}:{block.line}: output lacks {missing!r}\n"
                                         f"--- output:\n{outputs[i]}")
    finally:
        stack.stop(signal.SIGINT)


def split_outputs(stdout: str) -> dict:
    """Each block's output (stderr merged in order by ``exec 2>&1``), keyed by block index."""
    out: dict = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith(MARK):
            tag = line[len(MARK):]
            current = "end" if tag == "end" else int(tag)
            out[current] = ""
            continue
        if current is not None:
            out[current] += line + "\n"
    return out


# --------------------------------------------------------------------------- configuration reference


def config_keys() -> list[str]:
    """Every key path of the schema in proxy/config.py, sections included."""
    import dataclasses
    import types
    import typing

    from proxy.config import Config

    out: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            tp = hints[f.name]
            if typing.get_origin(tp) in (typing.Union, types.UnionType):
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            path = prefix + f.name
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, path + ".")
            else:
                out.append(path)

    walk(Config, "")
    return out


def test_every_config_key_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    keys = config_keys()
    assert len(keys) > 50
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert missing == [], f"docs/configuration.md lacks {missing}"


def test_configuration_page_documents_no_key_that_does_not_exist():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = re.findall(r"^\| `([a-z_.]+)` \|", text, re.M)
    assert sorted(set(documented) - set(config_keys())) == []
