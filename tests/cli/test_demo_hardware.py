"""``make demo``'s third part: the bundled factory and "hardened" ESP32-S3 captures, side
by side, through the rules ``cityedge hw efuse`` runs."""

from __future__ import annotations

from rich.console import Console

from cityedge import demo_hardware


def test_the_demo_shows_both_captures_and_the_hardened_one_passes_more() -> None:
    con = Console(record=True, width=200)
    demo_hardware.main(con)
    text = con.export_text()
    assert "factory ESP32-S3 (esp32s3)" in text and "'hardened' ESP32-S3 (esp32s3)" in text
    for req in ("CE-BOOT-01", "CE-BOOT-02", "CE-DATA-01", "CE-DATA-02", "CE-DBG-01",
                "CE-DBG-02"):
        assert req in text
    assert "0 of 6 eFuse rows pass on the factory chip, 3 on the 'hardened' one" in text
    assert "flash encryption is on in development mode" in text  # what a lab would find
