"""Test helpers: stage files start with a digit, so they are imported by path."""
import importlib.util
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # kernels.py

# Triton decides at `import triton.language` whether its own library functions (tl.zeros, ...) are
# interpreted, and kernels run under the interpreter only if they are. So the first import, whichever
# test module triggers it, happens here, in interpreter mode; test_kernels.py then interprets its
# kernels whatever the collection order. (Tests compile GPU kernels only in subprocesses.)
_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton.language  # noqa: E402, F401
except ImportError:  # no Triton on this platform: the kernel tests skip themselves
    pass
finally:
    if _interpret is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _interpret


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


import subprocess  # noqa: E402

import pytest  # noqa: E402

PY = sys.executable


def run_script(script, *args, timeout=600, stdin=None):
    """Run a stage as a user would (one thread, like CI's small machines); returns CompletedProcess."""
    return subprocess.run([PY, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, input=stdin, env={**os.environ, "OMP_NUM_THREADS": "1"})


def tiny_run(script, out, *args):
    """Run a stage with --preset tiny into out; -> (out, CompletedProcess). Fails the test on error."""
    result = run_script(script, "--preset", "tiny", "--out", out, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# One tiny run of each stage per test session, each on the one before: the chain later stages need.
@pytest.fixture(scope="session")
def tiny_pretrain(tmp_path_factory):
    return tiny_run("01_pretrain.py", tmp_path_factory.mktemp("01_pretrain"))


@pytest.fixture(scope="session")
def tiny_sft(tiny_pretrain, tmp_path_factory):
    return tiny_run("02_sft.py", tmp_path_factory.mktemp("02_sft"), "--init", tiny_pretrain[0])


@pytest.fixture(scope="session")
def tiny_cai(tiny_sft, tmp_path_factory):
    return tiny_run("03_constitutional_ai.py", tmp_path_factory.mktemp("03_cai"), "--init", tiny_sft[0])


@pytest.fixture(scope="session")
def tiny_dpo(tiny_cai, tmp_path_factory):
    return tiny_run("04_dpo.py", tmp_path_factory.mktemp("04_dpo"), "--init", tiny_cai[0])


@pytest.fixture(scope="session")
def tiny_grpo(tiny_dpo, tmp_path_factory):
    return tiny_run("05_grpo_reasoning.py", tmp_path_factory.mktemp("05_grpo"), "--init", tiny_dpo[0])


@pytest.fixture(scope="session")
def tiny_character(tiny_grpo, tmp_path_factory):
    return tiny_run("06_character.py", tmp_path_factory.mktemp("06_character"), "--init", tiny_grpo[0])


@pytest.fixture(scope="session")
def tiny_interp(tiny_character, tiny_sft, tmp_path_factory):
    return tiny_run("07_sae_interp.py", tmp_path_factory.mktemp("07_interp"), "--init", tiny_character[0],
                    "--checkpoints", tiny_sft[0])
