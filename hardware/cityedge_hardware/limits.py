"""Every size, count and time the hardware checker uses, with its unit, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareLimits:
    catalogue_max_bytes: int = 1024 * 1024  # bytes of a catalogue or profile file
    efuse_json_max_bytes: int = 1024 * 1024  # bytes of one `espefuse summary` JSON capture
    efuse_max_fields: int = 1000  # eFuse fields in one capture (esptool 5.6: at most 93)
    efuse_name_max_chars: int = 64  # characters of one eFuse field name
    efuse_max_bits: int = 4096  # bits of one field's raw value (a key block has 256)
    secinfo_max_bytes: int = 64 * 1024  # bytes of `esptool get-security-info` output
    collect_timeout_s: float = 60.0  # seconds one espefuse / esptool run may take
    tool_output_max_chars: int = 400  # characters of a tool's error output quoted to the user
    serial_baudrate: int = 115200  # bits/s of the serial console probe (a pty ignores it)
    serial_step_timeout_s: float = 1.0  # seconds to wait for an answer to one probe step
    serial_hello_timeout_s: float = 5.0  # seconds to wait for the answer to the hello frame
    serial_idle_s: float = 0.3  # seconds of quiet after an answer that end a probe step
    serial_step_max_bytes: int = 4096  # bytes kept of the answer to one probe step
    serial_evidence_max_bytes: int = 64  # bytes of an answer quoted as evidence
    net_max_ports: int = 1024  # TCP plus UDP ports one network scan may probe
    net_rate_per_s: float = 50.0  # connection attempts (or datagrams) per second, at most
    net_connect_timeout_s: float = 1.0  # seconds one TCP connect may take
    net_banner_wait_s: float = 0.5  # seconds to wait for a service that speaks first
    net_reply_timeout_s: float = 2.0  # seconds to wait for an answer to a probe's request
    net_udp_wait_s: float = 0.5  # seconds to wait for a UDP answer or an ICMP refusal
    net_banner_max_bytes: int = 256  # bytes kept of a banner or a reply
    net_flight_max_bytes: int = 64 * 1024  # bytes read of a TLS server's first flight
    net_cipher_rounds: int = 40  # weak TLS 1.2 suites enumerated per endpoint, at most
    net_scan_json_max_bytes: int = 4 * 1024 * 1024  # bytes of a saved scan (--scan-json)
    net_cert_max_bytes: int = 16 * 1024  # bytes of one server certificate (DER)
    net_evidence_max_bytes: int = 64  # bytes of a banner quoted as evidence
    secret_file_max_bytes: int = 32 * 1024 * 1024  # bytes of one file the secret scan reads
    secret_total_max_bytes: int = 256 * 1024 * 1024  # bytes one secret scan reads in all
    secret_max_files: int = 20000  # files (or archive members) one secret scan reads
    secret_der_candidates: int = 4096  # DER key parses per file
    secret_der_max_bytes: int = 16 * 1024  # bytes of one DER key candidate (RSA-8192 < 5 KiB)
    secret_name_window: int = 48  # bytes before a hex string searched for a key-like name
    secret_findings_per_file: int = 100  # findings listed per file
    declaration_max_bytes: int = 64 * 1024  # bytes of a vendor declaration (YAML)
    declaration_text_max_chars: int = 200  # characters of one text field of a declaration
    declaration_max_documents: int = 100  # documents a declaration names
    document_max_bytes: int = 32 * 1024 * 1024  # bytes of one declared document (hashed)
    sbom_max_bytes: int = 8 * 1024 * 1024  # bytes of an SBOM file (CycloneDX or SPDX)
    sbom_max_components: int = 10000  # components (packages) of one SBOM
    check_input_max_bytes: int = 64 * 1024 * 1024  # bytes of an input file hashed for a report
    report_text_max_chars: int = 2000  # characters of one text in a report (longer: cut)
    release_file_max_bytes: int = 64 * 1024  # bytes of a manifest, key list or root set file
    romfs_max_entries: int = 20000  # files and directories read from one ROMFS image
    romfs_max_depth: int = 16  # directory levels of a ROMFS image
    boot_py_max_bytes: int = 64 * 1024  # bytes of one boot.py the REPL rule parses
    host_file_max_bytes: int = 1024 * 1024  # bytes of one host file (sshd_config, a unit)
    host_max_conf_files: int = 200  # apt.conf.d files, sshd includes or unit drop-ins read
    host_tool_timeout_s: float = 20.0  # seconds `sshd -T` or `systemctl show` may take
    host_capture_max_bytes: int = 16 * 1024 * 1024  # bytes of a saved host capture (JSON)


LIMITS = HardwareLimits()
