"""A mosquitto the appliance starts itself: the private loopback broker of `make run`, and the tests' broker."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    pass


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when its parent dies, so a killed appliance leaves no broker."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    except OSError:
        pass


class Mosquitto:
    """One mosquitto process bound to ``host:port`` with its config, data and log under ``data_dir``.

    ``extra`` is appended to the generated config (password_file, acl_file ...). Anonymous clients are allowed
    unless ``extra`` sets ``allow_anonymous false``: the broker only listens on loopback.
    """

    def __init__(self, data_dir: Path, port: int, *, host: str = "127.0.0.1", persistence: bool = True,
                 extra: str = "") -> None:
        self.data_dir, self.host, self.port = Path(data_dir), host, port
        self.persistence, self.extra = persistence, extra
        self.conf = self.data_dir / "mosquitto.conf"
        self.log_file = self.data_dir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    def _write_conf(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} {self.host}",
                 "allow_anonymous true" if "allow_anonymous" not in self.extra else "",
                 f"persistence {'true' if self.persistence else 'false'}",
                 f"persistence_location {self.data_dir}/",
                 "autosave_interval 60",
                 "log_dest stderr", "log_type error", "log_type warning", "log_type notice",
                 "max_queued_messages 10000",
                 "set_tcp_nodelay true"]  # Nagle + delayed ACKs add ~40 ms to every small reply
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', which cannot reach a root-owned data dir
        self.conf.write_text("\n".join(line for line in lines if line) + "\n" + self.extra + "\n")

    def start(self, timeout: float = 10.0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("mosquitto is not installed (Debian: apt install mosquitto)")
        self._write_conf()
        with self.log_file.open("ab") as log_fh:
            self._process = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log_fh, stderr=log_fh,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"mosquitto exited with code {self._process.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    log.info("private mosquitto listening on %s:%d (data in %s)", self.host, self.port,
                             self.data_dir)
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout} s")

    def log_tail(self, lines: int = 10) -> str:
        try:
            return " | ".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Terminate (mosquitto saves its persistence file on SIGTERM). Idempotent."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._process = None
