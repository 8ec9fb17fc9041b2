from __future__ import annotations

import doctest
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> str:
    """The README's ```python blocks, joined in order (one doctest session)."""
    text = (REPO / "README.md").read_text()
    return "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))


def test_readme_examples_run_as_written() -> None:
    source = readme_python_blocks()
    test = doctest.DocTestParser().get_doctest(source, {}, "README", "README.md", 0)
    assert len(test.examples) >= 5
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.failures == 0


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in (REPO / "README.md").read_text()
