import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] != "cpu":
    # On a GPU the gradients of image samples are scatter-adds done with atomics, whose order
    # changes from run to run; the tests that compare two runs bit for bit need XLA's
    # deterministic kernels there (docs/training.md). Set before JAX starts its backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
