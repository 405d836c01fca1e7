"""The README's Python example runs as written (on two small NIfTI files made here)."""

import re
from pathlib import Path

import jax
import numpy as np

import jaxreg
from jaxreg import synthetic

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    fixed, _ = synthetic.blobs(jax.random.PRNGKey(0), (12, 11, 10))
    moving, _ = synthetic.blobs(jax.random.PRNGKey(1), (12, 11, 10))
    affine = np.diag([1.5, 1.5, 2.0, 1.0]).astype(np.float32)
    jaxreg.save(jaxreg.Image(np.asarray(fixed), affine), tmp_path / "fixed.nii.gz")
    jaxreg.save(jaxreg.Image(np.asarray(moving), affine), tmp_path / "moving.nii.gz")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    grad = np.asarray(namespace["grad"])
    assert grad.shape == (12, 11, 10, 3)
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
