"""README code blocks run as written, outside our suite (issue 20, "README").

Each test writes README text into a fresh temporary folder and runs it in a new Python process
with ``cwd`` there: no conftest, no pyproject, no hypothesis profile of ours applies, as for a
user who copies a block next to their own code.

* Use 3: the test file users copy runs with plain ``pytest`` under hypothesis's default
  settings (the ``default`` profile is loaded explicitly, so a CI environment variable, which
  makes hypothesis load its ``ci`` profile without a deadline, cannot hide a deadline failure),
  both as written and with its ``deadline=None`` settings removed; it is also, byte for byte, the
  file our own suite runs (tests/user_example/test_my_model.py).
* Use 1 and Use 2: the Python blocks of each section run in order in one fresh process, with the
  embedded MiniLM and offline data their own first block loads; nothing is injected. The
  curvature block (minutes of Hessian-vector products on MiniLM) runs only with ``-m slow``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
USER_EXAMPLE = ROOT / "tests" / "user_example" / "test_my_model.py"

# pytest.main under hypothesis's own default profile, whatever the environment says.
_PLAIN_PYTEST = (
    "import sys, pytest; from hypothesis import settings; settings.load_profile('default'); "
    "sys.exit(pytest.main(sys.argv[1:]))"
)


def readme_blocks() -> dict[str, list[str]]:
    """The ```python blocks of README.md by "## " section title, in order."""
    sections: dict[str, list[str]] = {}
    title = ""
    for match in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", README.read_text(),
                             re.MULTILINE | re.DOTALL):
        if match.group(1) is not None:
            title = match.group(1).strip()
        else:
            sections.setdefault(title, []).append(match.group(2))
    return sections


def section(prefix: str) -> list[str]:
    found = [blocks for title, blocks in readme_blocks().items() if title.startswith(prefix)]
    assert len(found) == 1 and found[0], f"README has no single section {prefix!r} with code"
    return found[0]


def use3_file() -> str:
    blocks = section("Use 3")
    assert len(blocks) == 1, "Use 3 shows one file: the user's test file"
    return blocks[0]


def _env() -> dict[str, str]:
    """The environment minus anything that would make the child see our suite's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "HYPOTHESIS")) and k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def _plain_pytest(folder: Path) -> subprocess.CompletedProcess[str]:
    assert not any(folder.rglob("conftest.py")) and not (folder / "pyproject.toml").exists()
    return _run(["-c", _PLAIN_PYTEST, "-q", "-p", "no:cacheprovider", "--rootdir", str(folder),
                 "-c", os.devnull, str(folder)], folder, timeout=300)


def test_use3_file_is_the_user_example_our_suite_runs() -> None:
    text = USER_EXAMPLE.read_text()
    docstring = ast.get_docstring(ast.parse(text), clean=False)
    assert docstring is not None
    body = text.split('"""', 2)[2].lstrip("\n")
    assert body == use3_file(), (
        "README Use 3 and tests/user_example/test_my_model.py (after its docstring) differ"
    )


def test_use3_file_passes_with_plain_pytest_and_no_conftest(tmp_path: Path) -> None:
    (tmp_path / "test_my_model.py").write_text(use3_file())
    result = _plain_pytest(tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert re.search(r"\b3 passed\b", out), out


def test_use3_file_passes_under_the_default_deadline(tmp_path: Path) -> None:
    """Without the file's ``deadline=None`` the small model's checks still meet hypothesis's
    200 ms default: sparsetune.testing pays torch's one-time lazy import (about 1 s, on the
    first optimizer built) at import, not inside the first example."""
    text = use3_file()
    stripped = re.sub(r"^@settings\(deadline=None\)[^\n]*\n", "", text, flags=re.MULTILINE)
    stripped = stripped.replace("deadline=None, ", "")
    assert "deadline" not in stripped and stripped != text
    (tmp_path / "test_my_model.py").write_text(stripped)
    result = _plain_pytest(tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "DeadlineExceeded" not in out and re.search(r"\b3 passed\b", out), out


def _run_blocks(blocks: list[str], tmp_path: Path) -> None:
    script = "\n".join(f"# --- block {i + 1}\n{code}" for i, code in enumerate(blocks))
    (tmp_path / "readme_blocks.py").write_text(script)
    result = _run(["readme_blocks.py"], tmp_path, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]


def _is_curvature(block: str) -> bool:
    """Hessian-vector products on MiniLM take minutes on a CPU: those blocks run as slow."""
    return "st.curvature." in block


@pytest.mark.parametrize("prefix", ["Use 1", "Use 2"])
def test_use_section_blocks_run_as_written(prefix: str, tmp_path: Path) -> None:
    blocks = section(prefix)
    assert not any(_is_curvature(b) for b in blocks[:1]), "the first block sets the section up"
    _run_blocks([b for b in blocks if not _is_curvature(b)], tmp_path)


@pytest.mark.slow
def test_use2_curvature_block_runs_as_written(tmp_path: Path) -> None:
    blocks = section("Use 2")
    assert any(_is_curvature(b) for b in blocks)
    _run_blocks(blocks, tmp_path)
