"""The documentation site: `mkdocs build --strict` passes and covers the pages and the public API."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the site once for this module, the way CI does: strict, so any warning fails it."""
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner, not a build warning
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def _public_names() -> list[str]:
    """`phalanx.__all__`, read from the source so that this test does not import phalanx."""
    tree = ast.parse((ROOT / "src" / "phalanx" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("src/phalanx/__init__.py has no __all__")


def test_strict_build_writes_the_guides_platforms_migration_and_reference_pages(site: Path):
    expected = [
        "index.html",
        "getting-started/index.html",
        "errors/index.html",
        "failures/index.html",
        "platforms/index.html",
        "platforms/slurm/index.html",
        "reference/launch/index.html",
        "reference/dist/index.html",
        *(f"reference/compat/{name}/index.html" for name in ("ddpw", "pystematic", "pytagi", "poptorch", "mpify")),
        *(f"migration/{name}/index.html" for name in ("ddpw", "pystematic", "pytagi", "poptorch", "mpify")),
    ]
    missing = [page for page in expected if not (site / page).is_file()]
    assert not missing, f"pages missing from the built site: {missing}"


def test_every_public_name_has_an_entry_in_the_api_reference(site: Path):
    # mkdocstrings gives every documented object an anchor named by its full path, e.g. phalanx.launch.launch.
    anchors = set()
    for page in (site / "reference").rglob("*.html"):
        anchors.update(re.findall(r'id="(phalanx\.[\w.]+)"', page.read_text()))
    documented = {anchor.rsplit(".", 1)[-1] for anchor in anchors if not anchor.startswith("phalanx.compat.")}
    undocumented = [name for name in _public_names() if name not in documented]
    assert not undocumented, f"add these to a page under docs/reference/: {undocumented}"


def test_getting_started_first_launch_prints_what_the_page_says(tmp_path: Path):
    page = (ROOT / "docs" / "getting-started.md").read_text()
    first_block = re.search(r"```python\n(.*?)```", page, re.DOTALL).group(1)
    script = tmp_path / "first.py"
    script.write_text(first_block)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    assert "[rank 0] rank 0 of 2 on cpu: total 30.0" in result.stdout
    assert "[rank 1] rank 1 of 2 on cpu: total 30.0" in result.stdout
    assert result.stdout.rstrip().endswith("[0, 10]")
