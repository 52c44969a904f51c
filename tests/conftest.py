"""Test helpers: stage files start with a digit, so they are imported by path."""
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # kernels.py


def load_stage(name):
    """Import ROOT/<name>.py as a module (cached), e.g. load_stage("01_pretrain")."""
    module_name = "stage_" + name
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
