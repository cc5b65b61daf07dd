"""Writes the sample corpus: two invented organisations, every format the appliance ingests.

Run from the repository root:  python sample_corpus/make_corpus.py

St. Brigid's General Hospital (hospital/) and Harrow & Vale LLP (lawfirm/) are fictional, and so is
every person, matter, number and date in their documents; all text was written for this project.
The two hand-written Markdown files (hospital/records-retention-policy.md and
lawfirm/engagement-letter-template.md) are not touched; everything else is (re)written here.

Output is deterministic: fixed dates in the text and in the document metadata, fixed e-mail MIME
boundaries, and OOXML (DOCX/PPTX/XLSX) containers rewritten with fixed ZIP timestamps.

At the end `check_questions()` reads the files back (python-docx, python-pptx, openpyxl, the e-mail
parser, an HTML parser without scripts, pypdf when installed plus the PDF source text) and fails
loudly unless every answer in questions.yaml is in the named page or section of its document.
"""

from __future__ import annotations

import csv
import html
import io
import random
import re
import sys
import zipfile
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FIXED = datetime(2025, 3, 3, 9, 0, 0, tzinfo=UTC)
ZIP_TIME = (2025, 3, 3, 9, 0, 0)
HANDWRITTEN = ("hospital/records-retention-policy.md", "lawfirm/engagement-letter-template.md")
# Files in the folder that are not corpus documents.
NOT_DOCUMENTS = ("README.md", "make_corpus.py", "questions.yaml")
# The image-only PDF: no text layer on purpose, so no questions can be asked of it.
SCANNED = "hospital/scanned-incident-report.pdf"
# CSV files hold one table each; questions name it by these titles.
CSV_TABLES = {
    "hospital/ward-contact-list.csv": "Ward contact list",
    "lawfirm/matter-time-entries.csv": "Matter time entries",
}
# For the questions that no document answers: terms that must appear in no document.
ABSENT_TERMS = {
    "How much does St. Brigid's General Hospital charge visitors for car parking?": [
        "parking charge",
        "pay and display",
    ],
    "How many operating theatres does St. Brigid's General Hospital have?": ["operating theatres", "theatre suite"],
    "What is Harrow & Vale LLP's VAT registration number?": ["VAT registration", "VAT number"],
    "Which partner leads the employment law team at Harrow & Vale LLP?": ["employment law", "employment team"],
    "Who is the chief executive of St. Brigid's General Hospital?": ["chief executive"],
    "How many days of annual leave do nurses at St. Brigid's General Hospital get?": ["annual leave"],
    "Which ward at St. Brigid's treats patients with burns?": ["burns"],
    "What time does the hospital pharmacy close on weekdays?": ["weekday", "opening hours"],
    "How are patients' valuables kept safe while they stay in hospital?": ["valuables"],
    "Where can staff get a flu vaccination at St. Brigid's General Hospital?": ["vaccin", "immunis"],
    "Who is the managing partner of Harrow & Vale LLP?": ["managing partner", "senior partner"],
    "What is Harrow & Vale's hourly rate for a consultant?": ["consultants", "consultant rate"],
    "How many days of annual leave do associates at Harrow & Vale get?": ["annual leave"],
    "What is the limit of Harrow & Vale's professional indemnity insurance?": ["indemnity"],
    "What is Harrow & Vale's policy on working from home?": ["working from home", "remote working", "hybrid"],
    "Which bank holds Harrow & Vale's client account?": ["sort code", "account number"],
}

# PDF source text per page, recorded while writing, for the question check.
PDF_SOURCE: dict[str, list[str]] = {}


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------
def _path(rel: str) -> Path:
    path = ROOT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


_CORE_DATE = re.compile(rb"(<dcterms:(created|modified)[^>]*>)[^<]*(</dcterms:(created|modified)>)")


def normalise_ooxml(data: bytes) -> bytes:
    """The same container with fixed ZIP timestamps and fixed core-property dates."""
    stamp = FIXED.strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            content = source.read(info.filename)
            if info.filename == "docProps/core.xml":
                content = _CORE_DATE.sub(lambda m: m.group(1) + stamp + m.group(3), content)
            entry = zipfile.ZipInfo(info.filename, date_time=ZIP_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            target.writestr(entry, content)
    return out.getvalue()


def _set_core(props, title: str, author: str) -> None:
    props.title = title
    props.author = author
    props.last_modified_by = author
    props.created = FIXED.replace(tzinfo=None)
    props.modified = FIXED.replace(tzinfo=None)
    props.revision = 1


def docx_bytes(title: str, author: str, blocks: list[tuple]) -> bytes:
    """blocks: ("title", t) ("h1", t) ("h2", t) ("p", t) ("bullets", [..]) ("table", [header, *rows])."""
    import docx

    document = docx.Document()
    _set_core(document.core_properties, title, author)
    for kind, value in blocks:
        if kind == "title":
            document.add_heading(value, 0)
        elif kind == "h1":
            document.add_heading(value, 1)
        elif kind == "h2":
            document.add_heading(value, 2)
        elif kind == "p":
            document.add_paragraph(value)
        elif kind == "bullets":
            for item in value:
                document.add_paragraph(item, style="List Bullet")
        elif kind == "table":
            table = document.add_table(rows=0, cols=len(value[0]))
            table.style = "Table Grid"
            for r, row in enumerate(value):
                cells = table.add_row().cells
                for cell, text in zip(cells, row, strict=True):
                    cell.text = text
                    if r == 0:
                        for run in cell.paragraphs[0].runs:
                            run.bold = True
        else:
            raise ValueError(kind)
    buffer = io.BytesIO()
    document.save(buffer)
    return normalise_ooxml(buffer.getvalue())


def write_docx(rel: str, title: str, author: str, blocks: list[tuple]) -> None:
    _path(rel).write_bytes(docx_bytes(title, author, blocks))


def write_pptx(rel: str, title: str, subtitle: str, author: str, slides: list[tuple[str, list[str]]]) -> None:
    import pptx

    deck = pptx.Presentation()
    _set_core(deck.core_properties, title, author)
    first = deck.slides.add_slide(deck.slide_layouts[0])
    first.shapes.title.text = title
    first.placeholders[1].text = subtitle
    for heading, bullets in slides:
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = heading
        frame = slide.placeholders[1].text_frame
        frame.text = bullets[0]
        for bullet in bullets[1:]:
            frame.add_paragraph().text = bullet
    buffer = io.BytesIO()
    deck.save(buffer)
    _path(rel).write_bytes(normalise_ooxml(buffer.getvalue()))


def write_xlsx(rel: str, title: str, author: str, sheets: list[tuple[str, list[list], list[int]]]) -> None:
    import openpyxl
    from openpyxl.styles import Font, PatternFill

    workbook = openpyxl.Workbook()
    workbook.remove(workbook.active)
    workbook.properties.title = title
    workbook.properties.creator = author
    workbook.properties.lastModifiedBy = author
    workbook.properties.created = FIXED.replace(tzinfo=None)
    workbook.properties.modified = FIXED.replace(tzinfo=None)
    for name, rows, widths in sheets:
        sheet = workbook.create_sheet(name)
        for row in rows:
            sheet.append(row)
        for cell in sheet[1]:
            cell.font = Font(bold=True)
            cell.fill = PatternFill("solid", fgColor="DDE7F0")
        for index, width in enumerate(widths):
            sheet.column_dimensions[chr(ord("A") + index)].width = width
        sheet.freeze_panes = "A2"
    buffer = io.BytesIO()
    workbook.save(buffer)
    _path(rel).write_bytes(normalise_ooxml(buffer.getvalue()))


def write_csv(rel: str, rows: list[list]) -> None:
    with _path(rel).open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


def write_text(rel: str, text: str) -> None:
    _path(rel).write_text(text.strip() + "\n", encoding="utf-8")


def write_html(rel: str, title: str, blocks: list[tuple], script: str = "") -> None:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "</head>",
        "<body>",
    ]
    for kind, value in blocks:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "bullets":
            parts.append("<ul>")
            parts.extend(f"  <li>{html.escape(item)}</li>" for item in value)
            parts.append("</ul>")
        else:
            raise ValueError(kind)
    if script:
        parts.append(f"<script>\n{script.strip()}\n</script>")
    parts += ["</body>", "</html>"]
    write_text(rel, "\n".join(parts))


def write_md(rel: str, blocks: list[tuple]) -> None:
    lines: list[str] = []
    for kind, value in blocks:
        if kind == "h1":
            lines += [f"# {value}", ""]
        elif kind == "h2":
            lines += [f"## {value}", ""]
        elif kind == "p":
            lines += [value, ""]
        elif kind == "bullets":
            lines += [f"- {item}" for item in value] + [""]
        else:
            raise ValueError(kind)
    write_text(rel, "\n".join(lines))


def _latin1(text: str, rel: str) -> str:
    bad = sorted({ch for ch in text if ord(ch) > 255})
    if bad:
        raise SystemExit(f"{rel}: characters outside latin-1 in PDF text: {bad}")
    return text


def write_pdf(rel: str, title: str, author: str, footer: str, pages: list[list[tuple]]) -> None:
    """Each page is written on its own page; a page whose text overflows is an error."""
    from fpdf import FPDF

    class CorpusPDF(FPDF):
        def footer(self) -> None:
            self.set_y(-14)
            self.set_font("helvetica", "I", 8)
            self.cell(0, 6, f"{footer} - page {self.page_no()} of {{nb}}", align="C")

    pdf = CorpusPDF(format="A4")
    pdf.set_creation_date(FIXED)
    pdf.set_title(title)
    pdf.set_author(author)
    pdf.set_margins(20, 20, 20)
    pdf.set_auto_page_break(True, margin=20)
    sources: list[str] = []
    for number, blocks in enumerate(pages, start=1):
        pdf.add_page()
        texts = []
        for kind, value in blocks:
            if kind == "h1":
                pdf.set_font("helvetica", "B", 16)
                pdf.multi_cell(0, 8, _latin1(value, rel), new_x="LMARGIN", new_y="NEXT")
                pdf.ln(3)
                texts.append(value)
            elif kind == "h2":
                pdf.ln(1)
                pdf.set_font("helvetica", "B", 12)
                pdf.multi_cell(0, 7, _latin1(value, rel), new_x="LMARGIN", new_y="NEXT")
                pdf.ln(1)
                texts.append(value)
            elif kind in ("p", "meta"):
                pdf.set_font("helvetica", "I" if kind == "meta" else "", 9.5 if kind == "meta" else 10.5)
                pdf.multi_cell(0, 5.5, _latin1(value, rel), new_x="LMARGIN", new_y="NEXT")
                pdf.ln(3)
                texts.append(value)
            elif kind == "bullets":
                pdf.set_font("helvetica", "", 10.5)
                for item in value:
                    pdf.set_x(pdf.l_margin + 4)
                    pdf.multi_cell(0, 5.5, _latin1("- " + item, rel), new_x="LMARGIN", new_y="NEXT")
                    texts.append("- " + item)
                pdf.ln(3)
            else:
                raise ValueError(kind)
        if pdf.page != number:
            raise SystemExit(f"{rel}: the text meant for page {number} overflowed onto page {pdf.page}")
        sources.append("\n".join(texts))
    pdf.output(str(_path(rel)))
    PDF_SOURCE[rel] = sources


