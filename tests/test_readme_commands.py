"""The README's test command is what CI runs (so what CI proves is what a user gets)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_cmd = next(line.strip() for line in readme if "pytest" in line and line.strip().startswith("python3 -m venv"))
    assert test_cmd in [line.strip() for line in ci]
