"""The remote model proxy (workers/sandbox/remote.py) against a real model server process
(unjailed here; the jailed one is tested in tests/service/test_model_split.py): the same
logits and input gradients as the model in this process, bit for bit, under the forms the
attack search uses (bf16 autocast, channels_last), in chunks, and after its graph was
dropped; and the seccomp filter the server runs under."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.factories import META, tiny_net
from tests.factories import torchscript_bytes as scripted
from workers.engine.attacks.base import Forward, ce_loss
from workers.engine.models import ModelSpec, load
from workers.sandbox.config import JailConfig
from workers.sandbox.jail import ModelServer
from workers.sandbox.protocol import ServerJob
from workers.sandbox.remote import ModelChannel, RemoteModel

# Each test starts model-server processes (torch imported in each): the slow tier.
pytestmark = pytest.mark.slow


def serve(tmp_path: Path, model: bytes, shm: int = 1 << 20, timeout: float = 120.0
          ) -> tuple[ModelServer, RemoteModel]:
    server = ModelServer(JailConfig(slot_root=tmp_path, model_shm=shm), tmp_path / "server",
                         jailed=False)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(model)
    fds = server.evaluator_fds
    server.evaluator_fds = ()  # this process is the evaluator: the channel owns them now
    job = ServerJob(model_format="torchscript", model_metadata=META,
                    threads=torch.get_num_threads(), device="cpu")
    link = server.start(ckpt, job, fds, timeout)
    channel = ModelChannel(link.request, link.reply, link.shm, link.shm_size, 4,
                           timeout=link.timeout)
    channel.wait_ready(timeout)
    return server, RemoteModel(channel)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[nn.Module, RemoteModel, ModelServer]]:
    data = scripted(tiny_net())
    (tmp_path / "local.pt").write_bytes(data)
    local = load(tmp_path / "local.pt", ModelSpec.from_metadata("torchscript", META))
    server, remote = serve(tmp_path, data, shm=40 * 3 * 32 * 32 * 4)  # 40 rows a chunk
    yield local, remote, server
    remote.channel.close()
    server.close()


def test_logits_and_input_gradients_are_those_of_the_local_model(
        served: tuple[nn.Module, RemoteModel, ModelServer]) -> None:
    local, remote, _ = served
    x = torch.rand(100, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 3 chunks
    y = torch.arange(100) % 4
    with torch.no_grad():
        assert torch.equal(remote(x), local(x))
    for amp, channels_last in [(False, False), (True, True)]:
        got = Forward(remote, amp=amp, channels_last=channels_last, probe=False)
        want = Forward(local, amp=amp, channels_last=channels_last, probe=False)
        a, b = got.loss_grad(x, y, ce_loss), want.loss_grad(x, y, ce_loss)
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v), (amp, channels_last)
    assert remote.channel.requests == 3 + 2 * 6  # a forward and a VJP per chunk per step


def test_several_gradients_of_one_forward_and_a_dropped_graph(
        served: tuple[nn.Module, RemoteModel, ModelServer]) -> None:
    local, remote, _ = served
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def grads(model: nn.Module) -> list[torch.Tensor]:
        xg = x.clone().requires_grad_(True)
        first = model(xg)
        second = model(xg * 0.5)  # a newer forward: the server gives up the first's graph
        g1 = torch.autograd.grad(first[:, 0].sum(), xg, retain_graph=True)[0]
        g2 = torch.autograd.grad(first[:, 1].sum(), xg)[0]
        g3 = torch.autograd.grad(second.sum(), xg)[0]
        return [g1, g2, g3]

    for u, v in zip(grads(remote), grads(local), strict=True):
        assert torch.equal(u, v)


def test_the_engine_probe_keeps_the_fast_form_of_a_remote_model(
        served: tuple[nn.Module, RemoteModel, ModelServer]) -> None:
    """bf16 and channels_last reach the server, so the probe judges the model itself."""
    local, remote, _ = served
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got = Forward(remote, amp=True, channels_last=True, optimise=True)
    want = Forward(local, amp=True, channels_last=True, optimise=True)
    assert torch.equal(got(x), want(x))
    assert (got.amp, got.channels_last, got.fallback) == (want.amp, want.channels_last,
                                                          want.fallback)


def test_the_server_runs_under_its_seccomp_filter(
        served: tuple[nn.Module, RemoteModel, ModelServer]) -> None:
    _, _, server = served
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    assert "Seccomp:\t2" in status  # filter mode
    assert "NoNewPrivs:\t1" in status


def test_the_seccomp_filter_refuses_exec_fork_and_sockets_and_keeps_threads() -> None:
    code = """
import json, os, socket, subprocess, threading
import torch
torch.set_num_threads(2)
from workers.sandbox import seccomp

seccomp.install()
out = {}
t = threading.Thread(target=lambda: out.setdefault("thread", "ran")); t.start(); t.join()
out["matmul"] = float((torch.ones(256, 256) @ torch.ones(256, 256)).sum())
def attempt(name, f):
    try:
        f(); out[name] = "allowed"
    except OSError as e:
        out[name] = e.errno
attempt("fork", os.fork)
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("spawn", lambda: subprocess.run(["/bin/true"]))
attempt("socket", socket.socket)
attempt("socketpair", socket.socketpair)
attempt("unix", lambda: socket.socket(socket.AF_UNIX))
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True, cwd=Path(__file__).resolve().parents[2])
    seen = json.loads(res.stdout)
    assert seen == {"thread": "ran", "matmul": 256.0 ** 3, "fork": 1, "exec": 1, "spawn": 1,
                    "socket": 1, "socketpair": 1, "unix": 1}  # EPERM


def test_the_servers_first_input_gradient_does_not_import_sympy() -> None:
    """The first VJP a job's model server answers costs about what its backward costs: an
    output-gradient tensor passed to ``autograd.grad`` makes torch import its symbolic shapes
    and sympy (seconds of CPU in every job); the server's form does not. Its numbers are
    those of the output-gradient form, bit for bit."""
    code = """
import json, sys
import torch
from workers.sandbox.model_server import input_gradient

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                          torch.nn.Linear(4 * 6 * 6, 5))
x = torch.rand(6, 3, 8, 8, requires_grad=True)
logits = net(x)
grad = torch.randn(6, 5)
before = set(sys.modules)
got = input_gradient(logits, x, grad)
imported = sorted(m for m in set(sys.modules) - before
                  if m.split(".")[0] == "sympy" or m.endswith("symbolic_shapes"))
(want,) = torch.autograd.grad(logits, x, grad)
print(json.dumps({"imported": imported, "equal": bool(torch.equal(got, want))}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True, cwd=Path(__file__).resolve().parents[2])
    assert json.loads(res.stdout) == {"imported": [], "equal": True}