def write_scanned_pdf(rel: str, lines: list[str]) -> None:
    """A 'scanned' page: text rendered into a greyscale image with Pillow's default font, and a PDF
    that holds only that image (no text layer at all)."""
    from fpdf import FPDF
    from PIL import Image, ImageDraw, ImageFont

    width, height = 1240, 1754  # A4 at 150 dpi
    image = Image.new("L", (width, height), 252)
    draw = ImageDraw.Draw(image)
    try:
        body, heading = ImageFont.load_default(size=24), ImageFont.load_default(size=34)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the small bitmap font
        body = heading = ImageFont.load_default()
    y = 120
    for line in lines:
        if line.startswith("# "):
            draw.text((110, y), line[2:], fill=20, font=heading)
            y += 60
        elif line == "---":
            draw.line((110, y + 10, width - 110, y + 10), fill=60, width=2)
            y += 34
        else:
            draw.text((110, y), line, fill=35, font=body)
            y += 36
    noise = random.Random(193)  # a few specks, the same every run
    for _ in range(400):
        x, yy = noise.randrange(width), noise.randrange(height)
        draw.point((x, yy), fill=noise.randrange(120, 200))
    image = image.rotate(0.7, resample=Image.Resampling.BICUBIC, fillcolor=252)
    pdf = FPDF(format="A4")
    pdf.set_creation_date(FIXED)
    pdf.set_title("Scanned document")
    pdf.add_page()
    pdf.image(image, x=0, y=0, w=210, h=297)
    pdf.output(str(_path(rel)))


def write_eml(
    rel: str,
    headers: dict[str, str],
    body: str,
    attachment: tuple[str, str, bytes] | None = None,
    boundary: str | None = None,
) -> None:
    message = EmailMessage()
    for name, value in headers.items():
        message[name] = value
    message["MIME-Version"] = "1.0"
    message.set_content(body.strip() + "\n")
    if attachment is not None:
        filename, mime, data = attachment
        maintype, subtype = mime.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
        message.set_boundary(boundary or "==corpus-boundary==")
    _path(rel).write_bytes(bytes(message))


# ------------------------------------------------------------------------------------------------
# St. Brigid's General Hospital
# ------------------------------------------------------------------------------------------------
HOSPITAL = "St. Brigid's General Hospital"


def hospital_discharge_policy() -> None:
    write_docx(
        "hospital/discharge-policy.docx",
        "Discharge Policy - Adult Inpatient Wards",
        "Patient Flow Group",
        [
            ("title", "Discharge Policy - Adult Inpatient Wards"),
            (
                "p",
                f"{HOSPITAL}. Policy number CP-041, version 3.2. Approved by the Patient Flow Group on "
                "14 January 2025. Next review due January 2027. Policy owner: Head of Patient Flow.",
            ),
            ("h1", "1. Purpose and scope"),
            (
                "p",
                "This policy sets out how adult inpatients are prepared for discharge, so that they leave "
                "hospital safely with their medicines, information and follow-up arranged, and so that beds "
                "are free for patients waiting in the Emergency Department. It applies to all adult inpatient "
                "wards. Maternity and paediatric discharges follow their own policies (CP-052 and CP-060).",
            ),
            ("h1", "2. Planning for discharge"),
            ("h2", "2.1 Expected date of discharge"),
            (
                "p",
                "Every patient is given an expected date of discharge (EDD) within 24 hours of admission by "
                "the admitting consultant's team. The EDD is written on the ward board and in the electronic "
                "record and is shared with the patient and, with their consent, their next of kin. The EDD "
                "is reviewed at the daily board round, which starts at 09:15 on every ward, seven days a week.",
            ),
            ("h2", "2.2 Criteria-led discharge"),
            (
                "p",
                "A registered nurse may discharge a patient without a further medical review when the "
                "patient meets clinical criteria written in the record by a doctor at registrar grade or "
                "above. The criteria must be specific (for example, temperature below 37.8 C for 24 hours "
                "and pain controlled on oral painkillers) and must state the date from which they apply.",
            ),
            ("h1", "3. On the day of discharge"),
            ("h2", "3.1 Discharge time target"),
            (
                "p",
                "Patients should leave the ward by 11:00 on their day of discharge. Patients who are waiting "
                "only for transport, medicines or a relative are moved to the Discharge Lounge on Level 1 of "
                "the Cedar Wing. The lounge is open 08:00 to 20:00 Monday to Friday and 10:00 to 18:00 on "
                "Saturdays, Sundays and public holidays. It has twelve reclining chairs and two trolley "
                "spaces and is staffed by a registered nurse and a healthcare assistant.",
            ),
            ("h2", "3.2 Medicines to take home"),
            (
                "p",
                "Take-home medicines (TTOs) for a planned discharge are prescribed and sent to pharmacy by "
                "16:00 on the day before discharge. Pharmacy aims to dispense TTOs within 2 hours of "
                "receiving them. A nurse or pharmacy technician explains each new or changed medicine to the "
                "patient and gives them a written medicines list.",
            ),
            ("h2", "3.3 Transport"),
            (
                "p",
                "Hospital transport is only for patients whose medical condition prevents them from using "
                "other transport. The ward clerk books it by 14:00 on the day before discharge. Bookings "
                "made on the day cannot be guaranteed, and patients are told this when the EDD is agreed.",
            ),
            ("h1", "4. Discharge summary"),
            (
                "p",
                "The electronic discharge summary is completed by the discharging doctor and sent to the "
                "patient's GP within 24 hours of discharge. The patient receives a printed copy before "
                "leaving. The summary lists diagnoses, procedures, medicines with any changes and the "
                "reasons for them, follow-up appointments and outstanding test results, naming the clinician "
                "responsible for acting on each result.",
            ),
            ("h1", "5. Delayed discharges"),
            (
                "p",
                "A patient who is medically fit but still in hospital 4 hours after the planned discharge "
                "time is recorded as a delayed discharge, and the nurse in charge informs the site manager on "
                "bleep 4410. Patients whose length of stay passes 21 days are discussed at the weekly "
                "long-stay review, held on Tuesdays at 14:00 in the Patient Flow office.",
            ),
            ("h1", "6. Discharge checklist"),
            ("p", "The nurse in charge confirms each item below before the patient leaves the ward."),
            (
                "table",
                [
                    ["Item", "Responsible", "When"],
                    ["EDD agreed and shared", "Consultant team", "Within 24 hours of admission"],
                    ["TTOs sent to pharmacy", "Ward doctor", "By 16:00 the day before"],
                    ["Transport booked (if eligible)", "Ward clerk", "By 14:00 the day before"],
                    ["Cannula removed and site checked", "Registered nurse", "Before leaving the ward"],
                    ["Follow-up appointment booked", "Ward clerk", "Before leaving the ward"],
                    ["Discharge summary sent to GP", "Discharging doctor", "Within 24 hours of discharge"],
                ],
            ),
        ],
    )


def hospital_medication_reconciliation() -> None:
    write_pdf(
        "hospital/medication-reconciliation-procedure.pdf",
        "Medication Reconciliation Procedure",
        "Pharmacy and Medicines Optimisation",
        f"{HOSPITAL} - Medication Reconciliation Procedure MM-017 v2.0",
        [
            [
                ("h1", "Medication Reconciliation Procedure"),
                ("meta", f"{HOSPITAL} - Pharmacy and Medicines Optimisation"),
                (
                    "p",
                    "Procedure number MM-017, version 2.0. Effective from 1 February 2025. Procedure owner: "
                    "Chief Pharmacist. Approved by the Medicines Safety Committee.",
                ),
                ("h2", "1. Purpose"),
                (
                    "p",
                    "Medication reconciliation makes sure that the medicines a patient was taking before "
                    "admission are known and compared with what is prescribed in hospital, and that every "
                    "difference is either intended and documented or corrected. Unintended differences at "
                    "admission are one of the commonest causes of medication error on our wards.",
                ),
                ("h2", "Scope"),
                (
                    "p",
                    "This procedure applies to every adult admitted to an inpatient bed, including day-case "
                    "patients who stay overnight. It does not apply to outpatient clinics or the Emergency "
                    "Department, except for patients who remain in the Emergency Department for more than "
                    "12 hours while waiting for a bed.",
                ),
                ("h2", "Definitions"),
                (
                    "p",
                    "Best possible medication history (BPMH): a list of all the medicines a patient was "
                    "taking before admission, with dose, route, frequency and the time of the last dose, "
                    "confirmed from at least two sources. Discrepancy: any difference between the BPMH and "
                    "the inpatient prescription. Intentional discrepancy: a difference the prescriber chose "
                    "and documented, for example stopping a blood pressure tablet because of low blood "
                    "pressure on admission.",
                ),
            ],
            [
                ("h1", "2. Timescales"),
                (
                    "p",
                    "Medication reconciliation must be completed within 24 hours of admission for every "
                    "patient in scope. Patients taking high-risk medicines must be reconciled within 6 hours "
                    "of admission. High-risk medicines are anticoagulants, insulin, antiepileptic medicines, "
                    "medicines for Parkinson's disease, immunosuppressants after a transplant and oral "
                    "chemotherapy.",
                ),
                (
                    "p",
                    "Parkinson's disease medicines are time-critical. The first inpatient dose must not be "
                    "given more than 30 minutes after the time the patient usually takes it at home, even "
                    "when reconciliation is not yet complete.",
                ),
                (
                    "p",
                    "Patients admitted between 17:00 on Friday and 08:00 on Monday are reconciled by the "
                    "weekend pharmacy team, which works 09:00 to 17:00 on Saturdays and Sundays and sees "
                    "patients on high-risk medicines first.",
                ),
                ("h1", "3. Sources of information"),
                (
                    "p",
                    "The BPMH is confirmed from at least two of the sources below. The patient's own account "
                    "is used wherever possible, but it never counts as both sources.",
                ),
                (
                    "bullets",
                    [
                        "the patient or their carer, with the patient's own medicines if brought in",
                        "the GP practice record or the shared care record",
                        "the community pharmacy dispensing history",
                        "the medicines administration chart from a care home",
                        "a hospital discharge letter less than 3 months old",
                    ],
                ),
            ],
            [
                ("h1", "4. Roles and responsibilities"),
                (
                    "p",
                    "Accredited pharmacy technicians may take the BPMH and record discrepancies. A pharmacist "
                    "reviews every reconciliation completed by a technician within the same working day. The "
                    "prescriber is told of each unintentional discrepancy in person or by telephone and must "
                    "act on it within 4 hours; a note left in the record alone is not enough.",
                ),
                (
                    "p",
                    "Nurses record the time of the last dose taken at home on the admission assessment, and "
                    "keep the patient's own medicines in the bedside locker, rather than sending them home, "
                    "until the pharmacist has checked them.",
                ),
                ("h1", "5. Escalation"),
                (
                    "p",
                    "Unresolved discrepancies are escalated first to the ward pharmacist and then to the "
                    "lead pharmacist for the division. Out of hours, the on-call pharmacist is contacted "
                    "through switchboard on extension 2200. A discrepancy that has already caused harm is "
                    "reported as a patient safety incident on the same day.",
                ),
                ("h1", "6. Documentation"),
                (
                    "p",
                    "Reconciliation is recorded on the electronic Medicines Reconciliation form (form MR-3). "
                    "The form shows the sources used, each discrepancy, whether it was intentional, the "
                    "action taken, and the name and role of the person completing it.",
                ),
            ],
            [
                ("h1", "7. Audit and monitoring"),
                (
                    "p",
                    "Each ward audits 20 randomly selected admissions every month. The targets are that 95% "
                    "of patients in scope are reconciled within 24 hours, and that every patient on "
                    "high-risk medicines is reconciled within 6 hours. Results are presented to the "
                    "Medicines Safety Committee, which meets on the second Thursday of each month. A ward "
                    "below target for two months in a row writes an improvement plan within 4 weeks.",
                ),
                ("h1", "8. Training"),
                (
                    "p",
                    "Staff who take medication histories complete the medication reconciliation e-learning "
                    "module before doing so unsupervised, and renew it every 2 years. Pharmacy technicians "
                    "also pass a competency assessment of 10 observed reconciliations before accreditation.",
                ),
                ("h1", "9. Related documents"),
                (
                    "bullets",
                    [
                        "Medicines Policy (MM-001)",
                        "Controlled Drugs Procedure (MM-009)",
                        "Discharge Policy (CP-041)",
                    ],
                ),
            ],
        ],
    )


