"""Imports flow one way: entry -> training / evaluation -> inference -> models, diffusion, priors,
data.

Module-level and function-level imports alike (an import inside a function is still a
dependency). A cycle, or an import against the flow, fails with the edge that breaks it.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vqvdm_jax"

# (importer prefix, imported prefix): never allowed.
FORBIDDEN = [
    ("vqvdm_jax.evaluation", "vqvdm_jax.training"),
    *[(low, high) for low in ("vqvdm_jax.inference", "vqvdm_jax.models", "vqvdm_jax.diffusion",
                              "vqvdm_jax.priors", "vqvdm_jax.data", "vqvdm_jax.config",
                              "vqvdm_jax.sharding",
                              "vqvdm_jax.checkpointing", "vqvdm_jax.workdir")
      for high in ("vqvdm_jax.training", "vqvdm_jax.evaluation", "vqvdm_jax.main")],
    *[(low, "vqvdm_jax.inference") for low in ("vqvdm_jax.models", "vqvdm_jax.diffusion",
                                               "vqvdm_jax.priors", "vqvdm_jax.data",
                                               "vqvdm_jax.config")],
]


def module_name(path: Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports (the deepest existing module of each name)."""
  paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
  graph = {name: set() for name in paths}
  for name, path in paths.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
      else:
        continue
      for target in targets:
        while target and target not in paths:
          target = target.rpartition(".")[0]
        # Importing a parent package (vqvdm_jax itself) only reaches its submodules.
        if target and target != name and not name.startswith(target + "."):
          graph[name].add(target)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == 1:
        return path[path.index(target):] + [target]
      if target not in state and (cycle := visit(target)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_package_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, " -> ".join(cycle)


def test_imports_flow_one_way():
  graph = import_graph()
  against = [f"{a} -> {b}" for a, targets in graph.items() for b in sorted(targets)
             for low, high in FORBIDDEN if a.startswith(low) and b.startswith(high)]
  assert not against, against


def test_the_checker_sees_cycles_and_function_level_imports():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
  graph = import_graph()
  assert "vqvdm_jax.inference.model" in graph["vqvdm_jax"]  # only inside __getattr__
