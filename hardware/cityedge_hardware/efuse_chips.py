"""Which eFuse field means what, chip by chip, with the raw value that is the secure state.

The field names and bit meanings come from esptool 5.6's eFuse tables (``espefuse/efuse/
<chip>/``) and were checked by burning each field in ``espefuse --virt``
(``tests/hardware/``). Three layouts exist:

- ``classic``: the ESP32. Secure boot v2 is ``ABS_DONE_1`` (``ABS_DONE_0`` is the old v1),
  its one key digest is ``BLOCK2``, the flash encryption key is ``BLOCK1`` (hidden by
  ``RD_DIS`` bit 0), the counter is the 7-bit ``FLASH_CRYPT_CNT``, one ``JTAG_DISABLE``, and
  no Secure Download Mode: ROM download is either on or off (``UART_DOWNLOAD_DIS``, chip
  revision 3 and later).
- ``key-purpose``: ESP32-S2, S3, C3, C5, C6, C61, H2, H21, H4, P4, S31, E22. Six key blocks
  ``BLOCK_KEY0..5``, each with a ``KEY_PURPOSE_n`` (raw codes below, the same on all of them)
  and read protection ``RD_DIS`` bit ``n``; three secure boot digest slots, each with a
  ``SECURE_BOOT_KEY_REVOKEn``; the counter is the 3-bit ``SPI_BOOT_CRYPT_CNT``; download mode
  is off (``DIS_DOWNLOAD_MODE``) or restricted (``ENABLE_SECURITY_DOWNLOAD``).
- ``single-key``: the ESP32-C2, one key block shared by the flash key and the secure boot
  digest; the rules decide its switches and say they cannot decide its key blocks.

Senses are explicit: every switch is a ``Switch(field, secure)`` whose ``secure`` is the raw
value of the safe state. ``DIS_*`` fields are safe at 1, ``ENABLE_SECURITY_DOWNLOAD`` and
``SECURE_BOOT_EN`` too; a counter is on when an odd number of its bits is set.
"""

from __future__ import annotations

from dataclasses import dataclass

# KEY_PURPOSE_n raw codes (identical on every key-purpose chip of esptool 5.6)
PURPOSE_XTS_AES_256_KEY_1 = 2
PURPOSE_XTS_AES_256_KEY_2 = 3
PURPOSE_XTS_AES_128_KEY = 4
PURPOSE_SECURE_BOOT_DIGEST = (9, 10, 11)  # digest slot 0, 1, 2
FLASH_KEY_PURPOSES = (PURPOSE_XTS_AES_256_KEY_1, PURPOSE_XTS_AES_256_KEY_2,
                      PURPOSE_XTS_AES_128_KEY)
PURPOSE_NAMES = {0: "USER", 2: "XTS_AES_256_KEY_1", 3: "XTS_AES_256_KEY_2",
                 4: "XTS_AES_128_KEY", 5: "HMAC_DOWN_ALL", 6: "HMAC_DOWN_JTAG",
                 7: "HMAC_DOWN_DIGITAL_SIGNATURE", 8: "HMAC_UP", 9: "SECURE_BOOT_DIGEST0",
                 10: "SECURE_BOOT_DIGEST1", 11: "SECURE_BOOT_DIGEST2"}


@dataclass(frozen=True)
class Switch:
    """A one-bit eFuse and the raw value that is the secure state (``secure``)."""

    field: str
    secure: int
    meaning: str  # what the secure value does, for the report


@dataclass(frozen=True)
class ChipFuses:
    """One chip's security fields."""

    chip: str
    layout: str  # "classic" | "key-purpose" | "single-key"
    secure_boot: Switch
    crypt_counter: str | None  # FLASH_CRYPT_CNT / SPI_BOOT_CRYPT_CNT (None: the chip has none)
    jtag_off: tuple[Switch, ...]  # all must be in their secure state
    download_off: Switch  # ROM download mode off entirely
    secure_download: Switch | None  # ROM download mode restricted (None: no such mode)
    key_blocks: int = 6
    revoke_fields: tuple[str, ...] = ("SECURE_BOOT_KEY_REVOKE0", "SECURE_BOOT_KEY_REVOKE1",
                                      "SECURE_BOOT_KEY_REVOKE2")
    marker: str = ""  # a field only this chip has in esptool 5.6: tells captures apart

    def required_fields(self) -> tuple[str, ...]:
        """Every field the rules read on this chip: a capture has all of them."""
        names = [self.secure_boot.field, self.download_off.field]
        names += [s.field for s in self.jtag_off]
        if self.crypt_counter:
            names.append(self.crypt_counter)
        if self.secure_download:
            names.append(self.secure_download.field)
        if self.layout == "key-purpose":
            names += ["RD_DIS", *self.revoke_fields]
            names += ["KEY_PURPOSE_%d" % i for i in range(self.key_blocks)]
            names += ["BLOCK_KEY%d" % i for i in range(self.key_blocks)]
        elif self.layout == "classic":
            names += ["RD_DIS", "BLOCK1", "BLOCK2"]
        return tuple(names)