def hospital_infection_control() -> None:
    write_pdf(
        "hospital/infection-control-manual.pdf",
        "Infection Prevention and Control Manual",
        "Infection Prevention and Control Team",
        f"{HOSPITAL} - IPC Manual IPC-M-01, edition 5",
        [
            [
                ("h1", "Infection Prevention and Control Manual"),
                ("meta", f"{HOSPITAL} - Infection Prevention and Control (IPC) Team"),
                (
                    "p",
                    "Manual reference IPC-M-01, edition 5, issued 6 January 2025. The IPC nurse on call is "
                    "reached on bleep 5021 from 08:00 to 18:00. Outside these hours, contact the on-call "
                    "microbiologist through switchboard.",
                ),
                ("h2", "1. Standard precautions"),
                (
                    "p",
                    "Standard precautions are used for every patient, whether or not an infection is known. "
                    "They are: hand hygiene; personal protective equipment chosen for the task; safe "
                    "handling of sharps; management of blood and body fluid spills; cleaning of shared "
                    "equipment between patients; and safe disposal of waste and linen.",
                ),
                ("h2", "1.1 Hand hygiene"),
                (
                    "p",
                    "Alcohol hand rub is used for most hand hygiene at the point of care. Soap and water "
                    "must be used instead when hands are visibly soiled, and when caring for patients with "
                    "diarrhoea or suspected Clostridioides difficile, because alcohol does not kill its "
                    "spores.",
                ),
                ("h2", "1.2 Personal protective equipment"),
                (
                    "p",
                    "Disposable gloves and a plastic apron are worn for contact with blood, body fluids, "
                    "broken skin or mucous membranes. Aprons and gloves are changed between patients and "
                    "between tasks on the same patient. Fluid-resistant surgical masks and eye protection "
                    "are worn whenever splashing is likely.",
                ),
            ],
            [
                ("h1", "2. Isolation"),
                (
                    "p",
                    "Side rooms are allocated by the nurse in charge in the priority order below. When more "
                    "patients need a side room than there are rooms free, the nurse in charge discusses "
                    "each case with the IPC team before the end of the same shift.",
                ),
                (
                    "bullets",
                    [
                        "Priority 1: suspected or confirmed norovirus, or other infectious diarrhoea",
                        "Priority 2: Clostridioides difficile infection",
                        "Priority 3: carbapenemase-producing organisms",
                        "Priority 4: suspected pulmonary tuberculosis (negative-pressure room on Ward 7B)",
                        "Priority 5: MRSA in a patient with a wound or an invasive device",
                    ],
                ),
                (
                    "p",
                    "The door of every isolation room carries a coloured sign: an orange sign for contact "
                    "precautions, a purple sign for droplet precautions and a red sign for airborne "
                    "precautions. Doors are kept closed, and the sign shows what staff and visitors must "
                    "wear before entering.",
                ),
                (
                    "p",
                    "Patients with norovirus stay in isolation until 48 hours after their last episode of "
                    "diarrhoea or vomiting. Patients with C. difficile stay in isolation until they have had "
                    "no diarrhoea for 48 hours and a formed stool has been recorded.",
                ),
            ],
            [
                ("h1", "3. Sharps and spills"),
                (
                    "p",
                    "Sharps bins are assembled with the label completed, and are closed and locked when they "
                    "are three-quarters full or after 3 months in use, whichever comes first. Never "
                    "re-sheath a used needle.",
                ),
                (
                    "p",
                    "After a needlestick or splash injury: encourage bleeding, wash with soap and running "
                    "water without scrubbing, and report to Occupational Health on extension 3150 within "
                    "1 hour. Out of hours, go to the Emergency Department.",
                ),
                (
                    "p",
                    "Blood spills are covered with chlorine-releasing granules at 10,000 parts per million, "
                    "left for 2 minutes and then cleared with disposable paper towels. Urine spills are not "
                    "treated with chlorine; clean them with detergent and water.",
                ),
                ("h1", "4. Outbreak management"),
                (
                    "p",
                    "An outbreak is suspected when two or more patients on the same ward develop the same "
                    "infection within 7 days. The nurse in charge informs the IPC team, who decide whether "
                    "to close bays or the whole ward. A ward closed for norovirus reopens only after 72 hours "
                    "with no new cases and a terminal clean with hydrogen peroxide vapour.",
                ),
            ],
        ],
    )


def hospital_on_call_rota() -> None:
    days = [
        ("3 March 2025", "Monday"),
        ("4 March 2025", "Tuesday"),
        ("5 March 2025", "Wednesday"),
        ("6 March 2025", "Thursday"),
        ("7 March 2025", "Friday"),
        ("8 March 2025", "Saturday"),
        ("9 March 2025", "Sunday"),
    ]
    consultants = {
        "General Medicine": ["Dr Ines Halloran"] * 2 + ["Dr Tomasz Wren"] * 2 + ["Dr Aoife Castellan"] * 3,
        "General Surgery": ["Mr Jonah Pettigrew"] * 3 + ["Ms Leila Achterberg"] * 2 + ["Mr Ruairi Osei"] * 2,
        "Anaesthetics": ["Dr Sunniva Hale"] * 4 + ["Dr Hana Sorensen"] * 3,
    }
    registrars = {
        "General Medicine": [("Dr Felix Amberley", "6101"), ("Dr Chiamaka Lund", "6102")],
        "General Surgery": [("Dr Oren Baptiste", "6201"), ("Dr Yusuf Tremaine", "6202")],
        "Anaesthetics": [("Dr Greta Marlowe", "6301"), ("Dr Nilufar Quayle", "6302")],
    }
    rota = [["Date", "Day", "Specialty", "Consultant on call", "Registrar on call", "Registrar bleep", "Hours"]]
    for i, (date, day) in enumerate(days):
        hours = "09:00 to 09:00 (24 hours)" if day in ("Saturday", "Sunday") else "17:00 to 09:00"
        for specialty, names in consultants.items():
            registrar, bleep = registrars[specialty][i % 2]
            rota.append([date, day, specialty, names[i], registrar, bleep, hours])
    contacts = [
        ["Role", "Name", "How to contact", "Hours"],
        ["Site manager", "Duty site manager (rotating)", "Bleep 4410", "24 hours"],
        ["Medical director on call", "Dr Perpetua Vance", "Mobile via switchboard", "Evenings, nights and weekends"],
        ["Duty radiologist", "Radiology rota", "Extension 2875", "24 hours"],
        ["Critical care consultant", "ICU rota", "Extension 2446", "24 hours"],
        ["Rota coordinator", "Agnieszka Thorne", "Extension 2190", "Monday to Friday 08:30 to 16:30"],
        ["Medical staffing manager", "Colm Redfern", "Extension 2195", "Monday to Friday 09:00 to 17:00"],
    ]
    rules = [
        ["Rule", "Detail"],
        ["Swaps", "Swaps must be agreed with the rota coordinator at least 7 days before the shift"],
        ["Evening handover", "Evening handover starts at 20:30 in the Doctors' Mess, Level 2 Main Block"],
        ["Morning handover", "Morning handover starts at 08:30 in the Acute Medical Unit seminar room"],
        ["Sickness", "Report sickness to the rota coordinator and the site manager before 07:00"],
        ["Rest", "No doctor works more than 4 consecutive night shifts"],
        ["Publication", "The rota for each month is published by the 15th of the month before"],
    ]
    write_xlsx(
        "hospital/on-call-rota.xlsx",
        "On-call rota, week beginning 3 March 2025",
        "Medical Staffing",
        [
            ("On-call rota", rota, [16, 12, 18, 22, 22, 16, 26]),
            ("Escalation contacts", contacts, [28, 30, 26, 32]),
            ("Rota rules", rules, [20, 90]),
        ],
    )


