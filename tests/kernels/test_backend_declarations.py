"""Issue 20, item 4: each backend folder declares its devices, whether the automatic choice picks it and
its priority; the name list and the automatic order derive from the folders; no backend imports another."""
import ast
import importlib
import pathlib


backends = importlib.import_module("ladder_kernels.backends")


def test_every_folder_declares_itself():
    for name, folder in backends.FOLDERS.items():
        for attr in ("DEVICES", "AUTOMATIC", "PRIORITY", "status", "why_not"):
            assert hasattr(folder, attr), (name, attr)
        if folder.DEVICES is not None and folder.AUTOMATIC is not None:
            assert set(folder.AUTOMATIC) <= set(folder.DEVICES), name


def test_names_and_automatic_order_derive_from_the_folders():
    assert set(backends.NAMES) == {p.name for p in pathlib.Path(backends.__file__).parent.iterdir()
                                   if (p / "__init__.py").is_file()}
    assert backends.NAMES == ("triton", "cuda", "cpu", "torch")
    assert backends.auto_order("cuda") == ("triton", "cuda", "torch")
    assert backends.auto_order("cpu") == ("cpu", "torch")
    assert backends.auto_order("mps") == ("torch",)


def test_no_backend_imports_another():
    root = pathlib.Path(backends.__file__).parent
    bad = []
    for name in backends.NAMES:
        for path in (root / name).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                    other = node.module.split(".")[0]
                    if other in backends.NAMES and other != name:
                        bad.append(f"{path.relative_to(root)}:{node.lineno} from ..{node.module}")
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                        "ladder_kernels.backends."):
                    other = node.module.split(".")[2]
                    if other in backends.NAMES and other != name:
                        bad.append(f"{path.relative_to(root)}:{node.lineno} from {node.module}")
    # Triton's modules still fall back to the plain PyTorch kernels (APT for wide prompts); backends/triton/
    # is being rewritten elsewhere. Every other backend stands alone.
    assert all(b.startswith("triton/") for b in bad), bad
