"""A Raspberry Pi gateway's root file system as the project's docs set it up, built in a
temporary directory from the project's own unit (``gateway/cityedge-gateway.service``) and
example configuration: what the host probe (``cityedge hw host``) reads on a real Pi."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "gateway" / "cityedge-gateway.service"
CONFIG = REPO / "gateway" / "gateway.example.toml"
# the service user's uid: the files the test writes are owned by whoever runs it
SERVICE_UID = os.getuid() or 998
HASH = "$6$rounds=5000$saltsalt$" + "x" * 86  # the shape of a SHA-512 crypt hash

SSHD_MAIN = """\
# Debian's layout: drop-ins first, so their values win (the first value is used)
Include /etc/ssh/sshd_config.d/*.conf
KbdInteractiveAuthentication no
UsePAM yes
X11Forwarding yes
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
PasswordAuthentication yes
"""
SSHD_DROPIN = "PasswordAuthentication no\nPermitRootLogin no\n"
AUTO_UPGRADES = ('APT::Periodic::Update-Package-Lists "1";\n'
                 'APT::Periodic::Unattended-Upgrade "1";\n')
UNATTENDED = """\
// Debian's 50unattended-upgrades, shortened
Unattended-Upgrade::Origins-Pattern {
        "origin=Debian,codename=${distro_codename},label=Debian";
        "origin=Debian,codename=${distro_codename}-security,label=Debian-Security";
};
Unattended-Upgrade::Automatic-Reboot "false";
"""


def write(root: Path, path: str, text: str, mode: int = 0o644) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)
    return p


def hardened_root(root: Path) -> Path:
    """A gateway's root file system as the project's docs set it up."""
    write(root, "/etc/ssh/sshd_config", SSHD_MAIN)
    write(root, "/etc/ssh/sshd_config.d/50-cityedge.conf", SSHD_DROPIN)
    write(root, "/usr/sbin/sshd", "", 0o755)
    write(root, "/etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"
          "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
          "cityedge:x:%d:%d::/var/lib/cityedge:/usr/sbin/nologin\n"
          "ops:x:1001:1001:Ops:/home/ops:/bin/bash\n"
          "pi:x:1000:1000::/home/pi:/bin/bash\n" % (SERVICE_UID, SERVICE_UID))
    write(root, "/etc/shadow", "root:*:19000:0:99999:7:::\ndaemon:*:19000::::::\n"
          "cityedge:!:19000::::::\nops:%s:19000:0:99999:7:::\npi:!:19000::::::\n" % HASH,
          0o640)
    write(root, "/etc/apt/apt.conf.d/20auto-upgrades", AUTO_UPGRADES)
    write(root, "/etc/apt/apt.conf.d/50unattended-upgrades", UNATTENDED)
    write(root, "/usr/bin/unattended-upgrade", "", 0o755)
    write(root, "/etc/systemd/system/cityedge-gateway.service", UNIT.read_text())
    write(root, "/etc/cityedge/gateway.toml", CONFIG.read_text(), 0o640)
    write(root, "/etc/cityedge/gateway.key", "not read by the probe", 0o600)
    ident = root / "var/lib/cityedge/identity"
    ident.mkdir(parents=True)
    ident.chmod(0o700)
    write(root, "/var/lib/cityedge/identity/key0.pem", "not read by the probe", 0o600)
    return root
