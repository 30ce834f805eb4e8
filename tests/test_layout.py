"""The shape of the repository: no import circle in s5scale/, nothing imports a program, library
imports have no side effects, and the README and docs stay a user's documents. Oracles: the
source files' own import statements (ast), a fresh interpreter, and the files on disk."""

import ast
import os
import pathlib
import re
import subprocess
import sys

from tests import helpers

REPO = pathlib.Path(helpers.REPO)
PACKAGE = "s5scale"


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(*folders: str) -> list[pathlib.Path]:
  return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def imported_modules(path: pathlib.Path, known: set[str]) -> set[str]:
  """The s5scale modules that `path` imports, anywhere in the file (a lazy import inside a
  function still ties the two files together). `from a import b` names module a.b when that is
  a module, else a."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        found.add(submodule if submodule in known else node.module)
  return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
  files = {module_name(p): p for p in python_files(PACKAGE)}
  return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == "open":
        return stack[stack.index(target):] + [target]
      if target not in state and (circle := visit(target)):
        return circle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state and (circle := visit(node)):
      return circle
  return None


def program_modules() -> set[str]:
  """`python -m s5scale.X` modules: the ones with a __main__ block."""
  return {module_name(p) for p in python_files(PACKAGE)
          if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)}


def test_the_circle_finder_finds_a_planted_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_circle(graph) == ["a", "b", "c", "a"]
  assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_in_the_package():
  graph = import_graph()
  assert len(graph) > 40  # the walk saw the package
  assert "s5scale.config_schema" in graph["s5scale.config_check"]
  assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_data_code_does_not_import_the_validator():
  graph = import_graph()
  data_modules = [name for name in graph if name.startswith("s5scale.data")]
  assert data_modules
  for name in data_modules:
    assert not graph[name] & {"s5scale.config_check", "s5scale.cli"}, name


def test_nothing_imports_a_program_module():
  programs = program_modules()
  assert {"s5scale.train", "s5scale.evaluate", "s5scale.generate", "s5scale.sample_quality",
          "s5scale.validate"} <= programs
  known = {module_name(p) for p in python_files(PACKAGE)}
  importers = {}
  for path in python_files(PACKAGE, "tools", "tests"):
    for program in imported_modules(path, known) & programs:
      if module_name(path) != program:
        importers.setdefault(program, []).append(str(path.relative_to(REPO)))
  assert not importers, importers


def test_the_program_check_sees_a_planted_import(tmp_path):
  planted = tmp_path / "planted.py"
  planted.write_text("from s5scale import train, cli\nimport s5scale.evaluate\n")
  known = {"s5scale.train", "s5scale.cli", "s5scale.evaluate"}
  assert imported_modules(planted, known) == known


# argv: third-party modules, "--", then ours. Third-party set-up on import (grain adds a root
# log handler) is not ours to judge, so those are imported before the baseline.
LIBRARY_IMPORT_PROBE = """
import importlib, logging, signal, sys
split = sys.argv.index("--")
for name in sys.argv[1:split]:
  importlib.import_module(name)
import jax, absl.logging
before = (signal.getsignal(signal.SIGTERM), list(logging.root.handlers),
          dict(jax.config.values), absl.logging.get_absl_handler().python_handler.stream)
for name in sys.argv[split + 1:]:
  importlib.import_module(name)
after = (signal.getsignal(signal.SIGTERM), list(logging.root.handlers),
         dict(jax.config.values), absl.logging.get_absl_handler().python_handler.stream)
for what, old, new in zip(("SIGTERM handler", "root log handlers", "jax config", "absl log stream"),
                          before, after):
  if old != new:
    print(f"changed: {what}")
print("imported", len(sys.argv) - split - 1)
"""


def third_party_imports() -> list[str]:
  """The modules outside s5scale that the package imports at module level."""
  found = set()
  for path in python_files(PACKAGE):
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, ast.Import):
        found.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        found.add(node.module)
  return sorted(name for name in found if name.split(".")[0] != PACKAGE)


def probe_imports(modules: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", LIBRARY_IMPORT_PROBE, *third_party_imports(), "--",
                         *modules], env=helpers.env_for(), capture_output=True, text=True,
                        timeout=300, cwd=REPO)


def test_importing_the_library_has_no_side_effects():
  library = sorted(set(import_graph()) - program_modules())
  result = probe_imports(library)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"imported {len(library)}" in result.stdout
  assert "changed" not in result.stdout, result.stdout


def test_the_side_effect_probe_sees_the_train_program_install_its_handler():
  result = probe_imports(["s5scale.train"])
  assert "changed: SIGTERM handler" in result.stdout, result.stdout + result.stderr[-2000:]


# ------------------------------------------------------------------------ README and docs

def tracked_text_files() -> list[pathlib.Path]:
  listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.split()
  suffixes = {".py", ".md", ".sh", ".mk", ".toml", ""}
  return [REPO / name for name in listed
          if pathlib.Path(name).suffix in suffixes and (REPO / name).is_file()
          and not name.startswith("tests/")]


DOC_PATH = re.compile(r"(?<![\w./-])((?:\.\./|\./)?[\w./-]*[\w-]\.(?:md|png))\b")


def cited_document_paths(path: pathlib.Path) -> list[str]:
  return DOC_PATH.findall(path.read_text(errors="replace"))


def missing_citations(files) -> list[str]:
  """'file: cited' for every document path a file cites that exists neither from the repository
  root nor from the file's own folder (markdown links are relative to it)."""
  missing = []
  for path in files:
    for cited in cited_document_paths(path):
      target = cited.split("#")[0]
      if not ((REPO / target).exists() or (path.parent / target).exists()):
        missing.append(f"{os.path.relpath(path, REPO)}: {cited}")
  return missing


def test_every_cited_document_exists():
  files = tracked_text_files()
  assert any(p.name == "README.md" for p in files)
  assert not missing_citations(files), missing_citations(files)


def test_the_citation_check_sees_a_missing_document(tmp_path):
  planted = REPO / "docs" / "design.md"
  assert planted.exists()
  note = tmp_path / "note.md"
  note.write_text("See docs/design.md and DESIGN.md §3 and [x](nowhere/gone.md).\n")
  assert cited_document_paths(note) == ["docs/design.md", "DESIGN.md", "nowhere/gone.md"]
  assert len(missing_citations([note])) == 2


def test_readme_is_a_users_page_of_at_most_250_lines():
  lines = (REPO / "README.md").read_text().splitlines()
  assert 40 < len(lines) <= 250, len(lines)
  text = "\n".join(lines)
  for command in ("make train", "make test"):
    assert command in text


ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\d+", re.I)


def test_no_issue_numbers_in_the_readme_or_docs():
  documents = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
  assert len(documents) >= 3
  found = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in documents
           for m in ISSUE_NUMBER.finditer(p.read_text())]
  assert not found, found
  assert ISSUE_NUMBER.search("as in issue 16") and ISSUE_NUMBER.search("Issue #3")
