"""Reaching the simulated cluster's hosts over ssh, as mlx.launch reaches a user's Macs.

Each host (a network namespace, tests/netns_cluster.py) runs its own OpenSSH `sshd`,
listening on its management address only, with a host name of its own (a UTS namespace),
so ranks print `[rank 1 (h1-RUNID)]` as on separate machines. Everything ssh needs lives
in one throwaway folder: a key pair, the sshd config, the client config (aliases,
known host key, batch mode, short timeouts), and a wrapper `bin/ssh` that adds
`-F <config>` and is put first on the launcher's PATH (mlx.launch runs plain
`ssh -tt HOST CMD` through bash, so PATH decides). Root's ~/.ssh is never touched.

The ranks' environment over ssh is sshd's, not the launcher's, as on a real cluster; the
config sets PATH so that `python3` there is this machine's (the README's "the same Python
environment on every host").
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself and insists on an absolute path
INSTALL_S = 240  # apt-get's whole install, at most
START_S = 10.0  # one sshd listening, at most
CONNECT_S = 5  # ssh's ConnectTimeout


def sshd_missing_reason(install: bool = True) -> str | None:
    """None when OpenSSH's sshd and ssh-keygen are here (installing openssh-server with
    apt-get when missing, as root, if `install`), else why not, for a skip message."""
    if os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen"):
        return None
    if not install:
        return f"{SSHD} is not installed (apt-get install openssh-server)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return (f"{SSHD} is not installed and cannot be installed here (needs root and "
                "apt-get): install openssh-server")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server",
           "openssh-client"]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=INSTALL_S,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0 and "Unable to locate" in p.stderr + p.stdout:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True,
                           timeout=INSTALL_S, stdin=subprocess.DEVNULL)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                               timeout=INSTALL_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"installing openssh-server took over {INSTALL_S} s"
    if p.returncode != 0 or not os.path.exists(SSHD):
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return f"apt-get install openssh-server failed ({p.returncode}): {tail[0]}"
    return None


class SshSetup:
    """The throwaway keys and configs in `folder` for hosts {alias: address}."""

    def __init__(self, folder: Path, hosts: dict):
        self.folder = Path(folder)
        self.hosts = dict(hosts)
        self.key = self.folder / "id_ed25519"
        self.host_key = self.folder / "host_ed25519"
        self.config = self.folder / "ssh_config"
        self.bin = self.folder / "bin"

    def write(self):
        """Keys, known_hosts, the client config and the ssh wrapper."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for key in (self.key, self.host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "netns-cluster",
                            "-f", str(key)], check=True, capture_output=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        (self.folder / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        host_pub = " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])
        names = ",".join([*self.hosts, *self.hosts.values()])
        (self.folder / "known_hosts").write_text(f"{names} {host_pub}\n")
        blocks = [f"Host {alias}\n    HostName {addr}\n" for alias, addr in self.hosts.items()]
        common = (f"Host *\n    User root\n    IdentityFile {self.key}\n"
                  f"    IdentitiesOnly yes\n    UserKnownHostsFile {self.folder}/known_hosts\n"
                  "    StrictHostKeyChecking yes\n    CheckHostIP no\n    BatchMode yes\n"
                  f"    ConnectTimeout {CONNECT_S}\n    ServerAliveInterval 5\n"
                  "    ServerAliveCountMax 3\n    LogLevel ERROR\n")
        self.config.write_text("".join(blocks) + common)
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {self.config} "$@"\n')
        wrapper.chmod(0o755)

    def sshd_config(self, address: str, name: str) -> Path:
        """The config of host `name`'s sshd, listening on `address` only."""
        path = self.folder / f"sshd_{name}.conf"
        path_env = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get(
            "PATH", "/usr/local/bin:/usr/bin:/bin")])
        path.write_text(
            f"ListenAddress {address}\nPort 22\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.folder}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PrintMotd no\nPrintLastLog no\nPidFile none\nLogLevel ERROR\n"
            "MaxStartups 64\nMaxSessions 64\nClientAliveInterval 5\n"
            f"SetEnv PATH={path_env}\n")
        return path

    def env(self, base: dict | None = None) -> dict:
        """An environment whose `ssh` is the wrapper: for mlx.launch and its kind."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env


def start_sshd(netns: str, hostname: str, config: Path, log: Path) -> subprocess.Popen:
    """sshd in the foreground (-D) inside `netns`, in a UTS namespace named `hostname`;
    the caller owns the process (and its session: every rank started through it)."""
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
    inner = f"hostname {hostname} && exec {SSHD} -D -e -f {config}"
    with open(log, "ab") as out:
        return subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "--uts", "sh", "-c",
                                 inner], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)


def wait_listening(address: str, proc: subprocess.Popen, log: Path, within: float = START_S):
    """Until `address`:22 accepts a connection (from the root namespace, over the
    management link); raises with sshd's log when it died or took too long."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd for {address} exited with {proc.returncode}: "
                               f"{Path(log).read_text()[-2000:]}")
        try:
            with socket.create_connection((address, 22), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd for {address} did not listen within {within} s: "
                       f"{Path(log).read_text()[-2000:]}")