def hospital_ward_contacts() -> None:
    write_csv(
        "hospital/ward-contact-list.csv",
        [
            ["Ward", "Specialty", "Location", "Extension", "Ward manager", "Beds", "Notes"],
            [
                "Ash Ward",
                "Acute Medical Unit",
                "Main Block Level 0",
                "2301",
                "Sister Bronagh Keel",
                "36",
                "Admissions from the Emergency Department around the clock",
            ],
            [
                "Beech Ward",
                "Respiratory Medicine",
                "Main Block Level 2",
                "2312",
                "Charge Nurse Idris Fennimore",
                "28",
                "Four beds for non-invasive ventilation",
            ],
            [
                "Elm Ward",
                "Cardiology",
                "Main Block Level 3",
                "2324",
                "Sister Orla Mabey",
                "24",
                "All beds have cardiac monitoring",
            ],
            [
                "Hazel Ward",
                "Elderly Care",
                "Cedar Wing Level 2",
                "2335",
                "Charge Nurse Tendai Rusk",
                "30",
                "Dementia-friendly ward with a day room",
            ],
            [
                "Heron Ward",
                "Trauma and Orthopaedics",
                "Cedar Wing Level 3",
                "2346",
                "Sister Maelle Corrigan",
                "32",
                "Hip fracture beds in bays 1 to 3",
            ],
            [
                "Juniper Ward",
                "General Surgery",
                "Main Block Level 4",
                "2357",
                "Charge Nurse Bartholomew Ide",
                "30",
                "Surgical assessment bay with six trolleys",
            ],
            [
                "Kestrel Ward",
                "Stroke Unit",
                "Cedar Wing Level 1",
                "2368",
                "Sister Yewande Pike",
                "26",
                "Hyperacute stroke bay beside the CT scanner",
            ],
            [
                "Linden Ward",
                "Gastroenterology",
                "Main Block Level 2",
                "2379",
                "Charge Nurse Soren Ashby",
                "28",
                "Endoscopy recovery for inpatients",
            ],
            [
                "Maple Ward",
                "Renal Medicine",
                "Main Block Level 3",
                "2381",
                "Sister Delphine Oakes",
                "22",
                "Six dialysis stations",
            ],
            [
                "Nightingale Ward",
                "Children's Ward",
                "Rowan Building Level 1",
                "2402",
                "Sister Carys Vantreight",
                "20",
                "Parents may stay overnight",
            ],
            [
                "Osprey Ward",
                "Maternity",
                "Rowan Building Level 2",
                "2413",
                "Midwife Manager Liesel Brannock",
                "34",
                "Includes the postnatal ward",
            ],
            [
                "Sorrel Ward",
                "Oncology",
                "Main Block Level 5",
                "2424",
                "Sister Ngozi Fairweather",
                "24",
                "Chemotherapy day unit next door",
            ],
            [
                "Ward 7B",
                "Infectious Diseases",
                "Main Block Level 7",
                "2435",
                "Charge Nurse Emrys Calder",
                "12",
                "Four negative-pressure rooms",
            ],
            [
                "Intensive Care Unit",
                "Critical Care",
                "Main Block Level 1",
                "2446",
                "Sister Philippa Drummond",
                "16",
                "Visiting arranged with the nurse in charge",
            ],
        ],
    )


SCANNED_LINES = [
    "# INCIDENT REPORT FORM",
    f"{HOSPITAL} - Patient Safety Team",
    "---",
    "Reference: IR-2025-0193",
    "Date and time of incident: 22 February 2025, 06:40",
    "Location: Heron Ward, bay 3, bed 14",
    "Category: Patient fall - no harm",
    "Reported by: Staff Nurse, night shift",
    "---",
    "Description:",
    "Patient found sitting on the floor beside the bed after trying to walk to the",
    "bathroom without calling for help. Bed rails were down as per care plan.",
    "Call bell was within reach. Floor was dry. Patient wearing own slippers.",
    "",
    "Immediate action:",
    "Patient assessed by nurse in charge; no injury found. Doctor informed at 06:55",
    "and reviewed patient at 07:20. Neurological observations for 24 hours.",
    "Falls risk assessment repeated. Low-rise bed and sensor mat requested.",
    "Next of kin informed by telephone at 09:10.",
    "",
    "Review:",
    "Reviewed by the ward manager on 24 February 2025. Learning shared at the",
    "ward safety huddle on 25 February 2025.",
    "---",
    "Signed: ______________________     Date: 24/02/2025",
]


def hospital_visiting_hours() -> None:
    write_html(
        "hospital/visiting-hours.html",
        f"Visiting hours - {HOSPITAL}",
        [
            ("h1", "Visiting Hours and Guidance for Visitors"),
            (
                "p",
                f"{HOSPITAL} welcomes visitors: seeing family and friends helps patients recover. This page "
                "explains when you can visit and what we ask of you. It was last reviewed on 20 February 2025 "
                "by the Patient Experience Team.",
            ),
            ("h2", "Adult wards"),
            (
                "p",
                "Visiting on adult wards is from 11:00 to 20:00 every day. Up to two visitors may be at the "
                "bedside at any one time. Protected mealtimes run from 12:00 to 13:00 and from 17:00 to "
                "18:00; during these times only visitors who help a patient to eat stay on the ward.",
            ),
            ("h2", "Rest hour"),
            (
                "p",
                "Between 14:00 and 15:00 the lights are dimmed on adult wards so that patients can rest. "
                "Visitors are asked to wait in the ward day room during this hour.",
            ),
            ("h2", "Children's ward"),
            (
                "p",
                "Parents and carers can be with their child 24 hours a day on Nightingale Ward, and one "
                "parent may sleep at the bedside on a fold-out bed. Brothers and sisters under 12 may visit "
                "between 15:00 and 19:00 when an adult comes with them.",
            ),
            ("h2", "Maternity"),
            (
                "p",
                "Birth partners may stay throughout labour. On the postnatal ward one named birth partner "
                "may visit from 08:00 to 22:00; other visitors, including the baby's brothers and sisters, "
                "are welcome from 14:00 to 19:00.",
            ),
            ("h2", "Critical care"),
            (
                "p",
                "Visiting in the Intensive Care Unit is arranged with the nurse in charge. Two visitors may "
                "be at the bedside at a time, and children under 12 visit only after a discussion with the "
                "nurse in charge. Flowers and plants are not allowed in critical care.",
            ),
            ("h2", "Outbreaks and ward closures"),
            (
                "p",
                "When a ward is closed because of an infection outbreak, visiting is limited to one named "
                "visitor per patient. That visitor wears an apron while on the ward and washes their hands "
                "with soap and water when leaving. Please do not visit if you have had diarrhoea or "
                "vomiting in the last 48 hours.",
            ),
            ("h2", "Help and contacts"),
            (
                "p",
                "The Patient Support Office can help with questions, concerns and compliments. It is on "
                "Main Block Level 0 next to the main entrance, open 09:00 to 16:00 Monday to Friday, on "
                "extension 2050.",
            ),
            (
                "bullets",
                [
                    "Wi-Fi for visitors: network StBrigids-Guest, no password needed",
                    "Cafe on Main Block Level 0: open 07:30 to 19:00 every day",
                    "Chapel and quiet room: open at all times",
                ],
            ),
        ],
        script="""
/* Page banner. Scripts are never run or indexed by the appliance. */
document.addEventListener("DOMContentLoaded", function () {
  var banner = document.createElement("p");
  banner.textContent = "Please check the ward page before you travel.";
  document.body.insertBefore(banner, document.body.firstChild);
});
""",
    )


def hospital_fire_safety() -> None:
    write_text(
        "hospital/fire-safety-procedures.txt",
        f"""
{HOSPITAL.upper()}
FIRE SAFETY PROCEDURES

Issued by the Fire Safety Adviser, Estates and Facilities. Version 4, January 2025.
Display this notice in every ward office and staff room.

RAISING THE ALARM

If you discover a fire, break the glass at the nearest red fire alarm call point, then dial 3333
from any internal telephone. Tell the switchboard the building, the floor, the ward or department,
and what is burning. Do not assume that somebody else has called. The switchboard alerts the
hospital Fire Response Team and the fire service at the same time.

Only tackle a fire if it is small, you have been trained to use the extinguisher, and you have a
clear way out behind you.

EVACUATION

The hospital uses progressive horizontal evacuation. Patients are moved away from the fire,
through at least one set of fire doors, into the next fire compartment on the same floor. Lifts
are not used, except the two evacuation lifts in the Cedar Wing (lifts E1 and E2), which are
operated only by trained porters. A full evacuation of a floor is ordered only by the Fire Response
Team Leader or the senior fire service officer.

A continuous alarm tone means the fire is in your zone: start evacuating. An intermittent tone
means the fire is in a neighbouring zone: prepare patients to move and wait for instructions.

ASSEMBLY POINTS

Main Block: Assembly Point A, on the lawn beside the chapel garden.
Cedar Wing: Assembly Point B, at the north end of the staff car park.
Rowan Building: Assembly Point C, at the ambulance turning circle.

The nurse in charge takes the ward's patient list and staff list to the assembly point and reports
to the fire marshal, who wears a yellow tabard.

FIRE EXTINGUISHERS

Red label: water, for paper, wood and textiles.
Cream label: foam, for flammable liquids.
Black label: carbon dioxide, for electrical equipment.
Blue label: dry powder, used by trained staff only.
Never use water or foam on electrical equipment. Turn off oxygen cylinders near a fire and move
them away if it is safe to do so.

FIRE DOORS

Fire doors must never be wedged or propped open. Doors on magnetic holders close automatically
when the alarm sounds; keep the space in front of them clear.

TRAINING AND DRILLS

All staff complete fire safety training every 12 months. Each ward holds a fire drill twice a
year, and at least one drill each year takes place at night for the night staff. Fire marshals
attend a half-day course every 3 years.
""",
    )


