"""The README's plain-PyTorch example runs and learns."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_plain_pytorch_example_trains_with_mc_curvature(capsys):
    example = next(b for b in python_blocks() if "add_sampled_label_curvature" in b and "Sequential" in b)
    namespace = {}
    exec(compile(example, "README example", "exec"), namespace)
    assert namespace["opt"].state, "the optimizer never stepped"
    assert namespace["accuracy"] > 0.8
    assert "train accuracy" in capsys.readouterr().out
