"""House rules that review keeps missing, checked on the source text (pure `ast`, no jax).

1. No module in jlora/ or train/ imports or reads another module's `_private` name: what is
   internal stays internal, and a name used elsewhere is made public (or moved).
2. No function in jlora/ or train/ is longer than 60 lines unless its docstring has a sentence
   starting with "Long because" that says why.
3. The README's Layout section lists every module of jlora/, jlora/models/, train/ and bench/.
"""

from __future__ import annotations

import ast
import pathlib
import re
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("jlora", "train")
MAX_LINES = 60


def _is_private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def _root_name(node: ast.expr) -> str | None:
  while isinstance(node, ast.Attribute):
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


# Public names of the standard library that start with an underscore all the same.
DOCUMENTED = {"os._exit"}
# Private modules of other projects that jlora reads on purpose, each with the reason.
ALLOWED_PRIVATE_MODULES = {
  # cuDNN's packed-rows attention: jax.nn.dot_product_attention takes no segment ids.
  "jax._src.cudnn.fused_attention_stablehlo",
}


def private_crossings(source: str, where: str) -> list[str]:
  """`where:line what` for each import or module attribute of a `_private` name in `source`."""
  tree = ast.parse(source)
  found, modules = [], set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      if any(_is_private(part) for part in (node.module or "").split(".")):
        found.append(f"{where}:{node.lineno} from {node.module} import ...")
      for alias in node.names:
        if _is_private(alias.name):
          found.append(f"{where}:{node.lineno} from {node.module} import {alias.name}")
        modules.add(alias.asname or alias.name)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name in ALLOWED_PRIVATE_MODULES:
          continue
        if any(_is_private(part) for part in alias.name.split(".")):
          found.append(f"{where}:{node.lineno} import {alias.name}")
        modules.add(alias.asname or alias.name.split(".")[0])
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _is_private(node.attr):
      if _root_name(node.value) in modules and ast.unparse(node) not in DOCUMENTED:
        found.append(f"{where}:{node.lineno} {ast.unparse(node)}")
  return found


def long_functions(source: str, where: str) -> list[str]:
  """`where:line name N lines` for each function over MAX_LINES without a "Long because" reason."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      n = node.end_lineno - node.lineno + 1
      if n > MAX_LINES and "Long because" not in (ast.get_docstring(node) or ""):
        found.append(f"{where}:{node.lineno} {node.name} {n} lines")
  return found


def _sources():
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      yield path.read_text(), str(path.relative_to(ROOT))


def test_no_private_names_cross_modules():
  found = [hit for source, where in _sources() for hit in private_crossings(source, where)]
  assert not found, "private names used across modules:\n" + "\n".join(found)


def test_no_long_functions_without_a_reason():
  found = [hit for source, where in _sources() for hit in long_functions(source, where)]
  assert not found, (
    f"functions over {MAX_LINES} lines whose docstring has no 'Long because ...':\n"
    + "\n".join(found)
  )


def test_the_checks_catch_what_they_are_for():
  bad = textwrap.dedent("""
    import jax._src.core
    from jlora import quant as quant_lib
    from jlora.config import _check, is_node
    from jax._src import api
    x = quant_lib._nearest_code(1) + jlora_free._fine
    y = quant_lib.public
  """)
  hits = private_crossings(bad, "m.py")
  assert sorted(h.split(" ", 1)[0] for h in hits) == ["m.py:2", "m.py:4", "m.py:5", "m.py:6"]
  assert any("quant_lib._nearest_code" in h for h in hits)
  body = "\n".join(f"  x{i} = {i}" for i in range(MAX_LINES))
  assert long_functions(f"def f():\n{body}\n", "m.py") == [f"m.py:1 f {MAX_LINES + 1} lines"]
  assert long_functions(f"def f():\n  'Long because a table.'\n{body}\n", "m.py") == []
  assert long_functions(f"def f():\n{body[: body.rindex(chr(10))]}\n", "m.py") == []


def _layout_rows() -> dict[str, set[str]]:
  """{folder: file names} as the README's Layout section lists them."""
  readme = (ROOT / "README.md").read_text()
  block = readme.split("## Layout\n", 1)[1].split("```\n", 2)[1]
  rows: dict[str, set[str]] = {}
  folder = None
  for line in block.splitlines():
    if line and not line.startswith(" "):
      folder, line = line.split(None, 1)[0].rstrip("/"), line.split(None, 1)[1]
    rows.setdefault(folder, set()).update(re.findall(r"\b([\w]+\.py)\b", line))
  return rows


def test_readme_layout_lists_every_module():
  rows = _layout_rows()
  for folder in ("jlora", "jlora/models", "train", "bench"):
    on_disk = {p.name for p in (ROOT / folder).glob("*.py")} - {"__init__.py"}
    listed = rows.get(folder, set()) - {"__init__.py"}
    assert listed == on_disk, (
      f"README Layout, {folder}/: missing {sorted(on_disk - listed)}, gone {sorted(listed - on_disk)}"
    )
