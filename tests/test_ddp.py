"""2-process gloo DDP on CPU gives the loss curve of one process with the same global batch.

Also a script, started by the test with torchrun's environment variables, or by hand:
``torchrun --standalone --nproc_per_node 2 tests/test_ddp.py OUT STEPS``
(rank r trains on the r-th half of every global batch of the fake loader).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_engine import FakeLoader, Toy, cfg  # noqa: E402

from xlearner.engine import fit, load_checkpoint  # noqa: E402
from xlearner.engine.checkpoint import checkpoint_path  # noqa: E402

TOL = 1e-5  # fp32; only the summation order of the gradient all-reduce differs


def train(out: Path, steps: int, rank: int = 0, world: int = 1):
    torch.set_num_threads(1)
    c = cfg(steps=steps, ckpt_every=4, warmup_steps=2)
    return fit(Toy(dropout=0.0), FakeLoader(rank=rank, world=world), c, out, seed=5,
               device=torch.device("cpu"))


def lines(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


def test_ddp_two_ranks_match_single_process(tmp_path):
    steps = 8
    # two workers started directly with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    # MASTER_ADDR/PORT): the same path as torchrun, without a third process importing torch
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": "2", "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"),
                                                             os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(tmp_path / "ddp"), str(steps)],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert "world_size=2" in outs[0] and "world_size" not in outs[1]  # rank 0 alone prints

    single = train(tmp_path / "single", steps)
    a, b = lines(tmp_path / "single"), lines(tmp_path / "ddp")
    assert [r["step"] for r in b] == list(range(1, steps + 1))  # rank 0 alone writes the log
    for ra, rb in zip(a, b):
        for k in ("a", "b", "total", "lr"):
            assert abs(ra[k] - rb[k]) <= TOL, (ra["step"], k, ra[k], rb[k])
    s_ddp = load_checkpoint(checkpoint_path(tmp_path / "ddp"))
    assert s_ddp["images_seen"] == single.images_seen  # counted over both ranks
    assert len(s_ddp["rng"]) == 2 and s_ddp["world_size"] == 2
    w_single = load_checkpoint(checkpoint_path(tmp_path / "single"))["model"]
    for k, v in s_ddp["model"].items():
        assert not k.startswith("module."), k  # the unwrapped module's state
        assert torch.allclose(v, w_single[k], atol=TOL, rtol=0), k


if __name__ == "__main__":
    out, n = Path(sys.argv[1]), int(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    train(out, n, rank, world)
    from xlearner.engine import cleanup

    cleanup()
