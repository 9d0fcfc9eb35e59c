#!/usr/bin/env python3
"""Virtual hosts on one machine: SLURM's multi-node paths without a cluster (root, iproute2).

    sudo python3 slurm/vhosts.py [--nodes 2] [--gpus 2] [--job-id 4242] -- bash slurm/pretrain.sh ARGS

builds N "hosts" (``vnode1`` .. ``vnodeN``) and runs the command as SLURM's batch step on the first
one, then tears everything down, also on failure or Ctrl-C:

- each host is a network namespace with its own UTS namespace (``hostname`` answers ``vnodeK``);
  two hosts share one veth pair, more hang off a bridge in a namespace of its own; every host's
  link is called ``lj0`` and holds ``10.77.0.K/24``;
- the host names resolve inside the namespaces only (``/etc/netns/NS/hosts``, which ``ip netns
  exec`` mounts over ``/etc/hosts``); the machine's own ``/etc/hosts`` and network are untouched,
  and a namespace holds no other interface than ``lo`` and ``lj0``, so no traffic can leave them;
- stubs stand in for SLURM's commands on ``PATH``: ``scontrol show hostnames`` prints the hosts,
  ``scontrol requeue ID`` is recorded in ``$VHOSTS_DIR/scontrol.log``, and ``srun`` starts one task
  per host in that host's namespaces with ``SLURM_NODEID`` / ``SLURM_PROCID`` / ``SLURMD_NODENAME``
  set, forwards SIGUSR1, SIGTERM and SIGINT to the tasks, and returns the highest exit status;
- the batch step gets ``SLURM_JOB_ID``, ``SLURM_JOB_NODELIST=vnode[1-N]``, ``SLURM_NNODES``,
  ``SLURM_JOB_NUM_NODES``, ``SLURM_NODEID=0``, ``GPUS`` (ranks per host) and
  ``GLOO_SOCKET_IFNAME=lj0``: the interface the collectives use, as one sets it on a cluster.

The integration tests (tests/integration/test_multinode.py) use :class:`VirtualCluster` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IFACE = "lj0"
SUBNET = "10.77.0"
SRUN = r'''#!/usr/bin/env python3
"""srun stand-in: one task per virtual host, in that host's namespaces."""
import json, os, signal, subprocess, sys

cluster = json.load(open(os.environ["VHOSTS_FILE"]))
args, nodes = sys.argv[1:], len(cluster["hosts"])
while args and args[0].startswith("-"):
    opt = args.pop(0)
    if opt == "--nodes":
        nodes = int(args.pop(0))
    elif opt in ("--ntasks-per-node", "--ntasks", "-N", "-n"):
        args.pop(0)
procs = []
for k, host in enumerate(cluster["hosts"][:nodes]):
    env = dict(os.environ, SLURM_NODEID=str(k), SLURM_PROCID=str(k), SLURM_LOCALID="0",
               SLURMD_NODENAME=host["name"], SLURM_STEP_ID="0")
    procs.append(subprocess.Popen(host["exec"] + args, env=env))
for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, f: [p.send_signal(s) for p in procs if p.poll() is None])
codes = []
for p in procs:
    while True:
        try:
            codes.append(p.wait())
            break
        except InterruptedError:
            continue
