"""The device label: device id, serial, site and a QR code of the device URN, as PNG or PDF.

The QR code holds exactly the URN (RFC 9039), so any phone scanner or the fleet UI can look
the device up; error correction level M survives a scratched label. The image is sized for
a 62 mm label printer roll at 300 dpi; PDF is the same image on one page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import qrcode
from PIL import Image, ImageDraw, ImageFont

from cityedge_host.errors import UserError

LABEL_WIDTH_PX = 732  # pixels: 62 mm at 300 dpi
LABEL_DPI = 300  # dots per inch written into the PNG/PDF
QR_BOX_PX = 8  # pixels per QR module
QR_BORDER_MODULES = 2  # quiet zone (modules)
FONT_PX = 26  # pixels: text height
MARGIN_PX = 16  # pixels around the text


@dataclass(frozen=True)
class LabelData:
    device: str
    serial: str
    site: str = ""


class LabelError(UserError, ValueError):
    """The label cannot be written (unknown format)."""


def render(data: LabelData) -> Image.Image:
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, box_size=QR_BOX_PX,
                       border=QR_BORDER_MODULES)
    qr.add_data(data.device)
    qr.make(fit=True)
    code = qr.make_image(fill_color="black", back_color="white").get_image().convert("L")
    font = ImageFont.load_default(size=FONT_PX)
    lines = [data.device, "serial %s" % data.serial]
    if data.site:
        lines.append("site %s" % data.site)
    text_h = len(lines) * (FONT_PX + 6) + MARGIN_PX
    width = max(LABEL_WIDTH_PX, code.width)
    img = Image.new("L", (width, code.height + text_h), 255)
    img.paste(code, ((width - code.width) // 2, 0))
    draw = ImageDraw.Draw(img)
    y = code.height
    for line in lines:
        draw.text((MARGIN_PX, y), line, fill=0, font=font)
        y += FONT_PX + 6
    return img


def save(data: LabelData, path: Path) -> Path:
    """Write the label as PNG or PDF, chosen by the file's suffix."""
    fmt = {".png": "PNG", ".pdf": "PDF"}.get(path.suffix.lower())
    if fmt is None:
        raise LabelError("a label is .png or .pdf, not %r" % path.suffix)
    render(data).save(path, fmt, dpi=(LABEL_DPI, LABEL_DPI))
    return path