def hospital_consent_procedure() -> None:
    write_docx(
        "hospital/consent-procedure.docx",
        "Consent to Examination and Treatment Procedure",
        "Clinical Governance",
        [
            ("title", "Consent to Examination and Treatment Procedure"),
            (
                "p",
                f"{HOSPITAL}. Procedure CP-033, version 1.4, approved by the Clinical Governance Committee "
                "on 9 December 2024. Owner: Associate Medical Director for Patient Safety.",
            ),
            ("h1", "1. Principles"),
            (
                "p",
                "Consent is valid only when it is given voluntarily, by a person who has capacity to make the "
                "decision, after they have been given the information they need about the proposed "
                "treatment, its material risks and the reasonable alternatives, including doing nothing. "
                "Consent is a process of discussion, not a signature on a form.",
            ),
            ("h1", "2. Who may seek consent"),
            (
                "p",
                "The clinician carrying out the procedure is responsible for consent. They may delegate the "
                "consent discussion to a colleague who is trained to perform the procedure, or who has "
                "completed the hospital's consent training for that specific procedure and is on the "
                "department's register of delegated consenters.",
            ),
            ("h1", "3. Consent forms"),
            (
                "p",
                "Written consent is required for any procedure under general or regional anaesthesia or "
                "sedation, for procedures that carry significant risk, and for taking part in research. The "
                "form depends on the patient:",
            ),
            (
                "table",
                [
                    ["Form", "Used for"],
                    ["Form 1", "Adults and young people aged 16 or over who have capacity"],
                    ["Form 2", "Parental consent for a child under 16"],
                    ["Form 3", "Procedures under local anaesthetic where the patient stays awake"],
                    ["Form 4", "Adults who lack capacity (best-interests decision, signed by two clinicians)"],
                ],
            ),
            ("h1", "4. Timing of consent"),
            ("h2", "4.1 Planned procedures"),
            (
                "p",
                "For planned procedures the consent discussion takes place at the pre-assessment clinic, at "
                "least 7 days before the procedure where possible, so that the patient has time to think and "
                "to ask questions. Consent is confirmed on the day of the procedure by a member of the "
                "operating team, who signs the confirmation section of the form.",
            ),
            ("h2", "4.2 Validity of signed forms"),
            (
                "p",
                "A signed consent form is valid for 6 months from the date the patient signed it, provided "
                "nothing material has changed. After 6 months, or sooner if the patient's condition or the "
                "planned procedure changes, a new form is completed.",
            ),
            ("h1", "5. Interpreters and accessible information"),
            (
                "p",
                "When a patient's first language is not English, a professional interpreter is used for the "
                "consent discussion, in person, by video or by telephone. Family members may not interpret "
                "for consent, and children must never interpret. Interpreters are booked through Language "
                "Services on extension 4780, giving at least 48 hours' notice for face-to-face interpreters. "
                "Telephone interpreting is available 24 hours a day without booking. Easy-read and large-"
                "print leaflets are available from the Patient Support Office.",
            ),
            ("h1", "6. Withdrawal of consent"),
            (
                "p",
                "A patient with capacity may withdraw consent at any time, including during a procedure "
                "under local anaesthetic. The clinician stops if it is safe to do so, explains the "
                "consequences of stopping, and records the withdrawal and the discussion in the notes.",
            ),
        ],
    )


def hospital_hand_hygiene_training() -> None:
    write_pptx(
        "hospital/hand-hygiene-training.pptx",
        "Hand Hygiene Training 2025",
        "Infection Prevention and Control Team - mandatory annual update for all clinical staff",
        "Infection Prevention and Control Team",
        [
            (
                "Why hand hygiene matters",
                [
                    "Hands carry most of the organisms passed between patients on our wards",
                    "Our 2024 audits found 87% compliance on medical wards and 94% on surgical wards",
                    "Every ward's target for 2025 is 98% compliance",
                    "The moment missed most often in 2024: after touching patient surroundings",
                ],
            ),
            (
                "The five moments",
                [
                    "Before touching a patient",
                    "Before a clean or aseptic procedure",
                    "After a risk of exposure to body fluids",
                    "After touching a patient",
                    "After touching a patient's surroundings",
                ],
            ),
            (
                "Technique and timing",
                [
                    "Alcohol hand rub: 20 to 30 seconds, until hands are dry",
                    "Soap and water: 40 to 60 seconds, then dry well with paper towels",
                    "Cover every surface: palms, backs, between fingers, thumbs, fingertips, wrists",
                    "Use soap and water, not hand rub, for patients with diarrhoea",
                ],
            ),
            (
                "Bare below the elbows",
                [
                    "Short sleeves, or sleeves rolled above the elbow, in clinical areas",
                    "One plain metal band ring only, with no stones",
                    "No wrist watches, bracelets or fitness trackers",
                    "Short nails with no varnish, gel or false nails",
                ],
            ),
            (
                "How we audit",
                [
                    "Each ward's link nurse observes 15 hand hygiene opportunities every month",
                    "Results go on the ward board by the 10th of the following month",
                    "Two months in a row below 90% brings a visit from the IPC team",
                ],
            ),
            (
                "Look after your skin",
                [
                    "Use the hospital moisturiser at least three times a shift",
                    "Report soreness or cracked skin to Occupational Health early",
                    "Gloves are not a substitute for hand hygiene",
                ],
            ),
            (
                "Completing this training",
                [
                    "Take the 10-question quiz on the learning portal; the pass mark is 80%",
                    "Deadline for all clinical staff: 30 June 2025",
                    "Your ward manager sees your completion status each month",
                ],
            ),
        ],
    )


def hospital_sepsis_pathway() -> None:
    write_md(
        "hospital/sepsis-escalation-pathway.md",
        [
            ("h1", "Sepsis Recognition and Escalation Pathway"),
            (
                "p",
                f"{HOSPITAL}, adult inpatient wards. Pathway reference CP-070, version 1.1, approved in "
                "March 2025 by the Deteriorating Patient Group.",
            ),
            ("h2", "When to suspect sepsis"),
            (
                "p",
                "Suspect sepsis in any adult with a suspected or confirmed infection who has an early "
                "warning score (EWS) of 5 or more, a single observation scoring 3, or new confusion. Trust "
                "the concerns of relatives who say the patient is not their usual self.",
            ),
            ("h2", "Escalation"),
            (
                "bullets",
                [
                    "EWS 5 or 6: the nurse in charge informs the ward doctor, who reviews the patient within "
                    "30 minutes.",
                    "EWS 7 or more: call the Critical Care Outreach Team on bleep 6060 and the medical "
                    "registrar; the patient is reviewed within 15 minutes.",
                    "If no one has reviewed the patient in time, escalate to the next most senior doctor and "
                    "record the times in the notes.",
                ],
            ),
            ("h2", "The first hour"),
            (
                "p",
                "Within 1 hour of recognising sepsis: take blood cultures before antibiotics, unless this "
                "would delay the antibiotics; give intravenous antibiotics following the hospital "
                "antimicrobial guide; measure lactate; and give 500 ml of intravenous fluid over 15 minutes "
                "if the patient is hypotensive or the lactate is above 2 mmol/L. Start a fluid balance chart "
                "and measure urine output every hour.",
            ),
            ("h2", "Sepsis grab bags"),
            (
                "p",
                "Each ward keeps a sepsis grab bag in drawer 2 of the resuscitation trolley. It holds two "
                "blood culture sets, cannulas, a blood gas syringe for lactate and the antibiotic quick "
                "guide. The ward's senior nurse checks and restocks it every Monday.",
            ),
            ("h2", "Audit"),
            (
                "p",
                "The time from recognition to the first antibiotic dose is audited every month. The target "
                "is that 90% of patients with sepsis receive antibiotics within 1 hour.",
            ),
        ],
    )


# ------------------------------------------------------------------------------------------------
# Harrow & Vale LLP
# ------------------------------------------------------------------------------------------------
FIRM = "Harrow & Vale LLP"
MATTER = "Pellworth Logistics Ltd v Carraway Freight Services Ltd"
HOLD_SUBJECT = "Litigation hold - Pellworth v Carraway (HV-2025-0417)"


def law_conflict_check() -> None:
    write_docx(
        "lawfirm/conflict-check-procedure.docx",
        "Conflict Check Procedure",
        "Risk and Compliance",
        [
            ("title", "Conflict Check Procedure"),
            (
                "p",
                f"{FIRM} - Risk and Compliance. Procedure RC-04, version 6, effective 3 February 2025. "
                "Owner: General Counsel (Miriam Oduya).",
            ),
            ("h1", "1. When a conflict check is needed"),
            (
                "p",
                "A conflict check must be completed and cleared before any substantive work is done on a new "
                "matter, including free initial advice lasting more than 30 minutes. A new check is also "
                "needed when a new party joins an existing matter, when the client's group structure "
                "changes, or when a matter is reopened more than 12 months after it closed.",
            ),
            ("h1", "2. Running the search"),
            ("h2", "2.1 Names to search"),
            (
                "p",
                "The fee earner opening the matter submits the conflict request form (form CR-1) with the "
                "names of: the client; the client's parent companies and subsidiaries up to two levels above "
                "and below; every other party to the matter; any known guarantors or insurers; and the other "
                "side's lawyers.",
            ),
            ("h2", "2.2 Search period"),
            (
                "p",
                "The Risk team searches the practice management system for all matters opened in the last "
                "12 years, and the paper archive index for older matters where a company client's name "
                "matches. The search also covers the marketing contacts database and the register of "
                "partners' declared personal interests.",
            ),
            ("h1", "3. Reviewing the results"),
            (
                "p",
                "The Conflicts Analyst reviews each search within 1 business day of receiving a complete "
                "form. A clear result is recorded and the matter number is released to Accounts. Where a "
                "possible conflict is found, the Conflicts Analyst refers it to the General Counsel, who "
                "decides within 2 business days whether the firm may act, may act only with the informed "
                "consent of both clients, or must decline.",
            ),
            ("h2", "3.1 Urgent requests"),
            (
                "p",
                "A request marked urgent, for example an injunction application to be made the same day, is "
                "reviewed within 2 hours if it is submitted before 16:00 on a business day. Out of hours, "
                "the duty Risk partner can clear an urgent check by telephone and the form follows the next "
                "morning.",
            ),
            ("h1", "4. Information barriers"),
            (
                "p",
                "Where both clients give informed consent and the General Counsel approves, an information "
                "barrier is put in place. The barrier memo is circulated to all staff on the day of approval, "
                "document management permissions are set so that neither team can open the other's "
                "workspace, and every team member signs an undertaking. Each team member re-certifies the "
                "barrier every 6 months, and any breach is reported to the General Counsel at once.",
            ),
            ("h1", "5. Lateral hires"),
            (
                "p",
                "Before a partner or associate joins from another firm, they list the matters they worked on "
                "in the previous 3 years, giving client and other-party names only and no confidential "
                "details. The Risk team checks the list against current matters before the offer becomes "
                "unconditional.",
            ),
            ("h1", "6. Records"),
            (
                "p",
                "Search results, decisions, client consents and barrier undertakings are saved to the matter "
                "file and summarised in the Risk register. The Risk Committee reviews every declined matter "
                "at its monthly meeting.",
            ),
        ],
    )


