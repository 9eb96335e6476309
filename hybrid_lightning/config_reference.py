"""The README's configuration reference, generated from HybridConfig's source (fields, defaults, comments).

    python -m hybrid_lightning.config_reference README.md
"""

from __future__ import annotations

import ast
import inspect
import io
import sys
import tokenize
from pathlib import Path

from hybrid_lightning import config


def reference_markdown() -> str:
    """The README's configuration reference: every field, its default and its comment, from the source."""
    source = inspect.getsource(config)
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def rows(cls_name: str, prefix: str) -> list[str]:
        out = []
        for node in classes[cls_name].body:
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            name, ann = node.target.id, ast.unparse(node.annotation)
            if ann in classes:
                out += rows(ann, f"{prefix}{name}.")
                continue
            default = ast.unparse(node.value) if node.value is not None else ""
            ann = ann.replace("|", "\\|")
            out.append(f"| `{prefix}{name}` | `{ann}` | `{default}` | {comments.get(node.lineno, '')} |")
        return out

    header = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(header + rows("HybridConfig", ""))


def update_readme(path: str | Path = "README.md") -> bool:
    """Rewrite the configuration reference between the README's markers; True if it changed."""
    path = Path(path)
    text = path.read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{reference_markdown()}\n{end}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")
