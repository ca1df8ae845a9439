"""The README's examples run as written, and the numbers it quotes are the ones the code produces."""
import os
import re
import textwrap

import pytest
from conftest import ROOT, run_python

README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", README, flags=re.S)]  # some sit in a list


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i):
    r = run_python("-c", BLOCKS[i])
    assert r.returncode == 0, f"README python block {i} failed:\n{BLOCKS[i]}\n{r.stderr[-3000:]}"


def test_readme_info_output_is_current():
    """The `run.py info` listing quoted in the README is what the command prints today."""
    quoted = re.search(r"```\n(towers: clip, vit \(backbone hybrid\)  fusion: concat.*?)```", README,
                       flags=re.S).group(1)
    r = run_python("run.py", "info", "--config", "configs/hybrid.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == quoted.strip()
