"""The README's Python examples run as written: every ```python block, in order, in one namespace
(later blocks use what earlier ones built), in a scratch directory."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return out


def test_readme_has_python_examples():
    assert len(_blocks()) >= 4


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for line, code in _blocks():
        # compiled with the README's line numbers, so a failure points at the README's own line
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)


def test_readme_config_example_trains(tmp_path, capsys):
    """The README's YAML config (every ```yaml block that has the five sections) validates and
    trains as written; only the data and the budget are made small here."""
    from eenn.cli import main

    text = README.read_text()
    configs = [m.group(1) for m in re.finditer(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)
               if all(f"\n{k}:" in "\n" + m.group(1) for k in ("data", "model", "objective", "train", "eval"))]
    assert configs
    for i, config in enumerate(configs):
        path = tmp_path / f"readme{i}.yaml"
        path.write_text(config)
        assert main(["train", "--config", str(path), "--out", str(tmp_path / f"run{i}"), "--no-report",
                     "--no-progress", "--set", "data={name: digits, limit: 200}", "--set", "train.epochs=1"]) == 0, \
            capsys.readouterr().err
