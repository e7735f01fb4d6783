"""``make demo``'s third part: ``hw check`` reports for the bundled factory and "hardened"
ESP32-S3 captures, side by side, with the paths of the reports it wrote."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from cityedge import demo_hardware


def test_the_demo_writes_both_reports_and_shows_them_side_by_side(tmp_path: Path) -> None:
    con = Console(record=True, width=220)
    demo_hardware.main(con, tmp_path)
    text = con.export_text()
    assert "factory ESP32-S3 (esp32s3)" in text and "'hardened' ESP32-S3 (esp32s3)" in text
    for req in ("CE-BOOT-01", "CE-BOOT-02", "CE-DATA-01", "CE-DATA-02", "CE-DBG-01",
                "CE-DBG-02", "CE-BOOT-03"):
        assert req in text
    assert "0 of 7 eFuse rows pass on the factory chip, 3 on the 'hardened' one" in text
    assert "flash encryption is on in development mode" in text  # what a lab would find
    docs = {}
    for sub in ("factory", "hardened"):
        assert "%s" % (tmp_path / sub / "report.html") in text
        docs[sub] = json.loads((tmp_path / sub / "report.json").read_text())
    assert [d["summary"]["met"] for d in docs.values()] == [False, False]
    lock = {sub: {r["id"]: r for r in d["requirements"]}["CE-BOOT-03"] for sub, d in docs.items()}
    assert lock["factory"]["outcome"] == lock["hardened"]["outcome"] == "fail"
    assert lock["hardened"]["reason"].endswith("(not write-protected): SPI_BOOT_CRYPT_CNT")
    assert text.count("NOT MET") == 2
    fails = [d["summary"]["counts"]["fail"] for d in docs.values()]
    assert fails[0] > fails[1]
