"""mosquitto as a device runs it: Debian's main config including a conf.d that holds the shipped files
(systemd/mosquitto) as the image and the Ansible role install them, with only ports and paths changed; the
password file holds the given accounts, hashed as the appliance hashes them.

``tls`` stands for the role's ``mosquitto_tls: true``: its template (ansible/roles/mosquitto/templates) takes the
place of appliance-lan.conf, as the role does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import jinja2

from appliance.firstboot.accounts import hash_password
from appliance.transports.broker import Mosquitto, free_port
from tests.support.harness import REPO

SHIPPED = REPO / "systemd" / "mosquitto"
TLS_TEMPLATE = REPO / "ansible/roles/mosquitto/templates/appliance-tls.conf.j2"


class ShippedBroker(Mosquitto):
    """``port`` is the loopback listener (1883 on a device), ``lan_port`` the plain LAN one (1884), ``tls_port``
    the TLS one (8883) when ``tls`` holds (cert, key) file paths."""

    def __init__(self, data_dir: Path, users: dict[str, str], tls: tuple[Path, Path] | None = None) -> None:
        super().__init__(data_dir, free_port(), persistence=False)
        self.users, self.tls = users, tls
        self.lan_port, self.tls_port = free_port(), free_port()

    def _write_conf(self) -> None:
        d = self.data_dir
        confd = d / "conf.d"
        confd.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        (d / "passwd").write_text("".join(f"{u}:{hash_password(p)}\n" for u, p in self.users.items()))
        (d / "acl").write_text((SHIPPED / "appliance.acl").read_text())
        paths = {"/etc/mosquitto/appliance.passwd": str(d / "passwd"), "/etc/mosquitto/appliance.acl": str(d / "acl"),
                 "listener 1883 ": f"listener {self.port} ", "listener 1884\n": f"listener {self.lan_port}\n",
                 "log_dest syslog": f"log_dest file {self.log_file}"}
        files = {"appliance.conf": (SHIPPED / "appliance.conf").read_text()}
        if self.tls is None:
            if (SHIPPED / "appliance-lan.conf").is_file():
                files["appliance-lan.conf"] = (SHIPPED / "appliance-lan.conf").read_text()
        else:
            cert, key = self.tls
            files["appliance-tls.conf"] = jinja2.Template(TLS_TEMPLATE.read_text()).render(
                ansible_managed="test", mosquitto_tls_port=self.tls_port, mosquitto_tls_ca="")
            paths.update({"/etc/mosquitto/certs/appliance.crt": str(cert),
                          "/etc/mosquitto/certs/appliance.key": str(key)})
        for name, text in files.items():
            for shipped, here in paths.items():
                text = text.replace(shipped, here)
            (confd / name).write_text(text)
        # Debian's /etc/mosquitto/mosquitto.conf, less its pid file and its persistence (the tests need none)
        self.conf.write_text(f"persistence false\nlog_dest stderr\ninclude_dir {confd}\n"
                             + ("user root\n" if os.geteuid() == 0 else ""))


def make_certificates(directory: Path, addresses: list[str]) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed for ``addresses`` (IP SANs): (ca, cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr = directory / "server.crt", directory / "server.key", directory / "server.csr"
    sans = directory / "san.ext"
    sans.write_text("subjectAltName=" + ",".join(f"IP:{a}" for a in addresses) + "\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", "/CN=test CA", "-keyout", str(ca_key), "-out", str(ca))
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=device",
            "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
            "-extfile", str(sans), "-out", str(cert))
    return ca, cert, key
