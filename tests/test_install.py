"""The Install step (gateway/install.py), run for real: a venv from a wheelhouse, twice."""

import subprocess
import sys
from pathlib import Path

import pytest

from release import wheelhouse

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "gateway" / "install.py"


@pytest.fixture(scope="module")
def small_wheelhouse(tmp_path_factory) -> Path:
    """The smallest wheelhouse that proves the point: the meter-gateway wheel and pip's own
    (the full one takes the same path, with 18 wheels; see the README's measured figure)."""
    dest = tmp_path_factory.mktemp("wheelhouse")
    wheelhouse.build_project_wheel(dest)
    wheelhouse.download([], dest, no_deps=True)
    return dest


def run_install(wheelhouse_dir: Path, venv_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INSTALL), "--wheelhouse", str(wheelhouse_dir), "--venv", str(venv_dir),
                           "--no-deps", "--check-import", "gateway", *extra], capture_output=True, text=True)


def test_install_twice_second_is_a_noop_and_venv_imports_gateway(small_wheelhouse, tmp_path):
    venv_dir = tmp_path / "work" / "venv"
    first = run_install(small_wheelhouse, venv_dir)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("installed 1 wheels into ")
    record = venv_dir / ".wheelhouse.sha256"
    before = (record.stat().st_mtime_ns, (venv_dir / "bin" / "python").lstat().st_mtime_ns, record.read_text())

    second = run_install(small_wheelhouse, venv_dir)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith(f"up to date: {venv_dir} (wheelhouse sha256 ")
    assert (record.stat().st_mtime_ns, (venv_dir / "bin" / "python").lstat().st_mtime_ns, record.read_text()) == before

    where = subprocess.run([str(venv_dir / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv_dir / "lib"))


def test_half_built_venv_is_rebuilt(small_wheelhouse, tmp_path):
    venv_dir = tmp_path / "venv"
    assert run_install(small_wheelhouse, venv_dir).returncode == 0
    (venv_dir / ".wheelhouse.sha256").unlink()  # as if killed before the record was written
    (venv_dir / "stale-file").write_text("x")
    again = run_install(small_wheelhouse, venv_dir)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("installed 1 wheels")
    assert not (venv_dir / "stale-file").exists()


def test_another_wheelhouse_rebuilds(small_wheelhouse, tmp_path):
    venv_dir = tmp_path / "venv"
    assert run_install(small_wheelhouse, venv_dir).returncode == 0
    changed = tmp_path / "wh2"
    changed.mkdir()
    for wheel in small_wheelhouse.iterdir():
        (changed / wheel.name).write_bytes(wheel.read_bytes())
    (changed / "meter_gateway-0.1.0-py3-none-any.whl").write_bytes(b"not a wheel")
    broken = run_install(changed, venv_dir)
    assert broken.returncode == 1
    assert broken.stderr.startswith(f"install.py: error: pip could not install the wheelhouse {changed} into {venv_dir}")
    assert not (venv_dir / ".wheelhouse.sha256").exists()  # never recorded: the next Install retries


def test_missing_wheelhouse_is_named(tmp_path):
    done = run_install(tmp_path / "nowhere", tmp_path / "venv")
    assert done.returncode == 1
    assert done.stderr == f"install.py: error: {tmp_path / 'nowhere'}: no such folder (the wheelhouse of the artifact)\n"


def test_empty_wheelhouse_is_named(tmp_path):
    (tmp_path / "wh").mkdir()
    done = run_install(tmp_path / "wh", tmp_path / "venv")
    assert done.returncode == 1
    assert "no wheels (*.whl) there; the artifact is incomplete" in done.stderr


def test_install_uses_the_standard_library_only():
    imports = [line.split()[1].split(".")[0] for line in INSTALL.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert set(imports) <= set(sys.stdlib_module_names) | {"__future__"}