_SB_EN = Switch("SECURE_BOOT_EN", 1, "secure boot v2 verifies every boot")
_DL_OFF = Switch("DIS_DOWNLOAD_MODE", 1, "ROM download mode cannot be entered")
_SEC_DL = Switch("ENABLE_SECURITY_DOWNLOAD", 1,
                 "ROM download mode only flashes: no eFuse or memory reads")
_PAD_JTAG = Switch("DIS_PAD_JTAG", 1, "the JTAG pins are permanently off")
_USB_JTAG = Switch("DIS_USB_JTAG", 1, "JTAG over the USB Serial/JTAG port is off")


def _key_purpose(chip: str, jtag: tuple[Switch, ...] = (_PAD_JTAG, _USB_JTAG),
                 crypt: str | None = "SPI_BOOT_CRYPT_CNT",
                 marker: str = "", key_blocks: int = 6) -> ChipFuses:
    return ChipFuses(chip=chip, layout="key-purpose", secure_boot=_SB_EN, crypt_counter=crypt,
                     jtag_off=jtag, download_off=_DL_OFF, secure_download=_SEC_DL,
                     key_blocks=key_blocks, marker=marker)


ESP32 = ChipFuses(
    chip="esp32", layout="classic",
    secure_boot=Switch("ABS_DONE_1", 1, "secure boot v2 verifies every boot"),
    crypt_counter="FLASH_CRYPT_CNT",
    jtag_off=(Switch("JTAG_DISABLE", 1, "JTAG is permanently off"),),
    download_off=Switch("UART_DOWNLOAD_DIS", 1, "ROM download mode cannot be entered "
                        "(ESP32 revision 3 and later)"),
    secure_download=None, key_blocks=0, revoke_fields=(),
    marker="ABS_DONE_0")

ESP32C2 = ChipFuses(
    chip="esp32c2", layout="single-key", secure_boot=_SB_EN,
    crypt_counter="SPI_BOOT_CRYPT_CNT", jtag_off=(_PAD_JTAG,), download_off=_DL_OFF,
    secure_download=_SEC_DL, key_blocks=1, revoke_fields=(),
    marker="BLOCK_KEY0_HI_128")

CHIPS: dict[str, ChipFuses] = {
    "esp32": ESP32,
    "esp32c2": ESP32C2,
    "esp32s2": _key_purpose("esp32s2", jtag=(
        Switch("HARD_DIS_JTAG", 1, "JTAG is permanently off"),), marker="DIS_BOOT_REMAP"),
    "esp32s3": _key_purpose("esp32s3", marker="DIS_USB_OTG"),
    "esp32c3": _key_purpose("esp32c3", marker="ERR_RST_ENABLE"),
    "esp32c5": _key_purpose("esp32c5", marker="PA_TRIM_VERSION"),
    "esp32c6": _key_purpose("esp32c6", marker="SWAP_UART_SDIO_EN"),
    "esp32c61": _key_purpose("esp32c61", marker="DIS_WIFI6"),
    "esp32h2": _key_purpose("esp32h2", marker="ECDSA_FORCE_USE_HARDWARE_K"),
    "esp32h21": _key_purpose("esp32h21", marker="PVT_LIMIT"),
    "esp32h4": _key_purpose("esp32h4", marker="DIS_CORE1"),
    "esp32p4": _key_purpose("esp32p4", marker="DCDC_VSET"),
    "esp32s31": _key_purpose("esp32s31", marker="DIS_SM_CRYPT", key_blocks=5),
    "esp32e22": _key_purpose("esp32e22", jtag=(_PAD_JTAG,), crypt=None,
                             marker="DIS_PCIE_DOWNLOAD"),
}


def identify(field_names: set[str] | frozenset[str]) -> ChipFuses | None:
    """The chip table a capture fits: every field the rules read is present.

    A capture carries no chip name, so it is recognised by its fields: the one table whose
    marker field is present, else (a newer esptool that renamed a marker) the table that
    reads the most fields. Chips of one layout read the same security fields, so such a
    fallback changes the chip's name in the report, not the verdicts.
    """
    fits = [c for c in CHIPS.values() if set(c.required_fields()) <= field_names]
    marked = [c for c in fits if c.marker in field_names]
    if len(marked) == 1:
        return marked[0]
    if not fits:
        return None
    return max(fits, key=lambda c: len(set(c.required_fields())))
