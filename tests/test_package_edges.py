"""Dependencies point one way (DESIGN "Layout"): data_pipelines may use titans_train, never the
reverse. An AST scan, so an import inside a function (a lazy one) counts too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "titans_train"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_titans_train_never_imports_data_pipelines():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan sees the package
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if name == "data_pipelines" or name.startswith("data_pipelines.")
    ]
    assert not offenders, "\n".join(offenders)
