"""Every time, size and count the provisioning tool uses, with its unit, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProvisionLimits:
    baudrate: int = 115200  # bits/s on the device's USB UART (a pty ignores it)
    open_timeout_s: float = 5.0  # seconds to open the port and get a hello answer
    reply_timeout_s: float = 5.0  # seconds for a device reply to an ordinary step
    keygen_timeout_s: float = 20.0  # seconds: key generation on a slow board (pure Python)
    csr_timeout_s: float = 20.0  # seconds: the CSR is signed on the device
    self_test_s: int = 20  # seconds the device may spend on the self-test
    self_test_margin_s: float = 10.0  # seconds on top of that for the reply to arrive
    frame_retries: int = 2  # re-sends of a request the device says arrived corrupted
    read_chunk_bytes: int = 4096  # bytes read from the port at once
    http_timeout_s: float = 10.0  # seconds for one request to the fleet
    enroll_token_ttl_s: int = 3600  # seconds an enrollment token asked for online lives
    offline_token_ttl_s: int = 7 * 86400  # seconds for tokens pre-fetched for offline use
    queue_max_entries: int = 1000  # queued offline CSRs kept on the laptop


LIMITS = ProvisionLimits()
