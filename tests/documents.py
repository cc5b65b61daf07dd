"""Writes small documents of every format the appliance ingests, for tests (no fixtures on disk)."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path


def write_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_heading("Discharge policy", 1)
    document.add_paragraph("Patients are discharged before 11am so that beds are ready for admissions.")
    document.add_heading("Transport", 2)
    document.add_paragraph("The ward clerk books hospital transport the day before discharge.")
    document.save(path)
    return path


def write_xlsx(path: Path) -> Path:
    import openpyxl

    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.title = "On-call rota"
    sheet.append(["Day", "Consultant", "Registrar"])
    sheet.append(["Monday", "Dr Patel", "Dr Okafor"])
    sheet.append(["Tuesday", "Dr Lindqvist", "Dr Moreau"])
    workbook.save(path)
    return path


def write_pptx(path: Path) -> Path:
    import pptx

    deck = pptx.Presentation()
    for title, body in (
        ("Litigation hold", "Preserve all email from 2024 onwards."),
        ("Custodians", "The finance director and two project managers."),
    ):
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = title
        slide.placeholders[1].text = body
    deck.save(path)
    return path


def write_pdf(path: Path, pages: int = 2, text: bool = True) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for page in range(1, pages + 1):
        pdf.add_page()
        if text:
            pdf.cell(0, 10, f"Medication reconciliation, part {page}", new_x="LMARGIN", new_y="NEXT")
            pdf.multi_cell(0, 8, f"Reconcile the medication list within 24 hours of admission (step {page}).")
    pdf.output(str(path))
    return path


def write_scanned_pdf(path: Path, lines: list[str]) -> Path:
    """A PDF whose only content is an image of text, as a scanner makes it (no text layer)."""
    from fpdf import FPDF
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (1700, 120 + 100 * len(lines)), 255)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=48)
    for number, line in enumerate(lines):
        draw.text((50, 50 + 100 * number), line, fill=0, font=font)
    picture = path.with_suffix(".png")
    image.save(picture)
    pdf = FPDF()
    pdf.add_page()
    pdf.image(str(picture), x=10, y=10, w=190)
    pdf.output(str(path))
    picture.unlink()
    return path


def write_eml(path: Path, attachments: dict[str, bytes] | None = None) -> Path:
    message = EmailMessage()
    message["From"] = "partner@harrow-vale.example"
    message["To"] = "associate@harrow-vale.example"
    message["Subject"] = "Litigation hold notice"
    message.set_content("Please preserve every document about the Quay Street lease.")
    for name, data in (attachments or {}).items():
        message.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    path.write_bytes(bytes(message))
    return path


def write_all(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.md").write_text("# Retention\n\n## Adults\n\nAdult records are kept for ten years.\n")
    (folder / "infection.html").write_text(
        "<html><body><h1>Infection control</h1><p>Wash hands for twenty seconds.</p>"
        "<script>document.write('never executed')</script></body></html>"
    )
    (folder / "rota.txt").write_text("On-call rota\n\nThe registrar covers nights on weekdays.\n")
    (folder / "doses.csv").write_text("drug,dose\nparacetamol,1 g\nibuprofen,400 mg\n")
    return {
        "md": folder / "policy.md",
        "html": folder / "infection.html",
        "txt": folder / "rota.txt",
        "csv": folder / "doses.csv",
        "docx": write_docx(folder / "discharge.docx"),
        "xlsx": write_xlsx(folder / "rota.xlsx"),
        "pptx": write_pptx(folder / "hold.pptx"),
        "pdf": write_pdf(folder / "medication.pdf"),
        "eml": write_eml(folder / "hold.eml"),
    }
