"""TransformerLens specifics live in latent_hops/backend/ only: no other module imports
transformer_lens, touches ``cfg`` / ``run_with_hooks`` / ``run_with_cache`` / ``hooks`` /
``W_U`` / ``ln_final`` / ``unembed`` / the handle's ``tl``, or spells a hook name. A second backend (TL 4's
TransformerBridge) is then a new backend module, not a rewrite of the analyses."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "latent_hops"
TL_ATTRIBUTES = {"cfg", "run_with_hooks", "run_with_cache", "hooks", "W_U", "b_U", "ln_final", "unembed", "blocks",
                 "tl"}  # the handle's TransformerLens model: backend code only


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"imports {n}" for n in names if n.split(".")[0] == "transformer_lens"]
        elif isinstance(node, ast.Attribute) and node.attr in TL_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and ("hook_" in node.value or node.value.startswith("blocks."))):
            found.append(f"line {node.lineno}: hook name {node.value!r}")
    return found


def test_transformer_lens_appears_only_in_the_backend():
    offenders = {str(p.relative_to(PACKAGE)): v for p in sorted(PACKAGE.rglob("*.py"))
                 if "backend" not in p.relative_to(PACKAGE).parts and (v := _violations(p))}
    assert offenders == {}


def test_the_boundary_check_catches_a_hook_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""doc: blocks.0.hook_resid_post is fine here"""\nimport transformer_lens\n'
                   'x = model.cfg.n_layers\nname = "blocks.3.hook_attn_out"\n')
    assert sorted(_violations(bad)) == ["imports transformer_lens", "line 3: .cfg", "line 4: hook name 'blocks.3.hook_attn_out'"]
