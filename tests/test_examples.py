"""The example scripts in python/ run: each in its ``--quick`` mode (2 layers, 2 steps), in-process.

Their default sizes take 24-32 s each on the 2-core VM (measured; stated in each docstring and in
docs/benchmarks.md), too long for the suite, so the defaults are timed by hand, not here. Examples that
save write into a temporary working directory.
"""

import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.stem for p in (REPO / "python").glob("*.py"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"grit_example_quick_{name}", REPO / "python" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_states_a_measured_runtime(name):
    doc = _load(name).__doc__ or ""
    line = next((ln for ln in doc.splitlines() if ln.startswith("Runtime:")), "")
    assert any(ch.isdigit() for ch in line), (
        f"python/{name}.py: no 'Runtime: <measured time>' line in its docstring"
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_quick_run(name, tmp_path, monkeypatch):
    if name == "qlora":
        pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    result = _load(name).main(["--quick"])
    if name == "trainer":
        assert math.isfinite(result["eval_loss"])
        assert (tmp_path / "runs" / "trainer-example" / "adapter_config.json").is_file()
    elif name == "compare":
        for kind in ("adamw", "grit"):
            loss, step_s = result[kind]
            assert math.isfinite(loss) and step_s > 0
    else:
        assert math.isfinite(result) and result > 0


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_fuses_by_default_with_an_opt_out(name):
    """Users copy these: the fast path (gk.fuse / GritTrainer's grit_fuse) is what they show, with --no-fuse."""
    source = (REPO / "python" / f"{name}.py").read_text()
    assert "--no-fuse" in source and ("gk.fuse(" in source or "grit_fuse=not args.no_fuse" in source), name
