"""The README's promises: its library snippet runs as written, its quick start names real files."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def test_library_snippet_runs():
  blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
  assert blocks, "README has no python snippet"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # its own assert checks GD == construction
  assert namespace["preds"].shape == (8, 256, 1, 1)
  assert 0.3 < namespace["eta"] < 1.5


def test_quick_start_is_two_commands_that_exist():
  quick = re.search(r"## Quick start.*?```bash\n(.*?)```", _readme(), flags=re.S).group(1)
  commands = [line for line in quick.splitlines() if line.strip()]
  assert len(commands) == 2
  assert "scripts/train.py" in commands[0] and "pytest" in commands[1]
  for path in re.findall(r"(scripts/\S+\.(?:py|sh)|configs/\S+\.py)", quick):
    assert os.path.exists(os.path.join(ROOT, path)), path
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert "scripts/install.sh" in ci and commands[1].split()[-1] in ci  # CI runs the README's test command