def law_litigation_hold_memo() -> None:
    write_pdf(
        "lawfirm/litigation-hold-memo.pdf",
        "Litigation Hold Notice - HV-2025-0417",
        "Imogen Ashdown",
        f"{FIRM} - Privileged and confidential - HV-2025-0417",
        [
            [
                ("h1", "Litigation Hold Notice"),
                ("meta", f"{FIRM} - Privileged and confidential - legal advice"),
                (
                    "p",
                    "To: all custodians listed in section 5. From: Imogen Ashdown, Partner, Commercial "
                    f"Litigation. Date: 10 March 2025. Matter: {MATTER}, matter number HV-2025-0417.",
                ),
                ("h2", "1. Why you are receiving this notice"),
                (
                    "p",
                    "Pellworth Logistics Ltd, a client of the firm, expects to bring proceedings against "
                    "Carraway Freight Services Ltd over warehousing charges and the loss of goods stored at "
                    "Carraway's Dock 3 site between March 2023 and September 2024. Because proceedings are "
                    "reasonably in contemplation, the firm and the client must preserve every document that "
                    "may be relevant to the dispute.",
                ),
                (
                    "p",
                    "This notice overrides any routine deletion or destruction schedule, including the "
                    "firm's own Document Retention Policy and any automatic clean-up rules you have set up "
                    "in your mailbox.",
                ),
                ("h2", "2. Period covered"),
                (
                    "p",
                    "The hold covers documents created or received from 1 January 2022 to the present, and "
                    "any documents created while the hold remains in force.",
                ),
            ],
            [
                ("h1", "3. What you must preserve"),
                ("p", "Preserve documents in every form, wherever they are kept, including:"),
                (
                    "bullets",
                    [
                        "email, including archive folders, deleted items and personal folders",
                        "instant messages and chat channels on firm and client systems",
                        "text and voice messages on work and personal mobile phones used for this matter",
                        "contracts, invoices, delivery notes, stock reports and warehouse inspection records",
                        "CCTV footage of the Dock 3 loading bays held by the client",
                        "handwritten notes, notebooks and desk diaries",
                    ],
                ),
                (
                    "p",
                    "Do not delete, edit, move, rename or annotate any of these documents. If you are not "
                    "sure whether a document is covered, keep it and ask.",
                ),
                ("h1", "4. What IT will do"),
                (
                    "p",
                    "The firm's IT Service Desk and Pellworth's IT team will suspend automatic deletion for "
                    "the mailboxes and network folders of every custodian by 14 March 2025. Pellworth's IT "
                    "provider will image the work mobile phones of the four custodians who used them for "
                    "messages about the warehouse. Custodians must not hand back, replace or reset any "
                    "device until the Litigation Support Manager confirms in writing that it has been "
                    "imaged.",
                ),
            ],
            [
                ("h1", "5. Custodians"),
                ("p", "The nine custodians are:"),
                (
                    "bullets",
                    [
                        "the Operations Director, Pellworth Logistics",
                        "the Warehouse Contracts Manager, Pellworth Logistics",
                        "the Finance Controller, Pellworth Logistics",
                        "two Account Managers, Pellworth Logistics",
                        "the Head of Insurance Claims, Pellworth Logistics",
                        "Imogen Ashdown, Tobias Reeve and the matter paralegal, Harrow & Vale",
                    ],
                ),
                ("h1", "6. Acknowledgement"),
                (
                    "p",
                    "Each custodian must acknowledge this notice within 5 business days, by 17 March 2025, "
                    "by replying to the email that sent it. A custodian who has not acknowledged by then "
                    "will be contacted by the supervising partner.",
                ),
                ("h1", "7. Questions and release"),
                (
                    "p",
                    "Questions go to Rafaela Strand, Litigation Support Manager, on extension 5530. The hold "
                    "stays in force until you receive written notice of its release from the supervising "
                    "partner; the end of the proceedings does not release it automatically.",
                ),
            ],
        ],
    )


def custodian_list_docx() -> bytes:
    return docx_bytes(
        "Custodian list - HV-2025-0417",
        "Tobias Reeve",
        [
            ("title", "Custodian list - HV-2025-0417"),
            ("p", f"{MATTER}. Prepared by Tobias Reeve on 11 March 2025 for the litigation hold."),
            ("h1", "Pellworth Logistics custodians"),
            (
                "table",
                [
                    ["Name", "Role", "Systems used"],
                    ["Gideon Farrant", "Operations Director", "Email, work mobile, site safe"],
                    [
                        "Marisol Tennant",
                        "Warehouse Contracts Manager (since June 2023)",
                        "Email, work mobile, contracts database",
                    ],
                    ["Quentin Abara", "Finance Controller", "Email, finance ledger"],
                    ["Beatrix Lowrie", "Account Manager", "Email, work mobile"],
                    ["Callum Yeo", "Account Manager", "Email, work mobile"],
                    ["Oluwaseun Hartigan", "Head of Insurance Claims", "Email, claims log"],
                ],
            ),
            ("h1", "Harrow & Vale custodians"),
            (
                "p",
                "Imogen Ashdown (Partner), Tobias Reeve (Associate) and Nadia Petrossian (Paralegal): firm "
                "mailboxes, chat and the matter workspace.",
            ),
            ("h1", "Former employees"),
            (
                "p",
                "The previous Warehouse Contracts Manager (left May 2023) and an Account Manager (left "
                "November 2023). Their mailboxes are in Pellworth's archive.",
            ),
        ],
    )


def law_email_thread() -> None:
    first_id = "<20250310091200.ashdown@harrow-vale.example>"
    second_id = "<20250311154700.reeve@harrow-vale.example>"
    write_eml(
        "lawfirm/email-thread-1-hold-notice.eml",
        {
            "From": "Imogen Ashdown <i.ashdown@harrow-vale.example>",
            "To": "Pellworth matter team <pellworth-team@harrow-vale.example>",
            "Cc": "Rafaela Strand <r.strand@harrow-vale.example>",
            "Subject": HOLD_SUBJECT,
            "Date": "Mon, 10 Mar 2025 09:12:00 +0000",
            "Message-ID": first_id,
        },
        """
All,

The litigation hold notice for Pellworth Logistics Ltd v Carraway Freight Services Ltd went out to
the client's custodians this morning. A copy is on the matter file as "Litigation Hold Notice
10 March 2025".

Tobias, please send me the final custodian list, with each person's role and the systems they use,
by 12:00 on Wednesday 12 March. Include anyone who has left Pellworth since January 2022; the client
tells me at least two people have.

Rafaela, please raise the IT ticket for the deletion suspension today and copy me in on the
confirmation.

The first custodian interviews are pencilled in for Tuesday 18 March at Pellworth's head office.
Nadia will circulate the timetable once the list is final.

A reminder for the whole team: we do not discuss the merits of the claim in emails to the client's
operations staff. Keep those emails to preservation and logistics. Advice goes only to Pellworth's
General Counsel, Solveig Adebanjo.

Thanks,
Imogen

Imogen Ashdown
Partner, Commercial Litigation
Harrow & Vale LLP
""",
    )
    write_eml(
        "lawfirm/email-thread-2-custodian-list.eml",
        {
            "From": "Tobias Reeve <t.reeve@harrow-vale.example>",
            "To": "Imogen Ashdown <i.ashdown@harrow-vale.example>",
            "Cc": "Rafaela Strand <r.strand@harrow-vale.example>",
            "Subject": "Re: " + HOLD_SUBJECT,
            "Date": "Tue, 11 Mar 2025 15:47:00 +0000",
            "Message-ID": second_id,
            "In-Reply-To": first_id,
            "References": first_id,
        },
        """
Imogen,

The custodian list is attached (custodian-list.docx). There are 9 custodians in total: six at
Pellworth and the three of us on the matter team.

Two former Pellworth employees are relevant: the previous Warehouse Contracts Manager, who left in
May 2023, and an Account Manager who left in November 2023. Pellworth's IT team confirms that both
mailboxes are still in their archive. They have agreed to keep them until 30 June 2025 and to extend
that if we ask.

The Dock 3 CCTV recorder overwrites footage after 31 days, so Pellworth has exported everything it
still holds for February and March 2025 to an encrypted drive. Gideon Farrant keeps the drive in the
site safe.

Shall I add the client's insurers to the list? They hold the loss adjuster's photographs.

Tobias

Tobias Reeve
Associate, Commercial Litigation
Harrow & Vale LLP
""",
        attachment=(
            "custodian-list.docx",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            custodian_list_docx(),
        ),
        boundary="==hv-thread-0417-custodians==",
    )
    write_eml(
        "lawfirm/email-thread-3-it-confirmation.eml",
        {
            "From": "Kofi Lindholm <k.lindholm@harrow-vale.example>",
            "To": "Rafaela Strand <r.strand@harrow-vale.example>",
            "Cc": "Imogen Ashdown <i.ashdown@harrow-vale.example>, Tobias Reeve <t.reeve@harrow-vale.example>",
            "Subject": "IT-88213 retention lock applied - Pellworth v Carraway (HV-2025-0417)",
            "Date": "Wed, 12 Mar 2025 10:05:00 +0000",
            "Message-ID": "<20250312100500.lindholm@harrow-vale.example>",
            "In-Reply-To": second_id,
            "References": f"{first_id} {second_id}",
        },
        """
Rafaela,

Ticket IT-88213 is complete for the firm's side of the hold:

- A retention lock was applied to the mailboxes of Imogen Ashdown, Tobias Reeve and Nadia
  Petrossian at 16:40 on 11 March 2025. Items can no longer be purged, even if a user empties
  their deleted items.
- The matter workspace and the team's network folder are now read-and-add only; nothing can be
  deleted from them.
- The automatic 90-day deletion of chat messages is switched off for the three users.

The client's systems are outside our control. Pellworth's IT contact, Desmond Ilori, says their
mailbox holds will be in place by the end of Thursday 13 March, and he will email you directly.

We can collect the firm's data for disclosure on 2 working days' notice. Please raise a new ticket
for that rather than reopening this one. The work mobile phones of the four Pellworth custodians
are being imaged by the client's own provider, not by us.

Kofi Lindholm
IT Service Desk Lead, Harrow & Vale LLP
Extension 5100
""",
    )


def law_new_associate_training() -> None:
    write_pptx(
        "lawfirm/new-associate-training.pptx",
        "New Associate Induction",
        f"{FIRM} - Spring 2025 intake - Learning and Development",
        "Learning and Development",
        [
            (
                "Your first week",
                [
                    "Collect your building pass from reception on Level 2 before 09:15 on Monday",
                    "Monday 09:30: IT induction in Training Room 3, Level 4",
                    "Meet your supervising partner by Wednesday",
                    "Finish the conflicts and anti-money laundering e-learning by Friday",
                ],
            ),
            (
                "Recording your time",
                [
                    "Record time in 6-minute units (0.1 of an hour)",
                    "Enter each day's time by 10:00 on the next working day",
                    "Annual target: 1,450 chargeable hours",
                    "Up to 50 hours of pro bono work count towards the target",
                ],
            ),
            (
                "Supervision and sign-off",
                [
                    "For your first 6 months a senior associate countersigns every letter to a client or another firm",
                    "Court documents are approved by a partner before filing",
                    "Never give an undertaking without a partner's approval",
                ],
            ),
            (
                "Confidentiality",
                [
                    "Do not discuss client matters in lifts, cafes or on public transport",
                    "Clean desk: lock papers away at the end of each day",
                    "Use the secure file transfer service for documents over 20 MB",
                    "Report a lost phone or laptop to the IT Service Desk within 1 hour",
                ],
            ),
            (
                "Learning and development",
                [
                    "Associate training sessions every Thursday at 08:30",
                    "At least 16 hours of structured learning each year",
                    "Each associate has a mentor from outside their own team",
                ],
            ),
            (
                "Wellbeing",
                [
                    "The employee assistance line is open 24 hours a day",
                    "Work after 20:00 or at weekends should be the exception: tell your supervising partner "
                    "if it becomes the rule",
                    "Trained mental health first aiders on every floor",
                ],
            ),
        ],
    )


