"""The package's shape: no import circles among loopicl's modules, the library never imports the
`configs/` package, and every module is at most MAX_LINES lines.

The import graph is read from the source with `ast`, not by importing it.  Every import statement
counts, at module level or inside a function, a class or an `if TYPE_CHECKING:` block (an import
inside a function only hides a circle until the function runs); relative imports are resolved.
An import is an edge to each module whose code it runs or reads:
  * `import a.b.c` and `from a.b.c import f`: a.b.c;
  * `from a.b import x`: a.b.x where that is a module; the package a.b (its `__init__`) where x is
    not a module (a name its `__init__` defines) or is `*`;
  * every package on the path (a, a.b) whose `__init__` the import runs: those that do not hold
    the importing module.  The packages that hold it (and their `__init__`s) are already being
    imported when it runs, so `from loopicl import prng` in loopicl/linear/tasks.py reaches
    loopicl.prng, not loopicl/__init__.py — exactly as `import loopicl.prng` does;
  * a string constant that is the dotted name of one of the package's modules: a module imported
    by name (`importlib.import_module`, the family registry's BUILTIN).
A package's `__init__` is a module like any other.
"""
from __future__ import annotations

import ast
import pathlib
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "loopicl"
MAX_LINES = 400
FORBIDDEN = "configs"  # experiment configs: scripts and tests pass them in, the library never imports them


class Import(NamedTuple):
  target: str  # the dotted name imported (a module, a package, or outside loopicl)
  line: int


def module_files(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name → file, for every .py under package_dir (`__init__.py` names its package)."""
  out = {}
  for path in sorted(package_dir.rglob("*.py")):
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def imports_of(source: str, module: str, is_package: bool, modules) -> list[Import]:
  """What `source` (the module `module`) imports, by the rules of the module docstring; `modules`:
  the package's module names (to tell `from pkg import submodule` from `from pkg import name`)."""
  parts = module.split(".")
  running = {".".join(parts[:k]) for k in range(1, len(parts) + 1)}  # its packages and itself
  package = parts if is_package else parts[:-1]

  def with_packages(name: str, line: int) -> list[Import]:
    pieces = name.split(".")
    return [Import(p, line) for p in (".".join(pieces[:k]) for k in range(1, len(pieces)))
            if p not in running] + [Import(name, line)]

  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        out += with_packages(alias.name, node.lineno)
    elif isinstance(node, ast.ImportFrom):
      base = node.module
      if node.level:
        base = ".".join(package[:len(package) - (node.level - 1)] + ([base] if base else []))
      submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
      if len(submodules) < len(node.names) or base not in running:
        out += with_packages(base, node.lineno)
      else:
        out += [imp for imp in with_packages(base, node.lineno) if imp.target != base]
      out += [Import(m, node.lineno) for m in submodules]
    elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value
          and node.value in modules):
      out += with_packages(node.value, node.lineno)
  return [imp for imp in out if imp.target != module]


def import_graph(package_dir: pathlib.Path):
  """(graph, where, files): graph[m] = sorted modules of the package that m imports;
  where[(m, n)] = "file:line" of each import of n in m; files[m] = m's path."""
  files = module_files(package_dir)
  graph, where = {}, {}
  for name, path in files.items():
    targets = set()
    for imp in imports_of(path.read_text(), name, path.name == "__init__.py", files):
      if imp.target in files and imp.target != name:
        targets.add(imp.target)
        rel = path.relative_to(package_dir.parent).as_posix()
        if f"{rel}:{imp.line}" not in where.setdefault((name, imp.target), []):
          where[(name, imp.target)].append(f"{rel}:{imp.line}")
    graph[name] = sorted(targets)
  return graph, where, files


def strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
  """Tarjan's strongly connected components (iterative), each sorted; the components with a
  circle: more than one node, or one node importing itself."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = 0
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(graph.get(root, ())))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      for child in children:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(graph.get(child, ()))))
          break
        if child in on_stack:
          low[node] = min(low[node], index[child])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          component = []
          while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == node:
              break
          if len(component) > 1 or node in graph.get(node, ()):
            out.append(sorted(component))
  return sorted(out)


def shortest_cycle(graph: dict[str, list[str]], start: str, within: set[str]) -> list[str]:
  """A shortest circle start -> ... -> start inside `within` (breadth first), as its node list."""
  parent, frontier = {}, [start]
  while frontier:
    following = []
    for node in frontier:
      for child in graph.get(node, ()):
        if child == start:
          chain = [node]
          while chain[-1] != start:
            chain.append(parent[chain[-1]])
          return chain[::-1] + [start]
        if child in within and child not in parent:
          parent[child] = node
          following.append(child)
    frontier = following
  return []


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
  """The distinct circles a -> ... -> a that are shortest through some module (breadth first from
  each module of each strongly connected component), each rotated to start at its least module,
  shortest first.  [] if and only if the graph is acyclic."""
  found = set()
  for component in strongly_connected(graph):
    for start in component:
      ring = shortest_cycle(graph, start, set(component))[:-1]
      k = ring.index(min(ring))
      found.add(tuple(ring[k:] + ring[:k] + [ring[k]]))
  return [list(c) for c in sorted(found, key=lambda c: (len(c), c))]


def describe_cycles(graph, where) -> str:
  """The circles, then every import inside each strongly connected component with its file:line."""
  lines = [" -> ".join(c) for c in cycles(graph)]
  for component in strongly_connected(graph):
    members = set(component)
    lines.append(f"imports among {', '.join(component)}:")
    lines += [f"  {m} -> {n}  ({', '.join(where[(m, n)])})"
              for m in component for n in graph[m] if n in members]
  return "\n".join(lines)


# The finder and the reader, on inputs whose answer is known (so that the tests below can fail).

def test_cycle_finder_on_toy_graphs():
  assert cycles({"a": ["b"], "b": ["c"], "c": []}) == []
  assert cycles({"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}) == []  # a diamond is no circle
  assert cycles({"b": ["c"], "c": ["a"], "a": ["b"], "d": ["a"]}) == [["a", "b", "c", "a"]]
  assert cycles({"a": ["a"]}) == [["a", "a"]]
  two = {"a": ["b"], "b": ["a", "c"], "c": ["d"], "d": ["e"], "e": ["c"], "f": ["e"]}
  assert cycles(two) == [["a", "b", "a"], ["c", "d", "e", "c"]]
  # One component holding two circles: both are named, and every edge inside it is listed.
  big = {"a": ["b", "x"], "b": ["c"], "c": ["a"], "x": ["a"]}
  assert cycles(big) == [["a", "x", "a"], ["a", "b", "c", "a"]]
  where = {(m, n): [f"{m}.py:1"] for m, ns in big.items() for n in ns}
  text = describe_cycles(big, where).splitlines()
  assert text[:3] == ["a -> x -> a", "a -> b -> c -> a", "imports among a, b, c, x:"]
  assert "  b -> c  (b.py:1)" in text and len(text) == 3 + 5


def test_import_reader_counts_every_import(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("from pkg import a\nVERSION = 1\n")
  (pkg / "a.py").write_text("import os\n\ndef f():\n  from pkg.sub import b  # inside a function\n")
  (pkg / "sub" / "__init__.py").write_text("from . import b\n")
  (pkg / "sub" / "b.py").write_text(
      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from ..a import f\n"
      "from .. import c as renamed\nfrom .c2 import thing\n")
  (pkg / "sub" / "c2.py").write_text(
      "class K:\n  def m(self):\n    import configs.default\n    from pkg import VERSION\n")
  (pkg / "c.py").write_text('"""About pkg.a."""\nBY_NAME = ("pkg.d", "pkg.nothing")\nimport pkg.sub.b\n')
  (pkg / "d.py").write_text("x = 1\n")
  graph, where, _ = import_graph(pkg)
  assert graph == {
      "pkg": ["pkg.a"],                                # its own __init__ is not an edge
      "pkg.a": ["pkg.sub", "pkg.sub.b"],               # inside a function; runs pkg/sub/__init__
      "pkg.sub": ["pkg.sub.b"],                        # from . import b
      "pkg.sub.b": ["pkg.a", "pkg.c", "pkg.sub.c2"],   # TYPE_CHECKING; `from .. import c`: pkg.c only
      "pkg.sub.c2": ["pkg"],                           # VERSION: a name pkg/__init__ defines
      "pkg.c": ["pkg.d", "pkg.sub", "pkg.sub.b"],      # by name; import pkg.sub.b
      "pkg.d": []}
  assert where[("pkg.sub.b", "pkg.a")] == ["pkg/sub/b.py:3"]
  assert where[("pkg.a", "pkg.sub.b")] == ["pkg/a.py:4"]
  assert where[("pkg.c", "pkg.d")] == ["pkg/c.py:2"]
  assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.c", "pkg.sub.b", "pkg.c"],
                           ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"],
                           ["pkg", "pkg.a", "pkg.sub.b", "pkg.sub.c2", "pkg"]]
  c2 = imports_of((pkg / "sub" / "c2.py").read_text(), "pkg.sub.c2", False, set(graph))
  assert [i for i in c2 if i.target.startswith("configs")] == [Import("configs", 3),
                                                                 Import("configs.default", 3)]


# The package.

def test_no_import_cycles():
  graph, where, _ = import_graph(ROOT / PACKAGE)
  assert len(graph) > 10 and graph[f"{PACKAGE}.linear.report"]  # it did read the package
  assert not strongly_connected(graph), "import circles among loopicl's modules:\n" + describe_cycles(
      graph, where)


def test_library_never_imports_configs():
  files = module_files(ROOT / PACKAGE)
  offenders = list(dict.fromkeys(  # `import configs.default` is two imports on one line
      f"{path.relative_to(ROOT).as_posix()}:{imp.line}: "
      f"{path.read_text().splitlines()[imp.line - 1].strip()}"
      for name, path in files.items()
      for imp in imports_of(path.read_text(), name, path.name == "__init__.py", files)
      if imp.target == FORBIDDEN or imp.target.startswith(FORBIDDEN + ".")))
  assert not offenders, ("the library imports the experiment configs (pass the config in instead):\n"
                         + "\n".join(offenders))


def test_modules_are_at_most_400_lines():
  offenders = [f"{path.relative_to(ROOT).as_posix()}: {n} lines"
               for path in sorted((ROOT / PACKAGE).rglob("*.py"))
               if (n := len(path.read_text().splitlines())) > MAX_LINES]
  assert not offenders, f"modules over {MAX_LINES} lines:\n" + "\n".join(offenders)