codes = [c if c >= 0 else 128 - c for c in codes]
print(f"srun: task exit codes {codes}", file=sys.stderr, flush=True)
sys.exit(max(codes))
'''
SCONTROL = r"""#!/bin/bash
# scontrol stand-in: `show hostnames` prints the virtual hosts, `requeue ID` is recorded.
if [[ $1 == show && $2 == hostnames ]]; then
	printf '%s\n' __HOSTS__
elif [[ $1 == requeue ]]; then
	echo "requeue $2" >>"$VHOSTS_DIR/scontrol.log"
else
	echo "scontrol stub: unsupported: $*" >&2
	exit 1
fi
"""


class VhostsError(RuntimeError):
    """The virtual hosts could not be made (not root, no iproute2, no namespaces)."""


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise VhostsError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")


def unavailable() -> str | None:
    """Why virtual hosts can't be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2 / util-linux)"
    probe = f"ljprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except VhostsError as err:
        return f"cannot create a network namespace: {err}"
    _ip("netns", "del", probe)
    return None


class VirtualCluster:
    """``nodes`` virtual hosts joined on one link; a context manager that always tears down."""

    def __init__(self, nodes: int = 2, workdir: str | Path | None = None) -> None:
        if nodes < 2:
            raise ValueError("a virtual cluster needs at least 2 hosts")
        self.nodes, self.tag = nodes, f"ljv{os.getpid() % 100000}"
        self.names = [f"vnode{k + 1}" for k in range(nodes)]
        self.netns = [f"{self.tag}-{k + 1}" for k in range(nodes)]
        self.addrs = [f"{SUBNET}.{k + 1}" for k in range(nodes)]
        self.bridge_ns = f"{self.tag}-br" if nodes > 2 else None
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="vhosts-"))
        self.bin = self.dir / "bin"
        self.up = False

    @property
    def nodelist(self) -> str:
        return f"vnode[1-{self.nodes}]"

    def exec_prefix(self, k: int) -> list[str]:
        """The argv prefix that runs a command on host ``k`` (0-based): its network namespace, a
        UTS namespace named after it."""
        return ["ip", "netns", "exec", self.netns[k], "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.names[k]]  # fmt: skip

    def __enter__(self) -> VirtualCluster:
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _build(self) -> None:
        reason = unavailable()
        if reason:
            raise VhostsError(reason)
        self.up = True
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{a} {n}\n" for a, n in zip(self.addrs, self.names, strict=True)
        )
        for ns in self.netns + ([self.bridge_ns] if self.bridge_ns else []):
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", ns=ns)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
        if self.bridge_ns is None:  # two hosts: one veth pair, one end in each
            a, b = f"{self.tag}a", f"{self.tag}b"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            for end, ns in ((a, self.netns[0]), (b, self.netns[1])):
                _ip("link", "set", end, "netns", ns)
                _ip("link", "set", end, "name", IFACE, ns=ns)
        else:  # more: each host's veth pair ends on a bridge in a namespace of its own
            _ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
            _ip("link", "set", "br0", "up", ns=self.bridge_ns)
            for k, ns in enumerate(self.netns):
                a, b = f"{self.tag}h{k}", f"{self.tag}p{k}"
                _ip("link", "add", a, "type", "veth", "peer", "name", b)
                _ip("link", "set", a, "netns", ns)
                _ip("link", "set", a, "name", IFACE, ns=ns)
                _ip("link", "set", b, "netns", self.bridge_ns)
                _ip("link", "set", b, "master", "br0", ns=self.bridge_ns)
                _ip("link", "set", b, "up", ns=self.bridge_ns)
        for ns, addr in zip(self.netns, self.addrs, strict=True):
            _ip("addr", "add", f"{addr}/24", "dev", IFACE, ns=ns)
            _ip("link", "set", IFACE, "up", ns=ns)
        self._write_stubs()

    def _write_stubs(self) -> None:
        self.bin.mkdir(parents=True, exist_ok=True)
        info = {"hosts": [{"name": n, "netns": ns, "addr": a, "exec": self.exec_prefix(k)}
                          for k, (n, ns, a) in enumerate(zip(self.names, self.netns, self.addrs, strict=True))]}  # fmt: skip
        (self.dir / "cluster.json").write_text(json.dumps(info, indent=2) + "\n")
        for name, text in (
            ("srun", SRUN),
            ("scontrol", SCONTROL.replace("__HOSTS__", " ".join(self.names))),
        ):
            path = self.bin / name
            path.write_text(text)
            path.chmod(0o755)

    def env(self, job_id: str, gpus: int, base: dict[str, str] | None = None) -> dict[str, str]:
        """The batch step's environment: SLURM's variables, the stubs first on PATH, the
        collectives' interface."""
        env = dict(os.environ if base is None else base)
        env.update(SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST=self.nodelist,
                   SLURM_NNODES=str(self.nodes), SLURM_JOB_NUM_NODES=str(self.nodes),
                   SLURM_NODEID="0", GPUS=str(gpus), GLOO_SOCKET_IFNAME=IFACE,
                   VHOSTS_FILE=str(self.dir / "cluster.json"), VHOSTS_DIR=str(self.dir),
                   PATH=f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}")  # fmt: skip
        return env

    def popen(self, k: int, argv: list[str], **kwargs: object) -> subprocess.Popen:
        """Start ``argv`` on host ``k`` in a new session (so its process group can be signalled)."""
        return subprocess.Popen(self.exec_prefix(k) + argv, start_new_session=True, **kwargs)  # type: ignore[call-overload]

    def pids(self, k: int) -> list[int]:
        """Every process in host ``k``'s network namespace."""
        r = subprocess.run(["ip", "netns", "pids", self.netns[k]], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def signal_host(self, k: int, sig: int) -> list[int]:
        """Send ``sig`` to every process on host ``k`` (what SLURM does to a step's processes, or
        a machine that dies with ``SIGKILL``); returns the pids."""
        pids = self.pids(k)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def cut(self, k: int) -> None:
        """Take host ``k``'s link down: a network partition (its processes keep running)."""
        _ip("link", "set", IFACE, "down", ns=self.netns[k])

    def heal(self, k: int) -> None:
        """Bring host ``k``'s link back up (its address and route come back with it)."""
        _ip("link", "set", IFACE, "up", ns=self.netns[k])

    def teardown(self) -> None:
        """Kill whatever still runs on the hosts, delete the namespaces and their files."""
        if self.up:
            for k in range(self.nodes):
                self.signal_host(k, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while any(self.pids(k) for k in range(self.nodes)) and time.monotonic() < deadline:
                time.sleep(0.1)
            for ns in self.netns + ([self.bridge_ns] if self.bridge_ns else []):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
                shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
            self.up = False
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def leftovers(prefix: str = "ljv") -> list[str]:
    """Namespaces of virtual clusters still present (a teardown check)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(prefix)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slurm/vhosts.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--nodes", type=int, default=2, help="virtual hosts (default 2)")
    p.add_argument("--gpus", type=int, default=2, help="ranks per host (GPUS; default 2)")
    p.add_argument("--job-id", default="4242", help="SLURM_JOB_ID (default 4242)")
    p.add_argument(
        "--timeout", type=float, default=3600, help="kill the step after this many seconds"
    )
    p.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- the batch step, e.g. bash slurm/pretrain.sh"
    )
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command: vhosts.py [options] -- bash slurm/pretrain.sh ...")
    try:
        with VirtualCluster(args.nodes) as cluster:
            env = cluster.env(args.job_id, args.gpus)
            print(f"vhosts: {', '.join(f'{n}={a}' for n, a in zip(cluster.names, cluster.addrs, strict=True))}"
                  f" on {IFACE}; batch step on {cluster.names[0]}", file=sys.stderr, flush=True)  # fmt: skip
            proc = cluster.popen(0, command, env=env)
            try:
                rc = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"vhosts: timeout after {args.timeout:.0f} s", file=sys.stderr)
                rc = 124
            except KeyboardInterrupt:
                rc = 130
            log = cluster.dir / "scontrol.log"
            if log.is_file():
                print(f"vhosts: scontrol calls: {log.read_text().strip()}", file=sys.stderr)
    except VhostsError as err:
        print(f"vhosts: {err}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