def law_billing_rates() -> None:
    rates = [
        ["Grade", "Experience", "Hourly rate (GBP)", "Notes"],
        ["Equity partner", "Partner with a share of profits", 465, "Sets strategy on the matter"],
        ["Salaried partner", "Partner on a fixed salary", 420, "Runs the matter day to day"],
        ["Senior associate", "5 or more years qualified", 330, "Supervises associates and trainees"],
        ["Associate", "Up to 4 years qualified", 260, "Drafting, research and client calls"],
        ["Costs lawyer", "Specialist in legal costs", 210, "Bills of costs and budgets"],
        ["Trainee solicitor", "In training contract", 165, "Always supervised"],
        ["Paralegal", "Non-qualified fee earner", 140, "Document review and bundles"],
    ]
    disbursements = [
        ["Item", "Charge (GBP)", "Basis"],
        ["Photocopying and printing", 0.15, "Per page, for jobs over 100 pages"],
        ["Same-day courier within the city", 35, "Per delivery"],
        ["Mileage", 0.45, "Per mile, for travel outside the city"],
        ["Same-day bank transfer", 30, "Per payment"],
        ["Court fees", "At cost", "No mark-up"],
        ["Property register searches", "At cost", "No mark-up"],
        ["Barristers' fees", "At cost", "Agreed with the client in advance"],
    ]
    notes = [
        ["Topic", "Note"],
        ["Rate period", "These rates apply from 1 April 2025 to 31 March 2026"],
        ["Rate review", "Rates are reviewed once a year, and clients get 60 days' written notice of changes"],
        ["Billing cycle", "Bills are sent monthly, on the first business day of the month"],
        ["Payment terms", "Bills are payable within 30 days of the bill date"],
        ["Interest", "Interest on overdue bills is charged at 4% above the base rate"],
    ]
    write_xlsx(
        "lawfirm/billing-rates.xlsx",
        "Hourly rates and disbursements 2025-26",
        "Finance",
        [
            ("Hourly rates 2025", rates, [20, 34, 20, 38]),
            ("Disbursements", disbursements, [34, 14, 40]),
            ("Rate notes", notes, [16, 90]),
        ],
    )


def law_retention_policy() -> None:
    write_html(
        "lawfirm/document-retention-policy.html",
        f"Document Retention Policy - {FIRM}",
        [
            ("h1", "Document Retention Policy"),
            (
                "p",
                f"{FIRM}. Policy owner: Records Manager. Version 3, approved by the Management Board on "
                "28 November 2024.",
            ),
            ("h2", "1. Purpose"),
            (
                "p",
                "We keep the records we need for as long as the law, our regulators and our clients require, "
                "and no longer. A litigation hold notice overrides this policy for the documents it covers, "
                "for as long as the hold is in force.",
            ),
            ("h2", "2. Client matter files"),
            (
                "p",
                "General client matter files, paper and electronic, are kept for seven years after the "
                "matter closes. Files for a client who was a child when the matter closed are kept until the "
                "client's 21st birthday, or for seven years after closing if that is later.",
            ),
            ("h2", "3. Wills, deeds and conveyancing"),
            (
                "p",
                "Original wills and lasting powers of attorney are held in the Strongroom on Level -1 until "
                "they are released to the client, the attorney or the executors. Title deeds held in safe "
                "custody stay there until collected against a signed receipt. Conveyancing files are kept "
                "for 15 years after completion.",
            ),
            ("h2", "4. Financial records"),
            (
                "p",
                "Client account ledgers, bank statements, bills and receipts are kept for 6 years from the "
                "end of the financial year they relate to. The firm's financial year ends on 30 April.",
            ),
            ("h2", "5. Email and staff records"),
            (
                "p",
                "The mailbox of a member of staff who leaves is kept for 24 months after the person leaves "
                "and is then deleted, unless it is subject to a litigation hold. Personnel files are kept for "
                "6 years after employment ends.",
            ),
            ("h2", "6. Secure destruction"),
            (
                "p",
                "Paper is placed in the locked confidential waste consoles, which are emptied every Thursday "
                "by the firm's shredding contractor. The contractor issues a certificate of destruction for "
                "each collection, and the Records Manager keeps the certificates for 10 years. Electronic "
                "files deleted from live systems expire from the backups within 35 days.",
            ),
            ("h2", "7. Questions"),
            (
                "p",
                "Questions about this policy go to the Records Manager. A request to keep a record longer "
                "than this policy allows needs written approval from the General Counsel.",
            ),
        ],
    )


def law_intake_checklist() -> None:
    write_text(
        "lawfirm/client-intake-checklist.txt",
        """
HARROW & VALE LLP
NEW CLIENT INTAKE CHECKLIST

Use this checklist for every new client before a matter number is requested. Save the completed
checklist to the matter file under "Intake". Version 2025.1, owned by the Risk and Compliance team.

1. IDENTITY (INDIVIDUAL CLIENTS)

[ ] One in-date photographic identity document: passport or driving licence.
[ ] One proof of home address dated within the last 3 months: utility bill, bank statement or
    council tax bill.
[ ] An electronic identity check through the firm's verification service; keep the result.
[ ] If the client is not met in person, an enhanced check and a call to a verified landline.

2. COMPANY CLIENTS

[ ] Certificate of incorporation and the latest filed accounts.
[ ] Names of the directors and of every person who owns or controls 25% or more of the shares
    or voting rights.
[ ] Identity checks on those beneficial owners, as for individual clients.
[ ] Board authority for the person giving us instructions.

3. SOURCE OF FUNDS AND WEALTH

[ ] For any transaction in which the client will pay in 10,000 or more, evidence of where the
    money comes from.
[ ] For property purchases, evidence of the source of the deposit before exchange of contracts.
[ ] Payments are never accepted in cash above 500.

4. RISK RATING

[ ] Complete the risk assessment form (RA-2). A high-risk client needs approval from the Money
    Laundering Reporting Officer before the matter is opened.
[ ] Politically exposed persons are always rated high risk.

5. ENGAGEMENT AND MONEY ON ACCOUNT

[ ] Conflict check cleared under procedure RC-04.
[ ] Engagement letter sent, and the signed copy returned before work continues beyond the first
    2 hours.
[ ] Money on account of 1,500 received from new private clients before work starts, unless a
    partner waives it in writing.

6. FILE OPENING

[ ] Matter opening form sent to Accounts; the matter number is issued within 1 working day.
[ ] Client care information and the complaints procedure sent with the engagement letter.
""",
    )


def law_time_entries() -> None:
    entries = [
        (
            "2025-03-03",
            "Imogen Ashdown",
            "Equity partner",
            465,
            "HV-2025-0417",
            "Call with Pellworth General Counsel about warehouse losses",
            1.2,
        ),
        (
            "2025-03-03",
            "Tobias Reeve",
            "Associate",
            260,
            "HV-2025-0417",
            "Review of storage agreement and Dock 3 inspection reports",
            3.4,
        ),
        (
            "2025-03-04",
            "Nadia Petrossian",
            "Paralegal",
            140,
            "HV-2025-0417",
            "Chronology of delivery notes March 2023 to September 2024",
            4.5,
        ),
        (
            "2025-03-04",
            "Ellis Moorcroft",
            "Trainee solicitor",
            165,
            "HV-2025-0352",
            "Research on rent review assumptions",
            2.0,
        ),
        (
            "2025-03-05",
            "Anjali Brandt",
            "Senior associate",
            330,
            "HV-2025-0352",
            "Mark-up of draft lease rent review clause",
            2.6,
        ),
        ("2025-03-05", "Imogen Ashdown", "Equity partner", 465, "HV-2025-0417", "Settle litigation hold notice", 0.8),
        (
            "2025-03-06",
            "Tobias Reeve",
            "Associate",
            260,
            "HV-2025-0417",
            "Draft letter before claim to Carraway Freight Services",
            2.9,
        ),
        (
            "2025-03-06",
            "Anjali Brandt",
            "Senior associate",
            330,
            "HV-2025-0352",
            "Negotiation call with landlord's solicitors",
            1.5,
        ),
        ("2025-03-06", "Nadia Petrossian", "Paralegal", 140, "HV-2025-0417", "Index of client documents received", 3.0),
        (
            "2025-03-07",
            "Ellis Moorcroft",
            "Trainee solicitor",
            165,
            "HV-2025-0417",
            "Research on limitation of liability clauses in storage contracts",
            2.5,
        ),
        ("2025-03-07", "Tobias Reeve", "Associate", 260, "HV-2025-0417", "Prepare custodian interview questions", 1.7),
        (
            "2025-03-07",
            "Conor Haldane",
            "Salaried partner",
            420,
            "HV-2025-0388",
            "Review of share purchase disclosure letter",
            2.2,
        ),
        (
            "2025-03-07",
            "Anjali Brandt",
            "Senior associate",
            330,
            "HV-2025-0352",
            "Report to client on agreed lease terms",
            1.1,
        ),
    ]
    rows = [["Date", "Fee earner", "Grade", "Matter", "Activity", "Hours", "Rate (GBP)", "Value (GBP)"]]
    for date, who, grade, rate, matter, activity, hours in entries:
        rows.append([date, who, grade, matter, activity, f"{hours:.1f}", str(rate), f"{hours * rate:.2f}"])
    write_csv("lawfirm/matter-time-entries.csv", rows)


def law_complaints_procedure() -> None:
    write_pdf(
        "lawfirm/complaints-procedure.pdf",
        "Client Complaints Procedure",
        "Risk and Compliance",
        f"{FIRM} - Client Complaints Procedure RC-09 v2",
        [
            [
                ("h1", "Client Complaints Procedure"),
                ("meta", f"{FIRM} - Risk and Compliance"),
                (
                    "p",
                    "Procedure RC-09, version 2, effective 1 January 2025. Complaints Partner: Harriet Kestrel.",
                ),
                ("h2", "1. How to complain"),
                (
                    "p",
                    "We want to hear when we have not met your expectations. You may complain by letter, by "
                    "email to complaints@harrow-vale.example, or by telephone to the Complaints Partner, "
                    "Harriet Kestrel, on extension 5200 through the main switchboard.",
                ),
                (
                    "p",
                    "A complaint may be about our service, about our bill, or about the conduct of anyone at "
                    "the firm. Making a complaint will not affect how we handle your matter.",
                ),
                ("h2", "2. What happens next"),
                (
                    "p",
                    "We acknowledge every complaint in writing within 3 working days and tell you who is "
                    "investigating it. The investigator is always a partner who has not worked on your "
                    "matter, and they may ask to meet you to understand the complaint fully.",
                ),
                (
                    "p",
                    "We send you our final written response within 8 weeks of receiving your complaint. If "
                    "the investigation needs longer, we tell you why and when you will hear from us.",
                ),
            ],
            [
                ("h1", "3. If you are not satisfied"),
                (
                    "p",
                    "If you are not satisfied with our final response, or 8 weeks have passed without one, "
                    "you may refer your complaint to the independent legal complaints ombudsman. You must "
                    "normally do so within 6 months of our final response, and no later than 1 year after "
                    "the problem happened or after you became aware of it.",
                ),
                ("h1", "4. Complaints about bills"),
                (
                    "p",
                    "You may also be able to ask the court to assess our bill. The time limits for this are "
                    "short: usually 1 month from the date of the bill. While a complaint about a bill is "
                    "being investigated we do not charge interest on the amount in dispute.",
                ),
                ("h1", "5. Records and review"),
                (
                    "p",
                    "Every complaint is logged in the complaints register. The Management Board reviews the "
                    "register every quarter, and the Complaints Partner publishes an annual report on "
                    "trends and lessons learned each May.",
                ),
            ],
        ],
    )


def write_all() -> None:
    hospital_discharge_policy()
    hospital_medication_reconciliation()
    hospital_infection_control()
    hospital_on_call_rota()
    hospital_ward_contacts()
    write_scanned_pdf(SCANNED, SCANNED_LINES)
    hospital_visiting_hours()
    hospital_fire_safety()
    hospital_consent_procedure()
    hospital_hand_hygiene_training()
    hospital_sepsis_pathway()
    law_conflict_check()
    law_litigation_hold_memo()
    law_email_thread()
    law_new_associate_training()
    law_billing_rates()
    law_retention_policy()
    law_intake_checklist()
    law_time_entries()
    law_complaints_procedure()


# ------------------------------------------------------------------------------------------------
# Reading the documents back, and checking questions.yaml against them
# ------------------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return " ".join(text.split())


class _HTMLSections(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, list[str]] = {"": []}
        self.current = ""
        self.heading: list[str] | None = None
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "title"):
            self.skip += 1
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.heading = []

    def handle_endtag(self, tag):
        if tag in ("script", "style", "title"):
            self.skip -= 1
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6") and self.heading is not None:
            self.current = normalise("".join(self.heading))
            self.sections.setdefault(self.current, []).append(self.current)
            self.heading = None

    def handle_data(self, data):
        if self.skip:
            return
        if self.heading is not None:
            self.heading.append(data)
        else:
            self.sections.setdefault(self.current, []).append(data)


def _docx_sections(data: bytes) -> dict[str, str]:
    import docx
    from docx.table import Table

    document = docx.Document(io.BytesIO(data))
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for item in document.iter_inner_content():
        if isinstance(item, Table):
            sections[current] += [cell.text for row in item.rows for cell in row.cells]
            continue
        style = item.style.name if item.style is not None else ""
        if style.startswith("Heading") or style == "Title":
            current = item.text.strip()
        sections.setdefault(current, []).append(item.text)
    return {name: "\n".join(parts) for name, parts in sections.items()}


def _line_sections(lines: list[str], is_heading) -> dict[str, str]:
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in lines:
        heading = is_heading(line)
        if heading is not None:
            current = heading
        sections.setdefault(current, []).append(line)
    return {name: "\n".join(parts) for name, parts in sections.items()}


def _md_heading(line: str) -> str | None:
    return line.lstrip("#").strip() if line.startswith("#") else None


def _txt_heading(line: str) -> str | None:
    stripped = line.strip()
    return stripped if stripped and stripped == stripped.upper() and any(c.isalpha() for c in stripped) else None


def extract(rel: str) -> dict:
    """The document's text by place: {page number: text} for PDF/PPTX, else {section name: text}."""
    path = ROOT / rel
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        try:
            from pypdf import PdfReader
        except ImportError:  # fall back to the text the generator wrote on each page
            return dict(enumerate(PDF_SOURCE.get(rel, []), start=1))
        reader = PdfReader(path)
        pages = {number: page.extract_text() or "" for number, page in enumerate(reader.pages, start=1)}
        if rel in PDF_SOURCE and len(PDF_SOURCE[rel]) != len(pages):
            raise SystemExit(f"{rel}: {len(pages)} pages, but {len(PDF_SOURCE[rel])} were written")
        return pages
    if suffix == ".pptx":
        import pptx

        deck = pptx.Presentation(str(path))
        return {
            number: "\n".join(shape.text_frame.text for shape in slide.shapes if shape.has_text_frame)
            for number, slide in enumerate(deck.slides, start=1)
        }
    if suffix == ".xlsx":
        import openpyxl

        workbook = openpyxl.load_workbook(path, read_only=True)
        return {
            sheet.title: "\n".join(
                " | ".join("" if v is None else str(v) for v in row) for row in sheet.iter_rows(values_only=True)
            )
            for sheet in workbook.worksheets
        }
    if suffix == ".csv":
        return {CSV_TABLES[rel]: path.read_text(encoding="utf-8")}
    if suffix == ".docx":
        return _docx_sections(path.read_bytes())
    if suffix == ".md":
        return _line_sections(path.read_text(encoding="utf-8").splitlines(), _md_heading)
    if suffix == ".txt":
        return _line_sections(path.read_text(encoding="utf-8").splitlines(), _txt_heading)
    if suffix == ".html":
        parser = _HTMLSections()
        parser.feed(path.read_text(encoding="utf-8"))
        return {name: "\n".join(parts) for name, parts in parser.sections.items()}
    if suffix == ".eml":
        message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        sections = {str(message["Subject"]): message.get_body(("plain",)).get_content()}
        for part in message.iter_attachments():
            data = part.get_content()
            if part.get_filename().endswith(".docx"):
                sections |= _docx_sections(data)
            else:
                sections[part.get_filename()] = data if isinstance(data, str) else data.decode()
        return sections
    raise ValueError(f"no extractor for {rel}")


def corpus_documents() -> list[str]:
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*")
        if p.is_file() and p.name not in NOT_DOCUMENTS and "__pycache__" not in p.parts
    )


def check_questions() -> None:
    import yaml

    questions = yaml.safe_load((ROOT / "questions.yaml").read_text(encoding="utf-8"))
    documents = corpus_documents()
    texts = {rel: extract(rel) for rel in documents if rel != SCANNED}
    whole = {rel: normalise("\n".join(str(t) for t in places.values())) for rel, places in texts.items()}
    problems: list[str] = []
    covered: set[str] = set()
    nulls = 0
    if not isinstance(questions, list):
        raise SystemExit("questions.yaml must be a list")
    for number, item in enumerate(questions, start=1):
        label = f"question {number} ({item.get('question', '?')!r})"
        if set(item) != {"question", "document", "where", "answer"}:
            problems.append(f"{label}: keys must be question, document, where, answer; got {sorted(item)}")
            continue
        if item["document"] is None:
            nulls += 1
            if item["answer"] is not None or item["where"] is not None:
                problems.append(f"{label}: a question without a document has answer and where null")
            for term in ABSENT_TERMS.get(item["question"], []):
                for rel, text in whole.items():
                    if term.lower() in text.lower():
                        problems.append(f"{label}: meant to be unanswerable, but {rel} mentions {term!r}")
            if item["question"] not in ABSENT_TERMS:
                problems.append(f"{label}: unanswerable question with no ABSENT_TERMS entry")
            continue
        rel, where, answer = item["document"], item["where"], str(item["answer"])
        if rel not in texts:
            problems.append(f"{label}: no document {rel}")
            continue
        covered.add(rel)
        suffix = Path(rel).suffix
        key = "page" if suffix in (".pdf", ".pptx") else "section"
        if not isinstance(where, dict) or list(where) != [key]:
            problems.append(f"{label}: where must be {{{key}: ...}} for {suffix}")
            continue
        place = where[key]
        if place not in texts[rel]:
            problems.append(f"{label}: {rel} has no {key} {place!r}; it has {list(texts[rel])}")
            continue
        if normalise(answer) not in normalise(texts[rel][place]):
            problems.append(f"{label}: answer {answer!r} is not in {rel}, {key} {place!r}")
        if rel in PDF_SOURCE and normalise(answer) not in normalise(PDF_SOURCE[rel][place - 1]):
            problems.append(f"{label}: answer {answer!r} is not in the text written on {rel} page {place}")
        elsewhere = [other for other, text in whole.items() if other != rel and normalise(answer) in text]
        if elsewhere:  # each question must be answerable from exactly one place
            problems.append(f"{label}: answer {answer!r} also appears in {', '.join(elsewhere)}")
    for rel in documents:
        if rel != SCANNED and rel not in covered:
            problems.append(f"no question covers {rel}")
    if nulls < 4:
        problems.append(f"only {nulls} unanswerable questions, want 4")
    if problems:
        print("\n".join(f"FAIL: {p}" for p in problems), file=sys.stderr)
        raise SystemExit(f"questions.yaml: {len(problems)} problem(s)")
    print(f"questions.yaml: {len(questions)} questions ({nulls} unanswerable) check out", end=" ")
    print(f"against {len(documents)} documents")


def report() -> None:
    total = 0
    for rel in corpus_documents():
        size = (ROOT / rel).stat().st_size
        total += size
        text = "" if rel == SCANNED else "\n".join(str(t) for t in extract(rel).values())
        words = "-" if rel == SCANNED else len(re.findall(r"[A-Za-z0-9][^\s,|]*", text))
        print(f"{rel:<50} {size:>8} bytes  {words:>4} words")
        if rel not in (SCANNED, *HANDWRITTEN) and not 150 <= words <= 900:
            raise SystemExit(f"{rel}: {words} words, outside 150 to 900")
    everything = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"{len(corpus_documents())} documents, {total} bytes; whole folder {everything} bytes")
    if everything > 3 * 2**20:
        raise SystemExit("sample_corpus is over 3 MB")


def main() -> int:
    sys.dont_write_bytecode = True
    for rel in HANDWRITTEN:
        if not (ROOT / rel).is_file():
            raise SystemExit(f"missing hand-written document {rel}")
    write_all()
    report()
    check_questions()
    return 0


if __name__ == "__main__":
    sys.exit(main())
